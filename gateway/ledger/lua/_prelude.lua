-- Prepended to every ledger script when it is loaded (so each file stays one operation).
-- Money is never passed through tostring(): Lua prints doubles with 14 digits. Numbers go back
-- to Redis as command arguments or integer replies, which keep every digit.

-- Append an event to the account's outbox in the same atomic step as the change behind it.
local function emit(outbox, event_type, account_id, now, ...)
  redis.call('XADD', outbox, '*', 'type', event_type, 'account', account_id, 'time', now, ...)
end

-- Rate limits: sliding-window counters (the algorithm `limits` calls "sliding window
-- counter"), kept in the account's own slot so admission checks and charges them in the same
-- step as the hold. A spec lists a limit's rules, 'amount:window_ms[,amount:window_ms...]'
-- ('' = no rule), at most one per window length (ratelimit.rule_spec). One hash per limit (the
-- account's requests, its tokens, the same per model) holds, for each rule, the current fixed
-- window's index `w` and count `c`, and the previous window's count `p`, which still weighs in
-- by the share of it that the sliding window overlaps. A limit of one rule (every limit before
-- multi-rule strings were enforced) keeps those three fields under these very names, so its
-- counters are the ones gateways of the earlier version read and write during a rolling
-- upgrade; a limit of several rules keeps three per window length, `<window_ms>:w`,
-- `<window_ms>:c`, `<window_ms>:p` (a limit turning from one rule to several, or back,
-- starts those counts afresh). Times in ms. Counts are requests and tokens, not money; a
-- rule's amount is at most 10^15 (config.types), so they stay exact.

-- The rules of a spec, or nil if it names none (or is not one). `field` prefixes the rule's
-- three field names.
local function rl_spec(spec)
  if not spec or spec == '' then
    return nil
  end
  local rules = {}
  for item in string.gmatch(spec, '[^,]+') do
    local amount, window = string.match(item, '^(%d+):(%d+)$')
    if not amount or tonumber(window) < 1 then
      return nil
    end
    rules[#rules + 1] = {limit = tonumber(amount), window = tonumber(window)}
  end
  if #rules == 0 then
    return nil
  end
  for _, rule in ipairs(rules) do
    rule.field = #rules == 1 and '' or string.format('%d:', rule.window)
  end
  return rules
end

-- Read every rule's counter from the limit's hash `key` (one HMGET): what the sliding window
-- holds at `now` (`used`), and the fixed windows' counts a charge starts from.
local function rl_load(rules, key, now)
  local fields = {}
  for _, rule in ipairs(rules) do
    fields[#fields + 1] = rule.field .. 'w'
    fields[#fields + 1] = rule.field .. 'c'
    fields[#fields + 1] = rule.field .. 'p'
  end
  local v = redis.call('HMGET', key, unpack(fields))
  for i, rule in ipairs(rules) do
    local window = rule.window
    local idx = math.floor(now / window)
    local w, c, p = tonumber(v[3 * i - 2]), tonumber(v[3 * i - 1]) or 0, tonumber(v[3 * i]) or 0
    if w == idx - 1 then
      p, c = c, 0
    elseif w ~= idx then
      p, c = 0, 0
    end
    rule.key, rule.idx, rule.c, rule.p = key, idx, c, p
    rule.elapsed = now - idx * window
    rule.used = math.floor(p * (window - rule.elapsed) / window) + c
  end
  return rules
end

-- How long until `cost` more fits under the rule (ms).
local function rl_retry_ms(rule, cost)
  local window, elapsed = rule.window, rule.elapsed
  local room = rule.limit - rule.c - cost
  if room >= 0 and rule.p > 0 then
    local at = window * (1 - room / rule.p)  -- when the previous window's weight is small enough
    return math.max(0, at - elapsed)
  end
  local after = 0
  local room_next = rule.limit - cost
  if rule.c > room_next and rule.c > 0 then
    after = window * (1 - math.max(room_next, 0) / rule.c)
  end
  return (window - elapsed) + after
end

-- Charge `cost` to every rule of one limit (all in one hash, loaded by rl_load); the hash
-- lives twice its longest window.
local function rl_charge(rules, cost)
  local args, longest = {}, 0
  for _, rule in ipairs(rules) do
    args[#args + 1] = rule.field .. 'w'
    args[#args + 1] = rule.idx
    args[#args + 1] = rule.field .. 'c'
    args[#args + 1] = rule.c + cost
    args[#args + 1] = rule.field .. 'p'
    args[#args + 1] = rule.p
    longest = math.max(longest, rule.window)
  end
  redis.call('HSET', rules[1].key, unpack(args))
  redis.call('PEXPIRE', rules[1].key, longest * 2)
end

-- Where a charge landed, for settlement to correct it there ('' = no rule): for one rule the
-- fixed window's index alone (as earlier versions wrote it), for several 'window_ms:index'
-- per rule, comma-separated.
local function rl_landed(rules)
  if not rules then
    return ''
  end
  if #rules == 1 then
    return string.format('%d', rules[1].idx)
  end
  local parts = {}
  for _, rule in ipairs(rules) do
    parts[#parts + 1] = string.format('%d:%d', rule.window, rule.idx)
  end
  return table.concat(parts, ',')
end

-- Settlement: move a token charge by `delta` (never below zero) in each fixed window it
-- landed in (`landed` from rl_landed), if that window is still the current or the previous
-- one; a window the counters no longer hold is left alone.
local function rl_correct(key, landed, delta)
  local marks, fields = {}, {}
  if string.match(landed, '^%d+$') then
    marks[1] = {'', tonumber(landed)}
  else
    for window, idx in string.gmatch(landed, '(%d+):(%d+)') do
      marks[#marks + 1] = {string.format('%d:', tonumber(window)), tonumber(idx)}
    end
  end
  if #marks == 0 then
    return
  end
  for _, mark in ipairs(marks) do
    fields[#fields + 1] = mark[1] .. 'w'
    fields[#fields + 1] = mark[1] .. 'c'
    fields[#fields + 1] = mark[1] .. 'p'
  end
  local v = redis.call('HMGET', key, unpack(fields))
  local out = {}
  for i, mark in ipairs(marks) do
    local name, idx = mark[1], mark[2]
    local w = tonumber(v[3 * i - 2])
    local field, current
    if w == idx then
      field, current = 'c', tonumber(v[3 * i - 1]) or 0
    elseif w == idx + 1 then
      field, current = 'p', tonumber(v[3 * i]) or 0
    end
    if field then
      out[#out + 1] = name .. field
      out[#out + 1] = math.max(0, current + delta)
    end
  end
  if #out > 0 then
    redis.call('HSET', key, unpack(out))
  end
end

-- API keys. A key's secret is checked against its hash in the account's keys hash (field
-- `<key id>`), or, for the grace after a rotation, against the previous one (field
-- `<key id>:prev`, '<sha256>:<valid until ms>'): refused by every instance once that time has
-- passed, by the same clock check.
local function key_matches(keys_hash, key_id, key_hash, now)
  local v = redis.call('HMGET', keys_hash, key_id, key_id .. ':prev')
  if v[1] and v[1] == key_hash then
    return true
  end
  if v[2] then
    local old, until_ms = string.match(v[2], '^(%x+):(%d+)$')
    if old == key_hash and tonumber(until_ms) > now then
      return true
    end
  end
  return false
end

-- A key's own limits, as the admin API wrote them in the account's key-limits hash:
-- `<key id>:budget` (micro-units; absent: none), `:period` ('day' | 'week' | 'month', a
-- length in ms, or absent: the budget is for the key's life), `:expires` (ms), `:models`
-- (the names it may call, one per line; absent: every subscribed model), `:rq` and `:rt` (its
-- request and token rate-limit specs, as rl_spec reads them).
local function key_limits(limits_hash, key_id)
  local v = redis.call('HMGET', limits_hash, key_id .. ':budget', key_id .. ':period',
    key_id .. ':expires', key_id .. ':models', key_id .. ':rq', key_id .. ':rt')
  return {budget = tonumber(v[1]), period = v[2] or '', expires = tonumber(v[3]),
    models = v[4] or nil, rq = v[5] or '', rt = v[6] or ''}
end

local function key_allows(limits, model)
  if not limits.models then
    return true
  end
  return string.find('\n' .. limits.models .. '\n', '\n' .. model .. '\n', 1, true) ~= nil
end

-- The first day (days since 1970-01-01) of the month `ahead` months after the one holding day
-- `z`: Howard Hinnant's civil_from_days and days_from_civil, proleptic Gregorian.
local function month_start(z, ahead)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
    - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local y, m = yoe + era * 400, mp < 10 and mp + 3 or mp - 9
  if m <= 2 then
    y = y + 1
  end
  m = m + ahead
  while m > 12 do
    m, y = m - 12, y + 1
  end
  if m <= 2 then
    y = y - 1
  end
  era = math.floor(y / 400)
  yoe = y - era * 400
  doy = math.floor((153 * (m > 2 and m - 3 or m + 9) + 2) / 5)
  doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local DAY_MS = 86400000

-- The budget period holding `now` (ms): its start and end on UTC calendar boundaries (a week
-- starts on Monday, ISO 8601), or of a fixed length counted from the epoch; a budget for
-- the key's life has one period, from 0, that never ends (end nil).
local function key_period(period, now)
  if period == 'day' then
    local start = math.floor(now / DAY_MS) * DAY_MS
    return start, start + DAY_MS
  elseif period == 'week' then
    local day = math.floor(now / DAY_MS)
    local start = (day - (day + 3) % 7) * DAY_MS  -- 1970-01-01 was a Thursday
    return start, start + 7 * DAY_MS
  elseif period == 'month' then
    local day = math.floor(now / DAY_MS)
    return month_start(day, 0) * DAY_MS, month_start(day, 1) * DAY_MS
  end
  local length = tonumber(period)
  if not length or length < 1 then
    return 0, nil
  end
  local start = math.floor(now / length) * length
  return start, start + length
end

-- A key's spend in the period holding `now` and its open holds, from the account's key-spend
-- hash: `<key id>:p` the start of the period its spend `:s` belongs to, `:h` what its open
-- calls hold, `:t` its spend over its life. A spend of an earlier period counts as 0 (the
-- rollover: written by the next charge, see key_charge); holds carry over until settled.
local function key_state(spend_hash, key_id, period, now)
  local v = redis.call('HMGET', spend_hash, key_id .. ':p', key_id .. ':s', key_id .. ':h',
    key_id .. ':t')
  local start, stop = key_period(period, now)
  local spent = tonumber(v[2]) or 0
  if tonumber(v[1]) ~= start then
    spent = 0
  end
  return {spent = spent, held = tonumber(v[3]) or 0, total = tonumber(v[4]) or 0,
    start = start, stop = stop, rolled = tonumber(v[1]) ~= start}
end

-- Add a settled call's cost to the key's spend in the period holding `now` (rolled over
-- first) and to its life's.
local function key_charge(spend_hash, limits_hash, key_id, cost, now)
  local period = redis.call('HGET', limits_hash, key_id .. ':period') or ''
  local state = key_state(spend_hash, key_id, period, now)
  if state.rolled then
    redis.call('HSET', spend_hash, key_id .. ':p', state.start, key_id .. ':s', cost)
  else
    redis.call('HINCRBY', spend_hash, key_id .. ':s', cost)
  end
  redis.call('HINCRBY', spend_hash, key_id .. ':t', cost)
end

-- Drop a call's part of its key's open holds (`hold` micro-units), if admission placed one:
-- `h:<request id>` names the key it was held under.
local function key_unhold(spend_hash, request_id, hold)
  local key_id = redis.call('HGET', spend_hash, 'h:' .. request_id)
  if key_id then
    redis.call('HDEL', spend_hash, 'h:' .. request_id)
    redis.call('HINCRBY', spend_hash, key_id .. ':h', -hold)
  end
end
