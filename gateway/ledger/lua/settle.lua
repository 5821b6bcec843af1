-- Settle a call once: debit its actual cost, release its hold and append its usage record.
-- A settlement that leaves the balance below zero puts the account in arrears (frozen).
-- KEYS[1] account hash, KEYS[2] holds hash, KEYS[3] hold leases zset, KEYS[4] usage stream,
-- KEYS[5] settled marker of this request
-- ARGV[1] request id, ARGV[2] cost (micro-units), ARGV[3] now (ms), ARGV[4] marker ttl (s),
-- ARGV[5..] the usage record's field/value pairs
local previous = redis.call('GET', KEYS[5])
if previous then
  return {'duplicate', previous}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'account_not_found'}
end
local cost = tonumber(ARGV[2])
local hold = redis.call('HGET', KEYS[2], ARGV[1])
if hold then
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('HINCRBY', KEYS[1], 'held', -tonumber(hold))
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', -cost)
redis.call('HINCRBY', KEYS[1], 'spent', cost)
local record = {}
for i = 5, #ARGV do
  record[#record + 1] = ARGV[i]
end
redis.call('XADD', KEYS[4], '*', unpack(record))
redis.call('SET', KEYS[5], ARGV[2], 'EX', ARGV[4])
local state = redis.call('HGET', KEYS[1], 'state')
if balance < 0 and state == 'active' then
  state = 'frozen'
  redis.call('HSET', KEYS[1], 'state', 'frozen', 'period', 'grace', 'arrears_since', ARGV[3])
end
return {'ok', tostring(balance), state}
