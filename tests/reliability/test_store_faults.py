"""Store faults: fail closed, recover by itself, lose nothing acknowledged, refuse eviction."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import redis
import redis.asyncio as aioredis

from gateway.ledger import Ledger
from gateway.ledger.keys import account_keys
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros, wait_no_holds
from tests.conftest import model_entry
from tests.procs import Proc

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


async def _call(gw: Proc, key: str) -> tuple[int, dict[str, object]]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(CHAT)) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def _last_upstream_request(mock: Proc) -> object:
    async with (
        aiohttp.ClientSession() as session,
        session.get(mock.url + "/debug/last-request") as r,
    ):
        return (await r.json())["headers"].get("X-Request-Id")


async def test_store_down_fails_closed_and_recovers(
    make_gateway: Callable[..., Proc], mock_a: Proc, own_store: EmbeddedStore
) -> None:
    """With Redis down, calls fail at once with 503 ledger_unavailable and never reach the
    upstream; /readyz says so; when Redis returns, service resumes by itself, and a hold a
    failing release could not drop is reclaimed by its lease."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        store={"url": own_store.url},
        billing={"hold_lease": "1s", "sweep_interval": "100ms"},
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    assert (await _call(gw, key))[0] == 200
    before = await _last_upstream_request(mock_a)
    own_store.stop()
    started = time.monotonic()
    status, answer = await _call(gw, key)
    assert status == 503
    assert answer["error"]["code"] == "ledger_unavailable"  # type: ignore[index]
    assert time.monotonic() - started < 3
    assert await _last_upstream_request(mock_a) == before  # nothing served unmetered
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/readyz") as resp:
        assert resp.status == 503
    own_store.start()
    deadline = time.monotonic() + 10
    while (await _call(gw, key))[0] != 200:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    async with aiohttp.ClientSession() as session, session.get(gw.url + "/readyz") as resp:
        assert resp.status == 200
    client = redis.Redis.from_url(own_store.url)
    wait_no_holds(client, account_id)
    client.close()


async def test_store_killed_loses_nothing_acknowledged(
    make_gateway: Callable[..., Proc], mock_a: Proc, own_store: EmbeddedStore
) -> None:
    """SIGKILL of the store (appendfsync always) after acknowledged top-ups and settlements:
    once it restarts, every one of them is there and the ledger adds up."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")], store={"url": own_store.url}
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    for i in range(5):
        admin.topup(account_id, "0.100000", key=f"topup-{i}")
        assert (await _call(gw, key))[0] == 200
    client = redis.Redis.from_url(own_store.url)
    wait_no_holds(client, account_id)
    balance_before = admin.account(account_id)["balance"]
    records_before = admin.usage(account_id)
    client.close()
    own_store.kill()
    own_store.start()
    deadline = time.monotonic() + 10
    while True:
        reply = admin.call("GET", f"/admin/accounts/{account_id}")
        if reply.status == 200:
            break
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    assert admin.account(account_id)["balance"] == balance_before
    assert admin.usage(account_id) == records_before
    client = redis.Redis.from_url(own_store.url)
    assert_invariant(admin, client, account_id, micros("5.50"))
    client.close()


async def test_script_flush_reloads_and_charges_once(
    gateway: Proc, admin: Admin, redis_client: redis.Redis
) -> None:
    """SCRIPT FLUSH between calls: the scripts are reloaded by themselves and each call is
    charged exactly once."""
    account_id, key = admin.funded(["mock-model"], amount="5.00")
    body = {**CHAT, "model": "mock-model"}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for _ in range(3):
            redis_client.script_flush()
            async with session.post(
                gateway.url + "/v1/chat/completions", data=orjson.dumps(body)
            ) as r:
                assert r.status == 200
    _, records = assert_invariant(admin, redis_client, account_id, micros("5.00"))
    assert len(records) == 3
    assert len({r["request_id"] for r in records}) == 3


def test_refuses_a_store_that_may_evict(
    tmp_path: Path, make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A store with an allkeys-* (or volatile-*) eviction policy is refused at start."""
    store = EmbeddedStore(tmp_path / "evicting")
    url = store.start()
    client = redis.Redis.from_url(url)
    client.config_set("maxmemory-policy", "allkeys-lru")
    client.close()
    try:
        gw = make_gateway(
            [model_entry("m", mock_a.url, upstream_model="mock-model")],
            store={"url": url},
            wait=False,
        )
        assert gw.popen.wait(timeout=30) == 1
        assert "maxmemory-policy is 'allkeys-lru'" in gw.log()
    finally:
        store.stop()


async def test_settlement_is_idempotent_per_request(
    redis_client: redis.Redis, admin: Admin, valkey: EmbeddedStore
) -> None:
    """Settling the same request id twice charges once (the second answers `duplicate`)."""
    account_id, _ = admin.funded(["mock-model"], amount="1.00")
    client = aioredis.Redis.from_url(valkey.url)
    ledger = Ledger(client)
    record = {"request_id": "req_dup", "time": 1, "kind": "inference", "cost": 1000}
    first = await ledger.settle(account_id, "req_dup", 1000, 1, record)
    second = await ledger.settle(account_id, "req_dup", 1000, 1, record)
    await client.aclose()
    assert (first.code, second.code) == ("ok", "duplicate")
    assert redis_client.hget(account_keys(account_id).account, "balance") == b"999000"


async def test_settlement_the_store_missed_is_retried_after_the_answer(
    make_gateway: Callable[..., Proc], mock_a: Proc, own_store: EmbeddedStore
) -> None:
    """The store goes away while a call is with the upstream: the client still gets its
    answer, and the settlement, retried in the background, lands exactly once when the store
    is back (long before the hold's lease would hand it to the sweeper)."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        store={"url": own_store.url},
        billing={"hold_lease": "60s"},
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        slow = session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(CHAT),
            headers={"x-mock-ttft": "1.0"},
        )
        pending = asyncio.ensure_future(slow)
        await asyncio.sleep(0.4)  # admitted and held; the upstream is still thinking
        own_store.stop()
        response = await pending
        assert response.status == 200
        answer = orjson.loads(await response.read())
        await asyncio.sleep(0.5)  # the first tries fail against the stopped store
        own_store.start()
    client = redis.Redis.from_url(own_store.url)
    try:
        _, records = assert_invariant(admin, client, account_id, micros("5.00"))
    finally:
        client.close()
    assert len(records) == 1
    assert int(records[0]["prompt_tokens"]) == answer["usage"]["prompt_tokens"]
    assert int(records[0]["completion_tokens"]) == answer["usage"]["completion_tokens"]
