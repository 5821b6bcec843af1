-- Drop an index entry only if nobody re-marked it since it was read (a new event re-scores it).
-- KEYS[1] the index (sorted set)
-- ARGV[1] member, ARGV[2] the score it was read at
if tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1])) == tonumber(ARGV[2]) then
  return redis.call('ZREM', KEYS[1], ARGV[1])
end
return 0
