"""Reading an account's usage across the store's window and the history database.

The store holds the recent records (those not yet exported, and exported ones younger than
`history.keep_in_store`); the database holds every exported one. A page is the records of
both, each once, in the account's stream order (entry ids, which never change), so a walk
that follows the cursors sees every record exactly once, whether it was trimmed from the
store, exported, or neither, meanwhile. `since` / `until` select by the record's time.

Each source is read only so far: the store up to LIST_EXAMINE entries a page, the database
up to `limit + 1` rows. A page emits only records up to the first point where a source
stopped early (every record before it was seen in both), so a record of one source is never
skipped for a later one of the other.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

from gateway.errors import GatewayError, HistoryUnavailable
from gateway.history.exporter import RECORD_COLUMNS
from gateway.ledger import Ledger
from gateway.ledger.history_feed import HistoryFeed
from gateway.ledger.journal import Entry
from gateway.ledger.keys import stream_id_after
from gateway.observability.logging import get_logger
from gateway.timefmt import now_ms
from gateway.usage_record import UsageRecord

__all__ = ["LIST_EXAMINE", "HistoryReader", "settled_in_history", "usage_page"]

log = get_logger("gateway.history")

LIST_EXAMINE = 5000  # store entries one page reads at most


def _order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq or 0)


def record_of(row: Any) -> UsageRecord:
    """A database row as the record the ledger wrote."""
    own = {name: row[name] for name in RECORD_COLUMNS}
    return UsageRecord(request_id=row["request_id"], time=row["time_ms"], **own)


class HistoryReader:
    """The database side of the reads (no pool: history is off, the store is all there is)."""

    def __init__(self) -> None:
        self.pool: Any = None

    @property
    def enabled(self) -> bool:
        return self.pool is not None

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        """A pooled connection; any failure of the database is HistoryUnavailable (503)."""
        try:
            async with self.pool.acquire() as conn:
                yield conn
        except GatewayError:
            raise
        except Exception as exc:  # the pool's failures are of many classes; each is the same
            log.warning("history database unavailable for a read", error=str(exc))
            raise HistoryUnavailable(
                f"the history database is unavailable ({type(exc).__name__})"
            ) from exc

    async def usage(
        self,
        account_id: str,
        after: str | None,
        limit: int,
        since: int,
        until: int,
        cleared_at: int = -1,
    ) -> list[tuple[str, UsageRecord]]:
        """Up to `limit` exported records after entry `after`, in stream order (none written
        up to the account's clearing: the store deleted them then; the database soon)."""
        ms, seq = _order(after) if after else (-1, 0)
        if cleared_at >= ms:
            ms, seq = cleared_at, 2**64
        async with self.connection() as conn:
            rows = await conn.fetch(
                "SELECT * FROM usage_records WHERE account_id = $1"
                " AND (stream_ms, stream_seq) > ($2, $3)"
                " AND time_ms >= $4 AND time_ms < $5"
                " ORDER BY stream_ms, stream_seq LIMIT $6",
                account_id,
                ms,
                seq,
                since,
                until,
                limit,
            )
        return [(row["stream_id"], record_of(row)) for row in rows]


async def _store_side(
    ledger: Ledger, account_id: str, after: str | None, limit: int, since: int, until: int
) -> tuple[list[tuple[str, UsageRecord]], str | None]:
    """Matching store records (up to limit + 1) and, if the stream goes on past what was
    read, the last entry read."""
    found: list[tuple[str, UsageRecord]] = []
    examined = 0
    cursor = after
    while True:
        chunk = max(limit + 1, 100)
        entries, more = await ledger.usage(account_id, chunk, cursor)
        for entry_id, fields in entries:
            record = UsageRecord.from_fields(fields)
            if since <= record.time < until:
                found.append((entry_id, record))
        examined += len(entries)
        if not more or not entries:
            return found, None
        cursor = entries[-1][0]
        if len(found) > limit or examined >= LIST_EXAMINE:
            return found, cursor


async def usage_page(
    ledger: Ledger,
    reader: HistoryReader,
    account_id: str,
    after: str | None,
    limit: int,
    since: int = 0,
    until: int = 2**62,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the account's records (their API views) and the next page's cursor."""
    stored, store_bound = await _store_side(ledger, account_id, after, limit, since, until)
    merged = {entry_id: record for entry_id, record in stored}
    bounds = [store_bound] if store_bound else []
    if reader.enabled:
        cleared = (await HistoryFeed(ledger).cleared_at([account_id])).get(account_id, -1)
        exported = await reader.usage(account_id, after, limit + 1, since, until, cleared)
        for entry_id, record in exported:
            merged.setdefault(entry_id, record)
        if len(exported) > limit:
            bounds.append(exported[-1][0])
    order = sorted(merged, key=_order)
    cut = min(bounds, key=_order) if bounds else None
    if cut is not None:
        order = [entry_id for entry_id in order if _order(entry_id) <= _order(cut)]
    page = order[:limit]
    views = [merged[entry_id].view(entry_id) for entry_id in page]
    if len(order) > limit:
        return views, page[-1]
    if cut is not None and stream_id_after(cut) is not None:
        return views, cut  # everything up to the cut was read; the rest comes next
    return views, None


# How far the store's clock (stream ids) and a gateway's may disagree.
CLOCK_MARGIN_MS = 60_000


async def settled_in_history(
    reader: HistoryReader, ttl_seconds: int, entries: list[Entry]
) -> set[str] | None:
    """Which of these journal entries' requests the database has a record of, or None when
    it cannot vouch: an entry older than its settled marker was either settled more than the
    marker's TTL ago (so its record was written then, and is in the database if a full export
    pass began after it) or never. Without such a pass, or without the database, None."""
    if not reader.enabled or not entries:
        return None
    try:
        async with reader.connection() as conn:
            progress = await conn.fetchval(
                "SELECT full_pass_started_ms FROM export_progress WHERE id = 1"
            )
            horizon = now_ms() - ttl_seconds * 1000 + CLOCK_MARGIN_MS
            if progress is None or progress < horizon:
                return None
            rows = await conn.fetch(
                "SELECT request_id FROM usage_records WHERE (account_id, request_id) IN"
                " (SELECT * FROM unnest($1::text[], $2::text[]))",
                [e.account_id for e in entries],
                [e.request_id for e in entries],
            )
    except GatewayError:
        return None
    return {row["request_id"] for row in rows}
