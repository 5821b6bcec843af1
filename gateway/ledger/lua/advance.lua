-- Move a frozen account along its arrears periods when they are due: grace -> retention ->
-- cleared. Clearing deletes its subscriptions and usage records for good; the debt stays.
-- Conditional and atomic, so any number of sweepers may call it: each step happens once.
-- KEYS[1] account hash, KEYS[2] subscriptions set, KEYS[3] usage stream, KEYS[4] outbox
-- ARGV[1] now (ms), ARGV[2] grace period (ms), ARGV[3] retention period (ms), ARGV[4] account id
local acct = redis.call('HMGET', KEYS[1], 'state', 'period', 'arrears_since', 'balance', 'spent')
local state, period, since = acct[1], acct[2], tonumber(acct[3])
if state ~= 'frozen' or not since then
  return {'idle', state or 'missing', 0, 0}
end
local now, grace, retention = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local events = 0
if period == 'grace' and now >= since + grace then
  period = 'retention'
  redis.call('HSET', KEYS[1], 'period', 'retention')
  emit(KEYS[4], 'account.retention_started', ARGV[4], ARGV[1], 'balance', tonumber(acct[4]))
  events = events + 1
end
if period == 'retention' and now >= since + grace + retention then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('HSET', KEYS[1], 'state', 'cleared', 'period', '', 'cleared_at', ARGV[1],
    'cleared_spent', tonumber(acct[5]))
  emit(KEYS[4], 'account.cleared', ARGV[4], ARGV[1], 'balance', tonumber(acct[4]))
  return {'cleared', 'cleared', 0, events + 1}
end
local due = since + grace
if period == 'retention' then
  due = since + grace + retention
end
return {'frozen', period, due, events}
