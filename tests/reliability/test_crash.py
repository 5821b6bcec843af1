"""A gateway killed with SIGKILL mid-stream: its holds are settled from their checkpoints."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import aiohttp
import orjson
import redis

from gateway.ledger.keys import account_keys
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, expected_cost, micros, wait_no_holds
from tests.conftest import model_entry
from tests.procs import Proc

CHECKPOINT_TOKENS = 10
BILLING = {"hold_lease": "1s", "checkpoint_tokens": CHECKPOINT_TOKENS, "sweep_interval": "100ms"}


async def _read_tokens(url: str, key: str, seen: list[int]) -> None:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "a very long story"}],
        "max_tokens": 400,
        "stream": True,
    }
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
            session.post(
                url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"x-mock-token-delay": "0.02"},
            ) as resp,
        ):
            async for line in resp.content:
                if b'"content":"' in line and b'"content":""' not in line:
                    seen[0] += 1
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        return


async def test_sigkill_mid_stream_loses_at_most_one_checkpoint(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """Kill the gateway serving three streams; another instance's sweeper settles each hold as
    an `orphaned` record billed from its last checkpoint. The tokens delivered to the client
    but not billed are fewer than `checkpoint_tokens`, and the money invariant holds."""
    models = [model_entry("m", mock_a.url, upstream_model="mock-model")]
    victim = make_gateway(models, billing=BILLING)
    survivor = make_gateway(models, billing=BILLING)
    admin = Admin(survivor.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    seen = [[0], [0], [0]]
    tasks = [asyncio.create_task(_read_tokens(victim.url, key, counter)) for counter in seen]
    deadline = time.monotonic() + 10
    while min(c[0] for c in seen) < 60:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    victim.stop(signal.SIGKILL)
    await asyncio.gather(*tasks)
    wait_no_holds(redis_client, account_id, timeout=15)
    _, records = assert_invariant(admin, redis_client, account_id, micros("10.00"))
    assert len(records) == 3
    delivered = sorted(c[0] for c in seen)
    billed = sorted(r["completion_tokens"] for r in records)
    for record in records:
        assert record["status"] == "orphaned"
        assert micros(record["cost"]) == expected_cost(
            record["prompt_tokens"], record["completion_tokens"], "0.15", "0.60"
        )
    lost = [d - b for d, b in zip(delivered, billed, strict=True)]
    print(f"delivered {delivered}, billed {billed}, lost {lost}")
    assert all(0 <= x < CHECKPOINT_TOKENS for x in lost), (delivered, billed)


async def test_live_long_call_keeps_its_hold(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A call that outlives several lease periods (a slow first byte) is not swept: its
    gateway renews the lease, and it settles normally."""
    models = [model_entry("m", mock_a.url, upstream_model="mock-model")]
    gw = make_gateway(models, billing=BILLING)
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            gw.url + "/v1/chat/completions", data=orjson.dumps(body), headers={"x-mock-ttft": "3"}
        ) as resp,
    ):
        assert resp.status == 200
        await resp.read()
    wait_no_holds(redis_client, account_id)
    (record,) = admin.usage(account_id)
    assert record["status"] == "ok"
    assert record["completion_tokens"] == 5


async def test_sigkill_mid_passthrough_call_bills_its_price(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A passthrough call whose gateway is killed while the upstream works is settled by
    another instance's sweeper at its flat price (its hold info carries the price, not token
    prices it does not have): one `orphaned` `passthrough` record, the invariant kept."""
    models = [model_entry("m", mock_a.url, upstream_model="mock-model")]
    proxy = {"passthrough": [{"path": "/v1/moderations", "price_per_call": "0.0025"}]}
    victim = make_gateway(models, billing=BILLING, proxy=proxy)
    survivor = make_gateway(models, billing=BILLING, proxy=proxy)
    admin = Admin(survivor.url)
    account_id, key = admin.funded(["m"], amount="1.00")

    async def call() -> None:
        try:
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
                session.post(
                    victim.url + "/v1/moderations",
                    data=orjson.dumps({"model": "m", "input": "slow"}),
                    headers={"x-mock-ttft": "5"},
                ) as resp,
            ):
                await resp.read()
        except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
            return

    task = asyncio.create_task(call())
    deadline = time.monotonic() + 10
    while not redis_client.hlen(account_keys(account_id).holds):
        assert time.monotonic() < deadline, "the call was never held"
        await asyncio.sleep(0.02)
    victim.stop(signal.SIGKILL)
    await task
    wait_no_holds(redis_client, account_id, timeout=15)
    _, records = assert_invariant(admin, redis_client, account_id, micros("1.00"))
    (record,) = records
    assert record["kind"] == "passthrough"
    assert record["status"] == "orphaned"
    assert record["cost"] == "0.002500"
