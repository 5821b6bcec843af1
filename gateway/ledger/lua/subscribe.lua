-- Subscribe an account to a model; an account in arrears may keep its subscriptions but
-- add none.
-- KEYS[1] account hash, KEYS[2] subscriptions set
-- ARGV[1] model
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 'account_not_found'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  return 'exists'
end
if state ~= 'active' then
  return 'account_in_arrears'
end
redis.call('SADD', KEYS[2], ARGV[1])
return 'created'
