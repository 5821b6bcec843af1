"""The export of usage records and top-ups from the ledger's streams into PostgreSQL.

Exactly once, whatever dies when: each pass reads every account's entries after its cursor
(the last entry id in the database, kept in `export_cursors`), and writes rows and cursors in
one transaction (rows COPYed into a staging table, then inserted with `ON CONFLICT DO
NOTHING` on the request id / top-up id). A transaction that does not commit (the gateway,
the store or the database killed meanwhile) leaves rows and cursors as they were, and the next
pass reads the same entries again; a commit whose answer is lost is read again and inserts
nothing. One exporter works at a time, across every instance sharing the database
(`pg_try_advisory_lock`); the others' passes return at once.

Once exported and older than `history.keep_in_store`, an account's usage entries are trimmed
from the store (never before the database has them). Top-ups, a few per account, stay.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import Iterable
from typing import Any

import asyncpg

from gateway.config.schema import HistoryConfig
from gateway.history.schema import migrate
from gateway.ledger.history_feed import Entries, HistoryFeed
from gateway.ledger.keys import stream_id_after
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.usage_record import USAGE_FIELDS, UsageRecord

__all__ = ["EXPORT_LOCK", "ExportPass", "Exporter"]

log = get_logger("gateway.history")

EXPORT_LOCK = (0x6761, 0x7702)
ACCOUNTS_PAGE = 500
# A record's own columns, named and ordered as the API's fields (usage_record.py) after its
# id, request id and time; the table (migrations/0001) has them in this order too.
RECORD_COLUMNS = USAGE_FIELDS[3:]
USAGE_COLUMNS = (
    "account_id",
    "request_id",
    "at",
    "time_ms",
    "stream_id",
    "stream_ms",
    "stream_seq",
    *RECORD_COLUMNS,
)
TOPUP_COLUMNS = ("account_id", "topup_id", "at", "time_ms", "stream_id", "amount")
_RETRY_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# Rows built between two yields to the event loop: the export shares its loop with the calls,
# and a pass that read and converted a second's records in one go stalled them (issue 19: at
# 500 calls/s the metered gateway's p99 was 27 to 32 ms with the export in the loop, 8 to 11
# ms without it; rate_probe.py). The reads are sliced as well (HistoryFeed.new_entries).
ROWS_SLICE = 32


def _at(ms: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC)


def usage_row(account_id: str, entry_id: str, fields: dict[str, str]) -> tuple[Any, ...]:
    r = UsageRecord.from_fields(fields)
    stream_ms, stream_seq = _id_key(entry_id)
    time_ms = r.time or stream_ms
    head = (account_id, r.request_id or entry_id, _at(time_ms), time_ms, entry_id)
    return (*head, stream_ms, stream_seq, *(getattr(r, name) for name in RECORD_COLUMNS))


def topup_row(account_id: str, entry_id: str, fields: dict[str, str]) -> tuple[Any, ...]:
    time_ms = int(fields.get("time") or entry_id.split("-")[0])
    return (
        account_id,
        fields.get("id") or entry_id,
        _at(time_ms),
        time_ms,
        entry_id,
        int(fields["amount"]),
    )


def _month(at: dt.datetime) -> tuple[int, int]:
    return at.year, at.month


def _id_key(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


class ExportPass:
    """What one pass did."""

    __slots__ = ("behind", "cleared", "full_pass_ms", "topups", "trimmed", "usage")

    def __init__(self) -> None:
        self.full_pass_ms = 0  # when this pass began, if it went through every account
        self.cleared = 0  # per-call rows deleted for accounts cleared since the last pass
        self.usage = 0
        self.topups = 0
        self.trimmed = 0
        self.behind = False  # a stream had more than one read's worth: go again at once


class Exporter:
    """Moves the ledger's history into the database (see the module docstring)."""

    def __init__(
        self,
        feed: HistoryFeed,
        pool: asyncpg.Pool,
        config: HistoryConfig,
        metrics: Metrics | None = None,
    ) -> None:
        self.feed = feed
        self.pool = pool
        self.config = config
        self.metrics = metrics
        self._partitions: set[tuple[int, int]] = set()
        self._trimmed_at = 0.0
        self.migrated = False

    # -- the loop ------------------------------------------------------------------------

    async def run(self, stopping: asyncio.Event) -> None:
        """Export until `stopping` is set; failures are logged and retried with backoff."""
        failures = 0
        while not stopping.is_set():
            try:
                done = await self.export_pass()
            except Exception as exc:
                # (a database or store going away surfaces as many classes: asyncpg's
                # PostgresError, InterfaceError, InternalClientError, OSError, ours)
                delay = _RETRY_S[min(failures, len(_RETRY_S) - 1)]
                failures += 1
                if self.metrics is not None:
                    self.metrics.history_export_failures.inc()
                log.warning(
                    "history export failed; retrying",
                    error=f"{type(exc).__name__}: {exc}",
                    retry_in_s=delay,
                )
            else:
                failures = 0
                delay = 0.0 if done.behind else self.config.export_interval
                if self.metrics is not None:
                    self.metrics.child(self.metrics.history_exported, "usage").inc(done.usage)
                    self.metrics.child(self.metrics.history_exported, "topups").inc(done.topups)
                    if done.full_pass_ms:
                        self.metrics.history_full_pass.set(done.full_pass_ms / 1000)
            if delay:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stopping.wait(), delay)

    async def export_pass(self) -> ExportPass:
        """One pass over every account (nothing when another exporter holds the lock)."""
        done = ExportPass()
        async with self.pool.acquire() as conn:
            try:
                if not self.migrated:
                    await migrate(conn)
                    self.migrated = True
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", *EXPORT_LOCK):
                    return done
                await self._export(conn, done)
                await conn.execute("SELECT pg_advisory_unlock($1, $2)", *EXPORT_LOCK)
            except BaseException:
                # A connection cut mid-operation is not given back to the pool (its session,
                # and the lock with it, ends with it).
                conn.terminate()
                raise
        return done

    async def _export(self, conn: asyncpg.Connection, done: ExportPass) -> None:
        started_ms = int(time.time() * 1000)
        rows = await conn.fetch("SELECT account_id, stream, last_id FROM export_cursors")
        cursors: dict[tuple[str, str], str] = {(r[0], r[1]): r[2] for r in rows}
        cleared = {r[0]: r[1] for r in await conn.fetch("SELECT * FROM clearings")}
        batch = self.config.batch_size
        usage: list[tuple[Any, ...]] = []
        topups: list[tuple[Any, ...]] = []
        advanced: dict[tuple[str, str], str] = {}
        after: str | None = None
        while True:
            ids, after = await self.feed.accounts(after, ACCOUNTS_PAGE)
            for account_id, at in (await self.feed.cleared_at(ids)).items():
                if at > cleared.get(account_id, -1):
                    done.cleared += await self._clear(conn, account_id, at)
                    cleared[account_id] = at
            streams = [(a, s, cursors.get((a, s))) for a in ids for s in ("usage", "topups")]
            replies = await self.feed.new_entries(streams, batch) if streams else []
            for (account_id, stream, _), entries in zip(streams, replies, strict=True):
                if not entries:
                    continue
                if len(entries) == batch:
                    done.behind = True
                await self._rows(account_id, stream, entries, usage, topups)
                advanced[(account_id, stream)] = entries[-1][0]
            if (len(usage) + len(topups) >= batch or after is None) and advanced:
                await self._write(conn, usage, topups, advanced)
                done.usage += len(usage)
                done.topups += len(topups)
                cursors.update(advanced)
                usage, topups, advanced = [], [], {}
            if after is None:
                break
        if not done.behind:  # every entry written before the pass began is in the database
            done.full_pass_ms = started_ms
            await conn.execute(
                "INSERT INTO export_progress (id, full_pass_started_ms) VALUES (1, $1)"
                " ON CONFLICT (id) DO UPDATE"
                " SET full_pass_started_ms = EXCLUDED.full_pass_started_ms",
                started_ms,
            )
        done.trimmed = await self._trim(cursors)

    @staticmethod
    async def _rows(
        account_id: str,
        stream: str,
        entries: Entries,
        usage: list[tuple[Any, ...]],
        topups: list[tuple[Any, ...]],
    ) -> None:
        """The entries' rows, ROWS_SLICE at a time with the loop's other work between."""
        build, rows = (usage_row, usage) if stream == "usage" else (topup_row, topups)
        for start in range(0, len(entries), ROWS_SLICE):
            if start:
                await asyncio.sleep(0)
            rows.extend(build(account_id, i, f) for i, f in entries[start : start + ROWS_SLICE])

    # -- the database --------------------------------------------------------------------

    async def _ensure_partitions(
        self, conn: asyncpg.Connection, months: Iterable[tuple[int, int]]
    ) -> None:
        """Each month's partition of usage_records, before its rows are written."""
        for year, month in sorted(set(months) - self._partitions):
            start = dt.date(year, month, 1)
            end = dt.date(year + month // 12, month % 12 + 1, 1)
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS usage_records_{year:04d}_{month:02d} "
                f"PARTITION OF usage_records FOR VALUES FROM ('{start}') TO ('{end}')"
            )
            self._partitions.add((year, month))

    async def _write(
        self,
        conn: asyncpg.Connection,
        usage: list[tuple[Any, ...]],
        topups: list[tuple[Any, ...]],
        advanced: dict[tuple[str, str], str],
    ) -> None:
        """Rows and cursors, in one transaction."""
        await self._ensure_partitions(conn, (_month(row[2]) for row in usage))
        async with conn.transaction():
            if usage:
                await conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS staged_usage "
                    "(LIKE usage_records INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                await conn.copy_records_to_table(
                    "staged_usage", records=usage, columns=USAGE_COLUMNS
                )
                # The monthly totals grow by the rows inserted now, and only those.
                await conn.execute(
                    "WITH inserted AS (INSERT INTO usage_records SELECT * FROM staged_usage"
                    " ON CONFLICT DO NOTHING RETURNING *)"
                    " INSERT INTO usage_monthly SELECT account_id,"
                    " date_trunc('month', at AT TIME ZONE 'UTC')::date, model, kind, count(*),"
                    " sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens),"
                    " sum(cache_write_tokens), sum(reasoning_tokens), sum(cost)"
                    " FROM inserted GROUP BY 1, 2, 3, 4"
                    " ON CONFLICT (account_id, month, model, kind) DO UPDATE SET"
                    " calls = usage_monthly.calls + EXCLUDED.calls,"
                    " prompt_tokens = usage_monthly.prompt_tokens + EXCLUDED.prompt_tokens,"
                    " completion_tokens = usage_monthly.completion_tokens"
                    " + EXCLUDED.completion_tokens,"
                    " cached_tokens = usage_monthly.cached_tokens + EXCLUDED.cached_tokens,"
                    " cache_write_tokens = usage_monthly.cache_write_tokens"
                    " + EXCLUDED.cache_write_tokens,"
                    " reasoning_tokens = usage_monthly.reasoning_tokens"
                    " + EXCLUDED.reasoning_tokens,"
                    " cost = usage_monthly.cost + EXCLUDED.cost"
                )
            if topups:
                await conn.execute(
                    "CREATE TEMP TABLE IF NOT EXISTS staged_topups "
                    "(LIKE topups INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
                )
                await conn.copy_records_to_table(
                    "staged_topups", records=topups, columns=TOPUP_COLUMNS
                )
                await conn.execute(
                    "INSERT INTO topups SELECT * FROM staged_topups ON CONFLICT DO NOTHING"
                )
            keys = list(advanced)
            await conn.execute(
                "INSERT INTO export_cursors (account_id, stream, last_id) "
                "SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) "
                "ON CONFLICT (account_id, stream) DO UPDATE SET last_id = EXCLUDED.last_id",
                [a for a, _ in keys],
                [s for _, s in keys],
                [advanced[k] for k in keys],
            )

    @staticmethod
    async def _clear(conn: asyncpg.Connection, account_id: str, cleared_at: int) -> int:
        """The seed's clearing, in the database: the account's per-call rows written up to
        its clearing are deleted (its monthly totals and top-ups stay); the rows deleted."""
        async with conn.transaction():
            status = await conn.execute(
                "DELETE FROM usage_records WHERE account_id = $1 AND stream_ms <= $2",
                account_id,
                cleared_at,
            )
            await conn.execute(
                "INSERT INTO clearings (account_id, cleared_at) VALUES ($1, $2)"
                " ON CONFLICT (account_id) DO UPDATE SET cleared_at = EXCLUDED.cleared_at",
                account_id,
                cleared_at,
            )
        deleted = int(status.split()[-1])
        log.info("cleared account's records deleted from history", account=account_id, rows=deleted)
        return deleted

    # -- the store -----------------------------------------------------------------------

    async def _trim(self, cursors: dict[tuple[str, str], str]) -> int:
        """Trim exported usage older than keep_in_store from the store, every account at
        most once a minute (or a tenth of keep_in_store, if shorter)."""
        now = time.monotonic()
        keep = self.config.keep_in_store
        if now - self._trimmed_at < min(60.0, keep / 10):
            return 0
        self._trimmed_at = now
        old = f"{int(time.time() * 1000 - keep * 1000)}-0"
        trims = []
        for (account_id, stream), last in cursors.items():
            if stream != "usage":
                continue
            exported = stream_id_after(last)
            if exported is None:
                continue
            bound = min(exported, old, key=_id_key)
            trims.append((account_id, bound))
        return await self.feed.trim(trims)
