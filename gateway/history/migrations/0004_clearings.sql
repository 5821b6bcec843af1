-- The clearings the export has carried out in the database: when an account is cleared (the
-- billing page: its usage records "cannot be recovered"), its per-call rows written up to the
-- clearing are deleted here too; its monthly totals and top-ups (its statements) stay.
CREATE TABLE clearings (
    account_id text   PRIMARY KEY,
    cleared_at bigint NOT NULL  -- ms, the ledger's cleared_at
);
