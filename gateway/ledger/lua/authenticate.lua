-- Check an API key and answer its account's state and subscriptions, and the models the key
-- itself may call.
-- KEYS[1] account hash, KEYS[2] api key hashes, KEYS[3] subscriptions set, KEYS[4] key limits
-- ARGV[1] key id, ARGV[2] sha256 of the secret, ARGV[3] now (ms)
-- Replies {'ok', state, the key's models (one per line) or '*' for all, subscriptions...},
-- {'key_expired'} or {'invalid_api_key'}.
if not key_matches(KEYS[2], ARGV[1], ARGV[2], tonumber(ARGV[3])) then
  return {'invalid_api_key'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'invalid_api_key'}
end
local own = key_limits(KEYS[4], ARGV[1])
if own.expires and tonumber(ARGV[3]) >= own.expires then
  return {'key_expired'}
end
local out = {'ok', state, own.models or '*'}
for _, model in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  out[#out + 1] = model
end
return out
