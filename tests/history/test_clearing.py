"""The seed's clearing, in the history database: when an account in arrears is cleared, its
per-call records are deleted from the database too ("cannot be recovered"), while its monthly
totals and top-ups, what its statements are made of, stay for the operator's books."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import asyncpg
import orjson
import pytest

from gateway.history.embedded import EmbeddedPostgres
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import micros
from tests.history.conftest import history_section
from tests.lifecycle.test_arrears import GRACE, RETENTION, _models
from tests.procs import Proc

pytestmark = pytest.mark.timeout(120)


async def _chat(gw: Proc, key: str) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        await resp.read()
        return resp.status


async def _until(check: Callable[[], Awaitable[bool]], within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.1)


async def test_clearing_deletes_the_per_call_rows_and_keeps_the_statement(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    own_store: EmbeddedStore,
    pg: EmbeddedPostgres,
    db: asyncpg.Connection,
) -> None:
    gw = make_gateway(
        _models(mock_a.url),
        store={"url": own_store.url},
        billing={
            "grace_period": f"{GRACE}s",
            "retention_period": f"{RETENTION}s",
            "sweep_interval": "100ms",
        },
        history=history_section(pg),
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="0.020000")
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        assert resp.status == 200  # into arrears
    query = "SELECT count(*) FROM usage_records WHERE account_id = $1"

    async def exported() -> bool:
        return bool(await db.fetchval(query, account_id) == 1)

    await _until(exported)
    (record,) = admin.usage(account_id)
    month = time.strftime("%Y-%m", time.gmtime())
    before = admin.ok("GET", f"/admin/accounts/{account_id}/statements/{month}")
    assert micros(before["usage_total"]) == micros(record["cost"])

    async def is_cleared() -> bool:
        return bool(admin.account(account_id)["state"] == "cleared")

    await _until(is_cleared, within=30)
    assert admin.usage(account_id) == []  # across the store and the database at once

    async def deleted() -> bool:
        return bool(await db.fetchval(query, account_id) == 0)

    await _until(deleted)
    assert await db.fetchval("SELECT cleared_at FROM clearings WHERE account_id = $1", account_id)
    after = admin.ok("GET", f"/admin/accounts/{account_id}/statements/{month}")
    assert after["usage"] == before["usage"]  # the books stay
    assert after["topups"] == before["topups"]
    assert after["reconciliation"]["reconciles"] is True

    admin.topup(account_id, "1.00")
    admin.subscribe(account_id, "m")
    assert await _chat(gw, key) == 200

    async def new_exported() -> bool:
        return bool(await db.fetchval(query, account_id) == 1)

    await _until(new_exported)
    (new,) = admin.usage(account_id)
    assert new["request_id"] != record["request_id"]
