-- Admission in one step: authenticate the key, check the account may call the model, and
-- hold the call's estimated cost against its available balance (balance - open holds).
-- KEYS[1] account hash, KEYS[2] api key hashes, KEYS[3] subscriptions set,
-- KEYS[4] holds hash, KEYS[5] hold leases zset, KEYS[6] hold info hash
-- ARGV[1] key id, ARGV[2] sha256 of the secret, ARGV[3] model, ARGV[4] hold (micro-units),
-- ARGV[5] request id, ARGV[6] lease end (ms), ARGV[7] '1' if the model is dedicated,
-- ARGV[8] what a sweeper needs to settle the call if its gateway dies (see keys.py)
local stored = redis.call('HGET', KEYS[2], ARGV[1])
if not stored or stored ~= ARGV[2] then
  return {'invalid_api_key'}
end
local acct = redis.call('HMGET', KEYS[1], 'state', 'balance', 'held', 'rl_requests', 'rl_tokens')
local state, balance, held = acct[1], tonumber(acct[2]), tonumber(acct[3])
if not state then
  return {'invalid_api_key'}
end
local dedicated = ARGV[7] == '1'
if state == 'cleared' then
  return {'account_cleared'}
end
if state == 'frozen' and not dedicated then
  return {'account_frozen'}
end
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 0 then
  return {'model_not_subscribed'}
end
local hold = tonumber(ARGV[4])
if dedicated then
  hold = 0
elseif balance - held < hold then
  return {'insufficient_balance', balance - held}
end
if redis.call('HEXISTS', KEYS[4], ARGV[5]) == 1 then
  return {'duplicate_request'}
end
redis.call('HSET', KEYS[4], ARGV[5], hold)
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[6], ARGV[5], ARGV[8])
redis.call('HINCRBY', KEYS[1], 'held', hold)
-- The account's own rate limits ('' = the configured defaults) ride along: no extra trip.
return {'ok', hold, acct[4] or '', acct[5] or ''}
