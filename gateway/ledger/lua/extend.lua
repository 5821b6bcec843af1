-- Strict enforcement: grow a live stream's hold before it outgrows it, if the account's
-- available balance (balance - open holds) covers the extra; refuse otherwise.
-- KEYS[1] account hash, KEYS[2] holds hash
-- ARGV[1] request id, ARGV[2] extra micro-units to hold
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return -1
end
local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
local extra = tonumber(ARGV[2])
if tonumber(acct[1]) - tonumber(acct[2]) < extra then
  return 0
end
redis.call('HINCRBY', KEYS[2], ARGV[1], extra)
redis.call('HINCRBY', KEYS[1], 'held', extra)
return 1
