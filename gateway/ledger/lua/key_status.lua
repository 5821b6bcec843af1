-- What each key has spent in its current budget period and holds now, as admission sees it
-- (the period rolled over to `now` without writing anything).
-- KEYS[1] key limits hash, KEYS[2] key spend hash
-- ARGV[1] now (ms), ARGV[2..] key ids
-- Replies five values per key: spent in the period, open holds, spent over its life, the
-- period's start (ms, 0 for a budget over the key's life) and end ('' = never).
local now, out = tonumber(ARGV[1]), {}
for i = 2, #ARGV do
  local period = redis.call('HGET', KEYS[1], ARGV[i] .. ':period') or ''
  local state = key_state(KEYS[2], ARGV[i], period, now)
  out[#out + 1] = state.spent
  out[#out + 1] = state.held
  out[#out + 1] = state.total
  out[#out + 1] = state.start
  out[#out + 1] = state.stop or ''
end
return out
