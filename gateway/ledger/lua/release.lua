-- Release a call's hold without charging anything (it failed before its first byte).
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] hold leases zset
-- ARGV[1] request id
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('HINCRBY', KEYS[1], 'held', -tonumber(hold))
return 1
