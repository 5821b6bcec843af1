-- When the last full export pass began (ms since the epoch, the store's clock as the gateway
-- reads it): every record settled before then, less a margin for clock skew, is in the
-- database. What lets a journal entry older than its settled marker be checked here instead.
CREATE TABLE export_progress (
    id                   integer PRIMARY KEY CHECK (id = 1),
    full_pass_started_ms bigint  NOT NULL
);
