-- Each account's usage summed by month, model and kind: what its monthly statements are made
-- of. Written by the export in the same transaction as the rows, from the rows it inserted
-- (a replayed export inserts none, so adds nothing), and kept when the account is cleared and
-- its per-call records are deleted: the operator's books outlive the records.
CREATE TABLE usage_monthly (
    account_id         text    NOT NULL,
    month              date    NOT NULL,  -- the first day of the month, UTC
    model              text    NOT NULL,
    kind               text    NOT NULL,  -- inference | passthrough | notification
    calls              bigint  NOT NULL,
    prompt_tokens      bigint  NOT NULL,
    completion_tokens  bigint  NOT NULL,
    cached_tokens      bigint  NOT NULL,
    cache_write_tokens bigint  NOT NULL,
    reasoning_tokens   bigint  NOT NULL,
    cost               bigint  NOT NULL,
    PRIMARY KEY (account_id, month, model, kind)
);

-- What the months before the table existed add up to (none, on a new database).
INSERT INTO usage_monthly
SELECT account_id, date_trunc('month', at AT TIME ZONE 'UTC')::date, model, kind, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens),
       sum(cache_write_tokens), sum(reasoning_tokens), sum(cost)
FROM usage_records
GROUP BY 1, 2, 3, 4;
