-- Credit a top-up, once per Idempotency-Key: a replay answers what the first call answered,
-- and the same key with another body is refused. A top-up that brings the balance to zero or
-- above ends the arrears.
-- KEYS[1] account hash, KEYS[2] idempotency hash, KEYS[3] top-ups stream
-- ARGV[1] amount (micro-units), ARGV[2] request fingerprint ('' without a key), ARGV[3] now (ms),
-- ARGV[4] idempotency ttl (s), ARGV[5] top-up id
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'account_not_found'}
end
local keyed = ARGV[2] ~= ''
if keyed then
  local seen = redis.call('HMGET', KEYS[2], 'fingerprint', 'id', 'amount', 'balance', 'created_at')
  if seen[1] then
    if seen[1] ~= ARGV[2] then
      return {'idempotency_conflict'}
    end
    return {'replay', seen[2], seen[3], seen[4], seen[5]}
  end
end
local amount = tonumber(ARGV[1])
local balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
redis.call('HINCRBY', KEYS[1], 'topped_up', amount)
redis.call('XADD', KEYS[3], '*', 'id', ARGV[5], 'amount', ARGV[1], 'time', ARGV[3])
if balance >= 0 then
  local state = redis.call('HGET', KEYS[1], 'state')
  if state ~= 'active' then
    redis.call('HSET', KEYS[1], 'state', 'active', 'period', '', 'arrears_since', '')
  end
end
if keyed then
  redis.call('HSET', KEYS[2], 'fingerprint', ARGV[2], 'id', ARGV[5], 'amount', ARGV[1],
    'balance', balance, 'created_at', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {'ok', ARGV[5], ARGV[1], tostring(balance), ARGV[3]}
