-- Prepended to every ledger script when it is loaded (so each file stays one operation).
-- Money is never passed through tostring(): Lua prints doubles with 14 digits. Numbers go back
-- to Redis as command arguments or integer replies, which keep every digit.

-- Append an event to the account's outbox in the same atomic step as the change behind it.
local function emit(outbox, event_type, account_id, now, ...)
  redis.call('XADD', outbox, '*', 'type', event_type, 'account', account_id, 'time', now, ...)
end

-- Rate limits: sliding-window counters (the algorithm `limits` calls "sliding window
-- counter"), kept in the account's own slot so admission checks and charges them in the same
-- step as the hold. One hash per rule: the current fixed window's index `w` and count `c`,
-- and the previous window's count `p`, which still weighs in by the share of it that the
-- sliding window overlaps. A spec is 'amount:window_ms' ('' = no such rule). Times in ms.
local function rl_spec(spec)
  if not spec or spec == '' then
    return nil
  end
  local amount, window = string.match(spec, '^(%d+):(%d+)$')
  if not amount then
    return nil
  end
  return {limit = tonumber(amount), window = tonumber(window)}
end

local function rl_load(rule, key, now)
  local window = rule.window
  local idx = math.floor(now / window)
  local v = redis.call('HMGET', key, 'w', 'c', 'p')
  local w, c, p = tonumber(v[1]), tonumber(v[2]) or 0, tonumber(v[3]) or 0
  if w == idx - 1 then
    p, c = c, 0
  elseif w ~= idx then
    p, c = 0, 0
  end
  rule.key, rule.idx, rule.c, rule.p = key, idx, c, p
  rule.elapsed = now - idx * window
  rule.used = math.floor(p * (window - rule.elapsed) / window) + c
  return rule
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

local function rl_charge(rule, cost)
  redis.call('HSET', rule.key, 'w', rule.idx, 'c', rule.c + cost, 'p', rule.p)
  redis.call('PEXPIRE', rule.key, rule.window * 2)
end

-- Settlement: move a token charge made in window `idx` by `delta` (never below zero).
local function rl_correct(key, idx, delta)
  local v = redis.call('HMGET', key, 'w', 'c', 'p')
  local w = tonumber(v[1])
  local field, current
  if w == idx then
    field, current = 'c', tonumber(v[2]) or 0
  elseif w == idx + 1 then
    field, current = 'p', tonumber(v[3]) or 0
  else
    return
  end
  redis.call('HSET', key, field, math.max(0, current + delta))
end
