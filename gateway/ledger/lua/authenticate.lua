-- Check an API key and answer its account's state and subscriptions.
-- KEYS[1] account hash, KEYS[2] api key hashes, KEYS[3] subscriptions set
-- ARGV[1] key id, ARGV[2] sha256 of the secret
local stored = redis.call('HGET', KEYS[2], ARGV[1])
if not stored or stored ~= ARGV[2] then
  return {'invalid_api_key'}
end
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return {'invalid_api_key'}
end
local out = {'ok', state}
for _, model in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  out[#out + 1] = model
end
return out
