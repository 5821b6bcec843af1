-- Credit a top-up, once per Idempotency-Key: a replay answers what the first call answered,
-- and the same key with another body is refused. A top-up that brings the balance to zero or
-- above ends the arrears: a frozen account is active again with its subscriptions, a cleared
-- one is active with none (they were deleted when it was cleared). A top-up that would take the
-- balance above the maximum is refused, here and before any write, so that concurrent top-ups
-- cannot pass it together; Lua numbers are doubles, and the maximum keeps every balance and
-- amount this script adds far below 2^53 (gateway/money.py).
-- KEYS[1] account hash, KEYS[2] idempotency hash, KEYS[3] top-ups stream, KEYS[4] outbox
-- ARGV[1] amount (micro-units), ARGV[2] request fingerprint ('' without a key), ARGV[3] now (ms),
-- ARGV[4] idempotency ttl (s), ARGV[5] top-up id, ARGV[6] account id, ARGV[7] the maximum
-- balance (micro-units)
local max_balance = tonumber(ARGV[7])
if not max_balance then
  return redis.error_reply('ERR topup: ARGV[7], the maximum balance, is missing')
end
local acct = redis.call('HMGET', KEYS[1], 'state', 'low_threshold', 'low_notified', 'balance')
local state, threshold, notified = acct[1], acct[2], acct[3]
if not state then
  return {'account_not_found'}
end
local keyed = ARGV[2] ~= ''
if keyed then
  local seen = redis.call('HMGET', KEYS[2], 'fingerprint', 'id', 'amount', 'balance', 'created_at')
  if seen[1] then
    if seen[1] ~= ARGV[2] then
      return {'idempotency_conflict'}
    end
    return {'replay', seen[2], tonumber(seen[3]), tonumber(seen[4]), tonumber(seen[5]), 0}
  end
end
local amount = tonumber(ARGV[1])
if (tonumber(acct[4]) or 0) + amount > max_balance then
  return {'balance_limit_exceeded', tonumber(acct[4]) or 0}
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', amount)
redis.call('HINCRBY', KEYS[1], 'topped_up', amount)
redis.call('XADD', KEYS[3], '*', 'id', ARGV[5], 'amount', amount, 'time', ARGV[3])
emit(KEYS[4], 'topup.succeeded', ARGV[6], ARGV[3], 'amount', amount, 'balance', balance)
local events = 1
if balance >= 0 and state ~= 'active' then
  redis.call('HSET', KEYS[1], 'state', 'active', 'period', '', 'arrears_since', '')
  emit(KEYS[4], 'account.unfrozen', ARGV[6], ARGV[3], 'balance', balance, 'from', state)
  events = events + 1
end
if notified == '1' and threshold and threshold ~= '' and balance >= tonumber(threshold) then
  redis.call('HSET', KEYS[1], 'low_notified', '')
end
if keyed then
  redis.call('HSET', KEYS[2], 'fingerprint', ARGV[2], 'id', ARGV[5], 'amount', amount,
    'balance', balance, 'created_at', ARGV[3])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return {'ok', ARGV[5], amount, balance, tonumber(ARGV[3]), events}
