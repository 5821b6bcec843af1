"""200 concurrent calls on a balance that covers about 50: exact admission, never below zero."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import orjson
import redis

from gateway.ledger.keys import account_keys
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros
from tests.conftest import model_entry
from tests.procs import Proc

MAX_TOKENS = 100


async def test_200_concurrent_calls_on_50_holds(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """Each call holds exactly what it will cost, so exactly floor(balance / hold) calls are
    admitted whatever the interleaving; the rest get 402; the balance never dips below zero
    and ends at top-ups minus the recorded costs, with no hold left open."""
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    # 1 micro-unit per input token and 2 per output token: the hold is prompt + 2 * 100.
    entry["pricing"] = {"input_per_million": "1", "output_per_million": "2"}
    gw = make_gateway([entry])
    admin = Admin(gw.url)
    messages = [{"role": "user", "content": "Tell me about the concurrency of ledgers."}]

    # The hold of one call, from the upstream's own count of this prompt.
    probe_id, probe_key = admin.funded(["m"], amount="1.00")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {probe_key}"}) as s:
        body = orjson.dumps({"model": "m", "messages": messages, "max_tokens": MAX_TOKENS})
        async with s.post(gw.url + "/v1/chat/completions", data=body) as resp:
            prompt_tokens = orjson.loads(await resp.read())["usage"]["prompt_tokens"]
    hold = prompt_tokens + 2 * MAX_TOKENS
    balance = 50 * hold + hold // 2
    account_id = admin.create_account()
    admin.topup(account_id, f"{balance // 1_000_000}.{balance % 1_000_000:06d}")
    admin.subscribe(account_id, "m")
    key = admin.new_key(account_id)

    lowest = balance
    done = asyncio.Event()
    balance_key = account_keys(account_id).account

    async def watch() -> None:
        nonlocal lowest
        while not done.is_set():
            value = int(redis_client.hget(balance_key, "balance") or 0)
            lowest = min(lowest, value)
            await asyncio.sleep(0.002)

    async def one(i: int, session: aiohttp.ClientSession) -> int:
        payload = {
            "model": "m",
            "messages": messages,
            "max_tokens": MAX_TOKENS,
            "stream": i % 2 == 0,
        }
        async with session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(payload),
            headers={"x-mock-ttft": "0.05"},
        ) as resp:
            await resp.read()
            return resp.status

    connector = aiohttp.TCPConnector(limit=200)
    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(
        connector=connector, headers={"Authorization": f"Bearer {key}"}
    ) as session:
        statuses = await asyncio.gather(*(one(i, session) for i in range(200)))
    done.set()
    await watcher

    assert statuses.count(200) == 50, sorted(set(statuses))
    assert statuses.count(402) == 150
    assert lowest >= 0
    account, records = assert_invariant(admin, redis_client, account_id, balance)
    assert len(records) == 50
    assert all(micros(r["cost"]) == hold for r in records)
    assert micros(account["balance"]) == balance - 50 * hold
    assert account["state"] == "active"
    assert_invariant(admin, redis_client, probe_id, micros("1.00"))
