"""The export of usage records and top-ups into a real PostgreSQL, exactly once.

Every test counts the calls answered by their `x-request-id` and checks that each has
exactly one row in the database, with the tokens and cost of its record in the ledger; the
fault tests kill the exporting gateway, the database and the store while the export runs."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
import redis
import redis.asyncio as aioredis

from gateway.audit import AuditReport, audit_account
from gateway.history.embedded import EmbeddedPostgres
from gateway.ledger.keys import account_keys
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import metric_values, micros, wait_no_holds
from tests.conftest import model_entry
from tests.history.conftest import history_section
from tests.procs import Proc

pytestmark = pytest.mark.timeout(180)

CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def _call(session: aiohttp.ClientSession, gw: Proc, key: str, stream: bool) -> str | None:
    """One chat call; its x-request-id when answered 200, else None."""
    body = {"model": "m", **CHAT, "stream": stream}
    try:
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp:
            await resp.read()
            return resp.headers.get("x-request-id") if resp.status == 200 else None
    except aiohttp.ClientError:
        return None


async def _calls(gw: Proc, key: str, n: int) -> list[str]:
    async with aiohttp.ClientSession() as session:
        answered = await asyncio.gather(*(_call(session, gw, key, i % 2 == 1) for i in range(n)))
    return [request_id for request_id in answered if request_id]


async def _rows(db: asyncpg.Connection, account_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT * FROM usage_records WHERE account_id = $1 ORDER BY time_ms, stream_id",
        account_id,
    )


async def _wait_rows(
    db: asyncpg.Connection, account_id: str, count: int, within: float = 30.0
) -> list[asyncpg.Record]:
    deadline = time.monotonic() + within
    while True:
        rows = await _rows(db, account_id)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


def _exactly_once(rows: list[asyncpg.Record], answered: list[str]) -> None:
    """Each answered call has exactly one row, and there is no other row."""
    seen = [row["request_id"] for row in rows]
    assert len(seen) == len(set(seen)), "a record was written twice"
    assert sorted(seen) == sorted(answered)


async def test_records_and_topups_reach_the_database_exactly_once(
    history_gateway: Callable[..., Proc], db: asyncpg.Connection, redis_client: redis.Redis
) -> None:
    """Whole and streamed calls and two top-ups: one row each, every field as the ledger's
    record has it, and each stream's cursor at its last entry."""
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    admin.topup(account_id, "1.50", key="second")
    answered = await _calls(gw, key, 20)
    assert len(answered) == 20
    wait_no_holds(redis_client, account_id)
    rows = await _wait_rows(db, account_id, 20)
    _exactly_once(rows, answered)
    records = {r["request_id"]: r for r in admin.usage(account_id)}
    for row in rows:
        record = records[row["request_id"]]
        assert row["stream_id"] == record["id"]
        assert row["cost"] == micros(record["cost"])
        assert (row["prompt_tokens"], row["completion_tokens"]) == (
            record["prompt_tokens"],
            record["completion_tokens"],
        )
        assert (row["kind"], row["model"], row["stream"]) == (
            record["kind"],
            record["model"],
            record["stream"],
        )
        assert row["usage_source"] == record["usage_source"]
        assert row["key_id"] == record["key_id"]
    deadline = time.monotonic() + 10
    while (
        len(topups := await db.fetch("SELECT * FROM topups WHERE account_id = $1", account_id)) < 2
    ):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert sorted(t["amount"] for t in topups) == [micros("1.50"), micros("10.00")]
    cursor = await db.fetchval(
        "SELECT last_id FROM export_cursors WHERE account_id = $1 AND stream = 'usage'",
        account_id,
    )

    def order(stream_id: str) -> tuple[int, ...]:
        return tuple(int(part) for part in stream_id.split("-"))

    assert cursor == max((row["stream_id"] for row in rows), key=order)
    month = rows[0]["at"]
    exported = metric_values(gw.url, "gateway_history_exported_total")
    assert exported[frozenset({("stream", "usage")})] >= 20
    assert exported[frozenset({("stream", "topups")})] >= 2
    text = Admin(gw.url, token=None).call("GET", "/metrics").body.decode()
    (last_pass,) = re.findall(
        r"^gateway_history_last_full_pass_timestamp_seconds (\S+)$", text, re.M
    )
    assert time.time() - 10 < float(last_pass) <= time.time()
    partition = f"usage_records_{month.year:04d}_{month.month:02d}"
    assert (
        await db.fetchval(f"SELECT count(*) FROM {partition} WHERE account_id = $1", account_id)  # noqa: S608
        == 20
    )


async def test_exported_records_leave_the_store_after_keep_in_store(
    history_gateway: Callable[..., Proc],
    db: asyncpg.Connection,
    redis_client: redis.Redis,
    valkey: EmbeddedStore,
) -> None:
    """With keep_in_store 1s, exported records are trimmed from the account's stream, their
    costs moved to cleared_spent in the same script: the database keeps every row, the
    balance is unchanged, and the audit still adds the account up. Calls after the trim are
    exported too."""
    gw = history_gateway(keep_in_store="1s")
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    answered = await _calls(gw, key, 6)
    wait_no_holds(redis_client, account_id)
    usage_key = account_keys(account_id).usage
    deadline = time.monotonic() + 20
    while redis_client.xlen(usage_key):
        assert time.monotonic() < deadline, "the exported records were never trimmed"
        await asyncio.sleep(0.1)
    rows = await _wait_rows(db, account_id, 6)
    _exactly_once(rows, answered)
    account = admin.account(account_id)
    spent = sum(row["cost"] for row in rows)
    assert micros(account["balance"]) == micros("10.00") - spent
    cleared = int(redis_client.hget(account_keys(account_id).account, "cleared_spent") or 0)
    assert cleared == spent
    client = aioredis.Redis.from_url(valkey.url)
    try:
        report = AuditReport()
        await audit_account(client, account_id, report)
    finally:
        await client.aclose()
    assert report.failures == {}, report.failures
    more = await _calls(gw, key, 3)
    rows = await _wait_rows(db, account_id, 9)
    _exactly_once(rows, answered + more)


async def _traffic(gw: Proc, key: str, seconds: float, answered: list[str]) -> None:
    """Calls one after another (a few at a time) for `seconds`, each answered id kept."""
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            got = await asyncio.gather(*(_call(session, gw, key, i % 2 == 0) for i in range(4)))
            answered.extend(request_id for request_id in got if request_id)


@pytest.fixture
def traffic_gateway(make_gateway: Callable[..., Proc], mock_a: Proc) -> Callable[..., Proc]:
    def make(**sections: Any) -> Proc:
        return make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")], **sections)

    return make


async def test_a_gateway_killed_during_export_loses_and_duplicates_nothing(
    traffic_gateway: Callable[..., Proc],
    pg: EmbeddedPostgres,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    """One gateway serves the calls (history off); another exports them in batches of 7 and
    is SIGKILLed six times mid-way (its transaction cut wherever it was). Once an exporter
    runs to the end, every answered call is in the database exactly once."""
    server = traffic_gateway()
    admin = Admin(server.url)
    account_id, key = admin.funded(["m"], amount="100.00")
    answered: list[str] = []
    calls = asyncio.create_task(_traffic(server, key, 6.0, answered))
    rng = random.Random(15)
    history = history_section(pg, export_interval="50ms", batch_size=7)
    for _ in range(6):
        exporter = traffic_gateway(history=history)
        await asyncio.sleep(rng.uniform(0.2, 0.8))
        exporter.stop(signal.SIGKILL)
    await calls
    assert len(answered) > 40
    wait_no_holds(redis_client, account_id)
    traffic_gateway(history=history)
    rows = await _wait_rows(db, account_id, len(answered), within=60)
    _exactly_once(rows, answered)


async def test_a_database_killed_during_export_loses_and_duplicates_nothing(
    traffic_gateway: Callable[..., Proc],
    pg: EmbeddedPostgres,
    db: asyncpg.Connection,
    redis_client: redis.Redis,
) -> None:
    """The database is SIGKILLed (postmaster and backends) twice while a gateway serves and
    exports: calls go on (the ledger does not wait for history), the exporter retries, and
    after the database is back every answered call is in it exactly once."""
    gw = traffic_gateway(history=history_section(pg, export_interval="50ms", batch_size=7))
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="100.00")
    answered: list[str] = []
    calls = asyncio.create_task(_traffic(gw, key, 5.0, answered))
    await db.close()
    for _ in range(2):
        await asyncio.sleep(1.0)
        pg.kill()
        await asyncio.sleep(0.5)
        # From this thread, not a worker's: the server dies with the thread that started it
        # (PR_SET_PDEATHSIG), and a worker thread ends when its task does.
        _restart(pg)
    await calls
    assert len(answered) > 30
    wait_no_holds(redis_client, account_id)
    conn = await asyncpg.connect(pg.url)
    try:
        rows = await _wait_rows(conn, account_id, len(answered), within=60)
    finally:
        await conn.close()
    _exactly_once(rows, answered)


def _restart(pg: EmbeddedPostgres) -> None:
    """Start the killed server again (its backends may take a moment to go)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            pg.start()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


async def test_a_store_killed_during_export_loses_and_duplicates_nothing(
    traffic_gateway: Callable[..., Proc],
    pg: EmbeddedPostgres,
    db: asyncpg.Connection,
    own_store: EmbeddedStore,
) -> None:
    """The store is SIGKILLed and restarted while the gateway serves and exports: calls
    during the outage fail closed (not answered), and every answered call is in the
    database exactly once afterwards."""
    gw = traffic_gateway(
        store={"url": own_store.url},
        history=history_section(pg, export_interval="50ms", batch_size=7),
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="100.00")
    answered: list[str] = []
    calls = asyncio.create_task(_traffic(gw, key, 5.0, answered))
    await asyncio.sleep(1.5)
    own_store.kill()
    await asyncio.sleep(0.5)
    own_store.start()
    await calls
    assert len(answered) > 20
    client = redis.Redis.from_url(own_store.url)
    try:
        wait_no_holds(client, account_id, timeout=30)
    finally:
        client.close()
    rows = await _wait_rows(db, account_id, len(answered), within=60)
    _exactly_once(rows, answered)
    with contextlib.suppress(Exception):
        gw.stop()
