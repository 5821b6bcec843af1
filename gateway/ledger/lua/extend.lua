-- Strict enforcement: grow a live stream's hold before it outgrows it, if the account's
-- available balance (balance - open holds) covers the extra, and the key's budget does
-- (its spend in the current period plus its open holds plus the extra); refuse otherwise.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] key limits hash, KEYS[4] key spend hash
-- ARGV[1] request id, ARGV[2] extra micro-units to hold, ARGV[3] now (ms)
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if not hold then
  return -1
end
local acct = redis.call('HMGET', KEYS[1], 'balance', 'held')
local extra = tonumber(ARGV[2])
if tonumber(acct[1]) - tonumber(acct[2]) < extra then
  return 0
end
local key_id = redis.call('HGET', KEYS[4], 'h:' .. ARGV[1])
if key_id then
  local own = key_limits(KEYS[3], key_id)
  if own.budget then
    local spend = key_state(KEYS[4], key_id, own.period, tonumber(ARGV[3]))
    if spend.spent + spend.held + extra > own.budget then
      return 0
    end
  end
  redis.call('HINCRBY', KEYS[4], key_id .. ':h', extra)
end
redis.call('HINCRBY', KEYS[2], ARGV[1], extra)
redis.call('HINCRBY', KEYS[1], 'held', extra)
return 1
