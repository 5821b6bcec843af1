"""Reading an account's usage across the store and the history database: a stream trimmed
after export still pages through the admin API, every record exactly once, in order; `since`
and `until` select by the record's time; a database that does not answer is 503, never a
page silently missing what only the database holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest
import redis

from gateway.history.embedded import EmbeddedPostgres
from gateway.ledger.keys import account_keys
from gateway.timefmt import parse_iso_ms
from tests.admin_client import Admin
from tests.billing.checks import wait_no_holds
from tests.history.test_export import _calls, _wait_rows
from tests.procs import Proc

pytestmark = pytest.mark.timeout(120)


def _walk(admin: Admin, account_id: str, limit: int, query: str = "") -> list[dict[str, Any]]:
    """Every record, following the cursors."""
    records: list[dict[str, Any]] = []
    after = ""
    for _ in range(200):
        page = admin.ok("GET", f"/admin/accounts/{account_id}/usage?limit={limit}{query}{after}")
        records.extend(page["data"])
        if not page["next"]:
            return records
        after = f"&after={page['next']}"
    raise AssertionError("the cursors never ended")


def _order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms), int(seq)


async def test_a_trimmed_stream_still_pages_through_the_api(
    history_gateway: Callable[..., Proc], db: asyncpg.Connection, redis_client: redis.Redis
) -> None:
    """12 records exported and trimmed from the store, then 5 more still in it: pages of 4
    (and of 1, and of 100) give all 17 once each, in stream order, the trimmed ones as the
    store had them."""
    gw = history_gateway(keep_in_store="1s")
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    first = await _calls(gw, key, 12)
    wait_no_holds(redis_client, account_id)
    before_trim = {r["request_id"]: r for r in admin.usage(account_id)}
    usage_key = account_keys(account_id).usage
    deadline = time.monotonic() + 20
    while redis_client.xlen(usage_key):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    second = await _calls(gw, key, 5)
    wait_no_holds(redis_client, account_id)
    assert redis_client.xlen(usage_key) > 0  # these are still in the store
    for limit in (4, 1, 100):
        records = _walk(admin, account_id, limit)
        ids = [r["request_id"] for r in records]
        assert sorted(ids) == sorted(first + second), limit
        assert len(ids) == len(set(ids))
        assert [r["id"] for r in records] == sorted((r["id"] for r in records), key=_order)
        for record in records:
            if record["request_id"] in before_trim:
                assert record == before_trim[record["request_id"]]
    await _wait_rows(db, account_id, 17)


async def test_since_and_until_select_by_the_records_time(
    history_gateway: Callable[..., Proc], db: asyncpg.Connection, redis_client: redis.Redis
) -> None:
    gw = history_gateway(keep_in_store="1s")
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    await _calls(gw, key, 10)
    wait_no_holds(redis_client, account_id)
    everything = admin.usage(account_id)
    times = sorted(r["time"] for r in everything)
    since, until = times[3], times[7]
    await _wait_rows(db, account_id, 10)
    deadline = time.monotonic() + 20
    while redis_client.xlen(account_keys(account_id).usage):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    picked = _walk(admin, account_id, 2, f"&since={since}&until={until}")
    expected = [r for r in everything if since <= r["time"] < until]
    assert sorted(r["request_id"] for r in picked) == sorted(r["request_id"] for r in expected)
    assert all(parse_iso_ms(since) <= parse_iso_ms(r["time"]) < parse_iso_ms(until) for r in picked)
    reply = admin.call("GET", f"/admin/accounts/{account_id}/usage?since=yesterday")
    assert reply.status == 400
    assert reply.json()["error"]["param"] == "since"


async def test_a_database_that_does_not_answer_is_503(
    history_gateway: Callable[..., Proc], pg: EmbeddedPostgres
) -> None:
    gw = history_gateway()
    admin = Admin(gw.url)
    account_id, _ = admin.funded(["m"], amount="1.00")
    pg.stop()
    try:
        reply = admin.call("GET", f"/admin/accounts/{account_id}/usage")
        assert reply.status == 503
        assert reply.json()["error"]["code"] == "history_unavailable"
    finally:
        pg.start()
