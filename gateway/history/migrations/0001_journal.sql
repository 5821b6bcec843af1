-- The SQL journal of the ledger: every usage record and top-up, exactly once.
-- Amounts are integer micro-units (bigint), times milliseconds since the epoch and, for the
-- partitions, the timestamptz they stand for.

CREATE TABLE usage_records (
    account_id                text        NOT NULL,
    request_id                text        NOT NULL,
    at                        timestamptz NOT NULL,  -- the record's time (the partition key)
    time_ms                   bigint      NOT NULL,
    stream_id                 text        NOT NULL,  -- its entry id in the account's stream,
    stream_ms                 bigint      NOT NULL,  -- that id's two parts, which order the
    stream_seq                numeric(20) NOT NULL,  -- account's records as the stream does
    kind                      text        NOT NULL,
    model                     text        NOT NULL DEFAULT '',
    prompt_tokens             bigint      NOT NULL DEFAULT 0,
    completion_tokens         bigint      NOT NULL DEFAULT 0,
    cached_tokens             bigint      NOT NULL DEFAULT 0,
    cache_write_tokens        bigint      NOT NULL DEFAULT 0,
    reasoning_tokens          bigint      NOT NULL DEFAULT 0,
    cost                      bigint      NOT NULL,
    uncharged                 bigint      NOT NULL DEFAULT 0,
    price_version             text        NOT NULL DEFAULT '',
    usage_source              text        NOT NULL DEFAULT '',
    status                    text        NOT NULL DEFAULT '',
    stream                    boolean     NOT NULL DEFAULT false,
    gateway_prompt_tokens     bigint,
    gateway_completion_tokens bigint,
    key_id                    text        NOT NULL DEFAULT '',
    upstream                  text        NOT NULL DEFAULT '',
    channel                   text        NOT NULL DEFAULT '',
    event                     text        NOT NULL DEFAULT '',
    bytes                     bigint,
    -- One record per request: a replayed export inserts nothing (the partition key must be
    -- in a partitioned table's unique key; a request's record has one time).
    PRIMARY KEY (account_id, request_id, at)
) PARTITION BY RANGE (at);

-- Rows of a month no partition was made for yet land here rather than fail; the exporter
-- makes each month's partition before it writes that month's rows.
CREATE TABLE usage_records_default PARTITION OF usage_records DEFAULT;

CREATE INDEX usage_records_in_stream_order ON usage_records (account_id, stream_ms, stream_seq);
CREATE INDEX usage_records_by_account_time ON usage_records (account_id, time_ms);

CREATE TABLE topups (
    account_id text        NOT NULL,
    topup_id   text        NOT NULL,
    at         timestamptz NOT NULL,
    time_ms    bigint      NOT NULL,
    stream_id  text        NOT NULL,
    amount     bigint      NOT NULL,
    PRIMARY KEY (account_id, topup_id)
);

CREATE INDEX topups_by_account_time ON topups (account_id, time_ms);

-- How far each account's streams are in the database: the last entry id exported. Written in
-- the same transaction as the rows, so rows and cursor never disagree.
CREATE TABLE export_cursors (
    account_id text NOT NULL,
    stream     text NOT NULL,  -- usage | topups
    last_id    text NOT NULL,
    PRIMARY KEY (account_id, stream)
);
