-- Settle a call once: debit its actual cost, release its hold and append its usage record.
-- A settlement that leaves the balance below zero puts the account in arrears (frozen, grace);
-- one that takes it below its low-balance threshold says so once per crossing.
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] hold leases zset, KEYS[4] usage stream,
-- KEYS[5] settled marker of this request, KEYS[6] outbox stream, KEYS[7] hold info hash,
-- KEYS[8] checkpoints hash, KEYS[9..10] the account's and the account+model's token-limit
-- counters, KEYS[11] key limits hash, KEYS[12] key spend hash, KEYS[13] the key's token-limit
-- counter
-- ARGV[1] request id, ARGV[2] cost (micro-units), ARGV[3] now (ms), ARGV[4] marker ttl (s),
-- ARGV[5] account id, ARGV[6] '1' to settle only a hold whose lease has ended (a sweeper
-- settling for a dead gateway), ARGV[7] tokens to add to (or, negative, give back from) the
-- token limits' charge made at admission, ARGV[8..9] where that charge landed in the account's
-- and the account+model's counters (reserve's reply, see rl_landed; '' = none),
-- ARGV[10] the key id ('' = none), ARGV[11] where the charge landed in the key's counter,
-- ARGV[12..] the usage record's field/value pairs
-- The key's spend takes the cost as the balance does (in the budget period holding ARGV[3]),
-- and its open holds give back this call's hold.
local previous = redis.call('GET', KEYS[5])
if previous then
  return {'duplicate', tonumber(previous)}
end
if ARGV[6] == '1' then
  local lease = redis.call('ZSCORE', KEYS[3], ARGV[1])
  if not lease or tonumber(lease) > tonumber(ARGV[3]) then
    return {'alive'}
  end
end
local acct = redis.call('HMGET', KEYS[1], 'state', 'low_threshold', 'low_notified')
local state, threshold, notified = acct[1], acct[2], acct[3]
if not state then
  return {'account_not_found'}
end
local cost = tonumber(ARGV[2])
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if hold then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(hold))
  key_unhold(KEYS[12], ARGV[1], tonumber(hold))
end
if ARGV[10] ~= '' then
  key_charge(KEYS[12], KEYS[11], ARGV[10], cost, tonumber(ARGV[3]))
end
redis.call('HDEL', KEYS[7], ARGV[1])
redis.call('HDEL', KEYS[8], ARGV[1])
local balance = redis.call('HINCRBY', KEYS[1], 'balance', -cost)
redis.call('HINCRBY', KEYS[1], 'spent', cost)
local record = {}
for i = 12, #ARGV do
  record[#record + 1] = ARGV[i]
end
redis.call('XADD', KEYS[4], '*', unpack(record))
redis.call('SET', KEYS[5], cost, 'EX', ARGV[4])
local correction = tonumber(ARGV[7])
if correction ~= 0 then
  rl_correct(KEYS[9], ARGV[8], correction)
  rl_correct(KEYS[10], ARGV[9], correction)
  rl_correct(KEYS[13], ARGV[11], correction)
end
local events = 0
local frozen_now = 0
if threshold and threshold ~= '' and notified ~= '1' and balance < tonumber(threshold) then
  redis.call('HSET', KEYS[1], 'low_notified', '1')
  emit(KEYS[6], 'balance.low', ARGV[5], ARGV[3], 'balance', balance, 'threshold', threshold)
  events = events + 1
end
if balance < 0 and state == 'active' then
  state = 'frozen'
  frozen_now = 1
  redis.call('HSET', KEYS[1], 'state', 'frozen', 'period', 'grace', 'arrears_since', ARGV[3])
  emit(KEYS[6], 'account.frozen', ARGV[5], ARGV[3], 'balance', balance)
  events = events + 1
end
return {'ok', balance, state, frozen_now, events}
