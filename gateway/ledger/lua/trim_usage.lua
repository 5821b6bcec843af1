-- Trim exported usage records from an account's stream: up to ARGV[2] entries below ARGV[1]
-- (an exclusive stream id bound: the history exporter's cursor, or keep_in_store's age), their
-- costs added to the account's `cleared_spent` (the costs of records no longer in the store)
-- in the same step, so balance == top-ups - (records in the stream + cleared_spent) holds at
-- every moment, for the audit as before.
-- KEYS[1] usage stream, KEYS[2] account hash
-- ARGV[1] exclusive bound (stream id), ARGV[2] most entries this call
-- Returns {entries trimmed, 1 if entries below the bound remain else 0}
local count = tonumber(ARGV[2])
local entries = redis.call('XRANGE', KEYS[1], '-', '(' .. ARGV[1], 'COUNT', count)
if #entries == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  return {0, 0}
end
local total = 0
local ids = {}
for i, entry in ipairs(entries) do
  ids[i] = entry[1]
  local fields = entry[2]
  for j = 1, #fields, 2 do
    if fields[j] == 'cost' then
      total = total + tonumber(fields[j + 1])
      break
    end
  end
end
redis.call('XDEL', KEYS[1], unpack(ids))
redis.call('HINCRBY', KEYS[2], 'cleared_spent', total)
return {#entries, #entries == count and 1 or 0}
