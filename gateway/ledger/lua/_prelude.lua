-- Prepended to every ledger script when it is loaded (so each file stays one operation).
-- Money is never passed through tostring(): Lua prints doubles with 14 digits. Numbers go back
-- to Redis as command arguments or integer replies, which keep every digit.

-- Append an event to the account's outbox in the same atomic step as the change behind it.
local function emit(outbox, event_type, account_id, now, ...)
  redis.call('XADD', outbox, '*', 'type', event_type, 'account', account_id, 'time', now, ...)
end
