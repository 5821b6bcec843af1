-- Admission in one step: authenticate the key, check the account may call the model, check and
-- charge its rate limits, and hold the call's estimated cost against its available balance
-- (balance - open holds). Nothing is charged or held unless every check passes.
-- KEYS[1] account hash, KEYS[2] api key hashes, KEYS[3] subscriptions set,
-- KEYS[4] holds hash, KEYS[5] hold leases zset, KEYS[6] hold info hash,
-- KEYS[7..10] rate-limit counters: account requests, account tokens, account+model requests,
-- account+model tokens, KEYS[11] key limits hash, KEYS[12] key spend hash, KEYS[13..14] the
-- key's own rate-limit counters: requests, tokens
-- ARGV[1] key id, ARGV[2] sha256 of the secret, ARGV[3] model, ARGV[4] hold (micro-units),
-- ARGV[5] request id, ARGV[6] lease end (ms), ARGV[7] '1' if the model is dedicated,
-- ARGV[8] what a sweeper needs to settle the call if its gateway dies (see keys.py),
-- ARGV[9] now (ms), ARGV[10] tokens charged to the token limits (the hold's estimate),
-- ARGV[11..14] limit specs (every rule of a limit: 'amount:window_ms[,...]', or ''; see
-- _prelude.lua): default account requests, default account tokens, model requests, model
-- tokens. The account's own limits (admin API) replace the two defaults. Every rule of every
-- limit is checked: one refusing refuses the call, and charges nothing anywhere.
-- The key's own limits (see key_limits) come first after its secret: 'key_expired' at or
-- after its expiry, 'model_not_allowed_for_key' for a model outside its list; its rate limits
-- are checked with the account's; its budget with the balance: the key's spend in its
-- current period plus its open holds plus this hold may not pass it.
-- Replies: {'ok', hold, account tokens landed, model tokens landed, headers..., available,
-- key tokens landed, '1' if the key has a budget},
-- {'rate_limited', retry ms, refused rules, headers...},
-- {'key_budget_exceeded', budget, spent, held, period end ms or ''} or {refusal code[, detail]};
-- "landed" is where the token charge landed, for settlement (rl_landed, '' = no rule);
-- headers are 6 values: limit, remaining, reset ms for requests, then for tokens ('' = none),
-- each kind's of its tightest rule (see below); available is the balance less every hold, this
-- one's included, once it is placed.
-- A resend is the same call. The gateway never reuses a request id, so a hold for ARGV[5] exists
-- only if this script already ran for it: a client library resent the command after its
-- connection dropped before the reply (redis-py's cluster client does). The resend answers as
-- the first run did, from the hold and the same ARGV (now included): 'ok', the held amount, the
-- same token windows and header values; it charges and holds nothing more. (`remaining` is
-- read from the counters, which already hold the first run's charge: the first answer's value
-- unless another call of the account was charged in between, which it then counts too.) The
-- key, state and subscription checks still come first: a hold never stands in for them.
local now, tokens = tonumber(ARGV[9]), tonumber(ARGV[10])
if not key_matches(KEYS[2], ARGV[1], ARGV[2], now) then
  return {'invalid_api_key'}
end
local acct = redis.call('HMGET', KEYS[1], 'state', 'balance', 'held', 'rl_requests_spec',
  'rl_tokens_spec')
local state, balance, held = acct[1], tonumber(acct[2]), tonumber(acct[3])
if not state then
  return {'invalid_api_key'}
end
local dedicated = ARGV[7] == '1'
if state == 'cleared' then
  return {'account_cleared'}
end
if state == 'frozen' and not dedicated then
  return {'account_frozen'}
end
local own = key_limits(KEYS[11], ARGV[1])
if own.expires and now >= own.expires then
  return {'key_expired', own.expires}
end
if not key_allows(own, ARGV[3]) then
  return {'model_not_allowed_for_key'}
end
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 0 then
  return {'model_not_subscribed'}
end
local resent = redis.call('HGET', KEYS[4], ARGV[5])

local limits = {}  -- {rules, cost, kind, label}: every limit that applies, each one hash
local function add(spec, key, kind, label, cost)
  local rules = rl_spec(spec)
  if rules then
    rl_load(rules, key, now)
    limits[#limits + 1] = {rules, cost, kind, label}
  end
  return rules
end
local to_model = ' to model ' .. ARGV[3]
add(rl_spec(acct[4]) and acct[4] or ARGV[11], KEYS[7], 'requests', 'requests', 1)
local acct_tok = add(rl_spec(acct[5]) and acct[5] or ARGV[12], KEYS[8], 'tokens', 'tokens', tokens)
add(ARGV[13], KEYS[9], 'requests', 'requests' .. to_model, 1)
local model_tok = add(ARGV[14], KEYS[10], 'tokens', 'tokens' .. to_model, tokens)
local of_key = ' for key ' .. ARGV[1]
add(own.rq, KEYS[13], 'requests', 'requests' .. of_key, 1)
local key_tok = add(own.rt, KEYS[14], 'tokens', 'tokens' .. of_key, tokens)

local refused, retry = {}, 0
for _, limit in ipairs(limits) do
  local cost = limit[2]
  for _, rule in ipairs(limit[1]) do
    if rule.used + cost > rule.limit then
      refused[#refused + 1] = string.format('%s (%d per %ds)', limit[4], rule.limit,
        math.floor(rule.window / 1000))
      retry = math.max(retry, rl_retry_ms(rule, cost))
    end
  end
end

-- The x-ratelimit-* values of a kind describe its tightest rule, account's or model's: the one
-- with the least remaining after this call (a refused rule, on a refusal: the cost is the same
-- for every rule of a kind, so a refused rule always has less left than one that let the call
-- through); on a tie, the one whose window resets later (it keeps the caller waiting longer),
-- then the first (account before model, shorter window first). `remaining` counts this call
-- (already in the counters on a resend).
local charged = resent ~= false or #refused == 0
local function header(kind)
  local best, best_left, best_reset
  for _, limit in ipairs(limits) do
    if limit[3] == kind then
      local cost = (charged and not resent) and limit[2] or 0
      for _, rule in ipairs(limit[1]) do
        local left = math.max(0, rule.limit - (rule.used + cost))
        local reset = math.floor(rule.window - rule.elapsed)
        if not best or left < best_left or (left == best_left and reset > best_reset) then
          best, best_left, best_reset = rule, left, reset
        end
      end
    end
  end
  if not best then
    return '', '', ''
  end
  return best.limit, best_left, best_reset
end
local function headers()
  local req_l, req_r, req_t = header('requests')
  local tok_l, tok_r, tok_t = header('tokens')
  return req_l, req_r, req_t, tok_l, tok_r, tok_t
end

-- Where the token charge landed, for settlement to correct it there.
local acct_window = rl_landed(acct_tok)
local model_window = rl_landed(model_tok)
local key_window = rl_landed(key_tok)
local budgeted = own.budget and '1' or '0'

if resent then
  local rq_l, rq_r, rq_t, tk_l, tk_r, tk_t = headers()
  return {'ok', tonumber(resent), acct_window, model_window, rq_l, rq_r, rq_t, tk_l, tk_r, tk_t,
    balance - held, key_window, budgeted}
end
if not charged then
  return {'rate_limited', math.ceil(retry), table.concat(refused, ', '), headers()}
end

local hold = tonumber(ARGV[4])
if dedicated then
  hold = 0
elseif balance - held < hold then
  return {'insufficient_balance', balance - held}
end
if own.budget then
  local spend = key_state(KEYS[12], ARGV[1], own.period, now)
  if spend.spent + spend.held + hold > own.budget then
    return {'key_budget_exceeded', own.budget, spend.spent, spend.held, spend.stop or ''}
  end
end
for _, limit in ipairs(limits) do
  rl_charge(limit[1], limit[2])
end
redis.call('HSET', KEYS[4], ARGV[5], hold)
redis.call('ZADD', KEYS[5], ARGV[6], ARGV[5])
redis.call('HSET', KEYS[6], ARGV[5], ARGV[8])
redis.call('HINCRBY', KEYS[1], 'held', hold)
redis.call('HSET', KEYS[12], 'h:' .. ARGV[5], ARGV[1])
redis.call('HINCRBY', KEYS[12], ARGV[1] .. ':h', hold)
local rq_l, rq_r, rq_t, tk_l, tk_r, tk_t = headers()
return {'ok', hold, acct_window, model_window, rq_l, rq_r, rq_t, tk_l, tk_r, tk_t,
  balance - held - hold, key_window, budgeted}
