-- Write an API key: its public metadata and its limits in one step, so what the admin API
-- shows is what admission enforces.
-- KEYS[1] account hash, KEYS[2] api key hashes, KEYS[3] key metadata hash, KEYS[4] key limits
-- ARGV[1] 'create' | 'update' | 'rotate', ARGV[2] key id, ARGV[3] metadata JSON,
-- ARGV[4] the secret's sha256 (create, rotate), ARGV[5] until when (ms) the secret being
-- replaced stays valid (rotate; '' or a past time: not at all), ARGV[6..11] the limits
-- (create, update; '' = none): budget, period, expires, models, request spec, token spec,
-- in the fields key_limits reads.
-- A rerun changes nothing more.
-- Replies 'ok', 'account_not_found', 'key_not_found' or 'key_revoked'.
local key_id = ARGV[2]
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 'account_not_found'
end
if ARGV[1] ~= 'create' then
  if redis.call('HEXISTS', KEYS[3], key_id) == 0 then
    return 'key_not_found'
  end
  if redis.call('HEXISTS', KEYS[2], key_id) == 0 then
    return 'key_revoked'
  end
end
if ARGV[1] == 'rotate' then
  local old = redis.call('HGET', KEYS[2], key_id)
  if old == ARGV[4] then
    return 'ok'  -- a resend of this rotation: the previous secret is already kept
  end
  if ARGV[5] ~= '' then
    redis.call('HSET', KEYS[2], key_id .. ':prev', old .. ':' .. ARGV[5])
  else
    redis.call('HDEL', KEYS[2], key_id .. ':prev')
  end
else
  local names = {'budget', 'period', 'expires', 'models', 'rq', 'rt'}
  for i, name in ipairs(names) do
    local value = ARGV[5 + i]
    if value == '' then
      redis.call('HDEL', KEYS[4], key_id .. ':' .. name)
    else
      redis.call('HSET', KEYS[4], key_id .. ':' .. name, value)
    end
  end
end
redis.call('HSET', KEYS[3], key_id, ARGV[3])
if ARGV[1] ~= 'update' then
  redis.call('HSET', KEYS[2], key_id, ARGV[4])
end
return 'ok'
