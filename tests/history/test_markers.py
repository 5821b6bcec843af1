"""Settled markers, kept short with history on: a settlement replayed after its marker expired
is checked against the history database instead of the store.

The marker of each settled request (`gw:{a:<id>}:settled:<request id>`) is what makes a
settlement idempotent; it lives `history.settled_ttl` (1h) with history on, not 7 days. A dead
gateway's journal entry older than that is dropped when the database has its record (it was
settled), sent again when the database proves it never was, and set aside when the export
cannot vouch for the database (behind)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest
import redis
import redis.asyncio as aioredis

from gateway.history.embedded import EmbeddedPostgres
from gateway.history.reader import HistoryReader, settled_in_history
from gateway.ledger import Ledger
from gateway.ledger.journal import Entry, SettlementJournal
from gateway.ledger.keys import account_keys
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import micros, wait_no_holds
from tests.history.test_export import _calls, _wait_rows
from tests.procs import Proc

pytestmark = pytest.mark.timeout(120)
HOUR_MS = 3_600_000


def _entry(account_id: str, request_id: str, at: int, cost: int = 1000) -> Entry:
    record = {"request_id": request_id, "time": at, "kind": "inference", "cost": cost}
    return Entry(account_id, request_id, cost=cost, now_ms=at, record=record)


def _segment(directory: Path, entries: list[Entry]) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"settle-s1-999999-{time.time_ns()}-1.jsonl"
    path.write_bytes(b"".join(e.encode() + b"\n" for e in entries))
    return path


@contextlib.asynccontextmanager
async def _journal(
    valkey: EmbeddedStore, pg: EmbeddedPostgres, directory: Path, store_id: str = "s1"
) -> AsyncIterator[SettlementJournal]:
    """A journal of this process that checks old entries against the database, as a gateway
    with history on does."""
    client = aioredis.Redis.from_url(valkey.url)
    reader = HistoryReader()
    reader.pool = await asyncpg.create_pool(pg.url, min_size=1, max_size=1)
    try:
        ledger = Ledger(client)
        ledger.settled_ttl = 3600
        journal = SettlementJournal(ledger, directory, store_id)

        async def vouch(entries: list[Entry]) -> set[str] | None:
            return await settled_in_history(reader, ledger.settled_ttl, entries)

        journal.history_check = vouch
        yield journal
    finally:
        await reader.pool.close()
        await client.aclose()


async def _adopt(valkey: EmbeddedStore, pg: EmbeddedPostgres, directory: Path) -> int:
    """The segments in `directory` adopted by such a journal."""
    async with _journal(valkey, pg, directory) as journal:
        return await journal.adopt()


async def test_markers_live_settled_ttl_and_old_replays_ask_the_database(
    history_gateway: Callable[..., Proc],
    db: asyncpg.Connection,
    redis_client: redis.Redis,
    valkey: EmbeddedStore,
    pg: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="1.00")
    (settled,) = await _calls(gw, key, 1)
    wait_no_holds(redis_client, account_id)
    marker = account_keys(account_id).settled(settled)
    assert 3500 < redis_client.ttl(marker) <= 3600  # an hour, not 7 days
    (row,) = await _wait_rows(db, account_id, 1)
    await asyncio.sleep(0.5)  # a full export pass begins after the record was written
    redis_client.delete(marker)  # as if its hour had passed
    balance = micros(admin.account(account_id)["balance"])
    old = int(time.time() * 1000) - 2 * HOUR_MS
    segment = _segment(
        tmp_path / "journal",
        [
            _entry(account_id, settled, old, cost=row["cost"]),  # settled: the database has it
            _entry(account_id, "req_never_settled", old),  # never settled: sent now
            _entry(account_id, "req_fresh", int(time.time() * 1000)),
        ],
    )
    assert await _adopt(valkey, pg, tmp_path / "journal") == 2
    assert not segment.exists()
    assert not segment.with_suffix(".stale").exists()
    wait_no_holds(redis_client, account_id)
    records = [r["request_id"] for r in admin.usage(account_id)]
    assert sorted(records) == sorted([settled, "req_never_settled", "req_fresh"])
    assert micros(admin.account(account_id)["balance"]) == balance - 2000


async def test_old_replays_are_set_aside_while_the_export_is_behind(
    history_gateway: Callable[..., Proc],
    db: asyncpg.Connection,
    redis_client: redis.Redis,
    valkey: EmbeddedStore,
    pg: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    """With the last full export pass older than the markers' TTL, the database cannot say a
    request was never settled: the old entry is set aside, nothing charged."""
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id, _ = admin.funded(["m"], amount="1.00")
    gw.stop()  # no exporter now
    await db.execute(
        "UPDATE export_progress SET full_pass_started_ms = $1",
        int(time.time() * 1000) - 2 * HOUR_MS,
    )
    old = int(time.time() * 1000) - 2 * HOUR_MS
    segment = _segment(tmp_path / "journal", [_entry(account_id, "req_maybe", old)])
    assert await _adopt(valkey, pg, tmp_path / "journal") == 0
    stale = segment.with_suffix(".stale").read_bytes().splitlines()
    assert [Entry.decode(line).request_id for line in stale] == ["req_maybe"]
    assert redis_client.hget(account_keys(account_id).account, "balance") == b"1000000"


async def test_an_owed_entry_older_than_its_marker_asks_the_database(
    history_gateway: Callable[..., Proc],
    db: asyncpg.Connection,
    redis_client: redis.Redis,
    valkey: EmbeddedStore,
    pg: EmbeddedPostgres,
    tmp_path: Path,
) -> None:
    """A settlement owed through a store outage longer than its marker lives (its reply lost,
    its marker expired meanwhile) is not sent blindly when the store is back: the database
    has its record, so it is acknowledged; one the database lacks is sent, once."""
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="1.00")
    (settled,) = await _calls(gw, key, 1)
    wait_no_holds(redis_client, account_id)
    (row,) = await _wait_rows(db, account_id, 1)
    await asyncio.sleep(0.5)  # a full export pass begins after the record was written
    redis_client.delete(account_keys(account_id).settled(settled))
    balance = micros(admin.account(account_id)["balance"])
    old = int(time.time() * 1000) - 2 * HOUR_MS
    async with _journal(valkey, pg, tmp_path / "journal", "s2") as journal:
        for entry in (
            _entry(account_id, settled, old, cost=row["cost"]),
            _entry(account_id, "req_owed_never_settled", old),
        ):
            journal._owe(entry, journal._append(entry), "the store did not answer")
        assert await journal.replay_owed() is True
        assert journal.owed == 0
        await journal.close()
    records = [r["request_id"] for r in admin.usage(account_id)]
    assert sorted(records) == sorted([settled, "req_owed_never_settled"])
    assert micros(admin.account(account_id)["balance"]) == balance - 1000
