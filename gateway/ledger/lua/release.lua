-- Release a call's hold without charging anything (it failed before its first byte).
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] hold leases zset, KEYS[4] hold info hash,
-- KEYS[5] checkpoints hash, KEYS[6] key spend hash (the key's open holds give it back)
-- ARGV[1] request id, ARGV[2] now (ms) when only a hold whose lease has ended may go, else ''
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return 0
end
if ARGV[2] ~= '' then
  local lease = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if lease and tonumber(lease) > tonumber(ARGV[2]) then
    return -1
  end
end
redis.call('HDEL', KEYS[4], ARGV[1])
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', -tonumber(hold))
key_unhold(KEYS[6], ARGV[1], tonumber(hold))
return 1
