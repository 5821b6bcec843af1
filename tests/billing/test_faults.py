"""Calls that end badly: client disconnects, upstreams dying mid-stream or before the first
byte. Each is billed per SPEC section 3 and the money invariant stays exact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import orjson
import redis

from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros, wait_no_holds
from tests.conftest import model_entry
from tests.procs import Proc, free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "a long story please"}]}


async def _disconnect_after(session: aiohttp.ClientSession, url: str, chunks: int) -> int:
    """Read `chunks` content chunks of a paced stream, then hang up. Returns chunks seen."""
    body = orjson.dumps({**CHAT, "max_tokens": 40, "stream": True})
    seen = 0
    async with session.post(url, data=body, headers={"x-mock-token-delay": "0.05"}) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if b'"content":"' in line and b'"content":""' not in line:
                seen += 1
                if seen == chunks:
                    break
        resp.close()
    return seen


async def _status(
    session: aiohttp.ClientSession, url: str, body: dict[str, object], **hdr: str
) -> int:
    try:
        async with session.post(url, data=orjson.dumps(body), headers=hdr) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientPayloadError:
        return -1  # cut mid-stream


async def test_mixed_faults_keep_the_invariant(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A run mixing clean calls, client disconnects, mid-stream upstream deaths, upstream
    errors and failures before the first byte ends with balance == top-ups - recorded costs,
    no open hold, and each ending recorded with its status."""
    dead = f"http://127.0.0.1:{free_port()}"
    models = [
        {**model_entry("m", mock_a.url, upstream_model="mock-model")},
        {**model_entry("dead", dead, upstream_model="mock-model")},
    ]
    gw = make_gateway(models, proxy={"timeouts": {"first_byte": "500ms"}})
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m", "dead"], amount="50.00")
    url = gw.url + "/v1/chat/completions"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        jobs = []
        for i in range(6):
            jobs.append(_disconnect_after(session, url, 2 + i))
            jobs.append(
                _status(
                    session,
                    url,
                    {**CHAT, "max_tokens": 20, "stream": True},
                    **{"x-mock-disconnect-after": str(3 + i)},
                )
            )
            jobs.append(_status(session, url, {**CHAT, "max_tokens": 5, "stream": i % 2 == 0}))
            jobs.append(
                _status(session, url, {**CHAT, "max_tokens": 5}, **{"x-mock-status": "500"})
            )
            jobs.append(_status(session, url, {**CHAT, "max_tokens": 5}, **{"x-mock-ttft": "2"}))
            jobs.append(_status(session, url, {**CHAT, "model": "dead", "max_tokens": 5}))
        results = await asyncio.gather(*jobs)
    wait_no_holds(redis_client, account_id)
    _, records = assert_invariant(admin, redis_client, account_id, micros("50.00"))
    statuses = sorted(r["status"] for r in records)
    assert statuses.count("client_disconnected") == 6
    assert statuses.count("upstream_error") == 6
    assert statuses.count("ok") == 6
    # Upstream error answers (500), first-byte timeouts (504) and unreachable (502) cost nothing
    # and leave no record.
    assert len(records) == 18
    assert (
        sorted(r for r in results if isinstance(r, int) and r >= 500)
        == [500] * 6 + [502] * 6 + [504] * 6
    )


async def test_client_disconnect_is_billed_for_what_was_produced(
    gateway: Proc, admin: Admin, redis_client: redis.Redis
) -> None:
    """A client that hangs up after 3 tokens of 40 is billed by the gateway's count of what the
    upstream produced until the gateway stopped it: at least 3 tokens, well short of 40."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        body = orjson.dumps(
            {"model": "mock-model", "messages": CHAT["messages"], "max_tokens": 40, "stream": True}
        )
        async with session.post(
            gateway.url + "/v1/chat/completions", data=body, headers={"x-mock-token-delay": "0.05"}
        ) as resp:
            seen = 0
            async for line in resp.content:
                if b'"content":"' in line and b'"content":""' not in line:
                    seen += 1
                    if seen == 3:
                        break
            resp.close()
    _, records = assert_invariant(admin, redis_client, account_id, micros("10.00"))
    (record,) = records
    assert record["status"] == "client_disconnected"
    assert record["usage_source"] == "gateway"
    assert 3 <= record["completion_tokens"] < 40
    assert record["prompt_tokens"] > 0
    assert micros(record["cost"]) > 0


async def test_upstream_death_mid_stream_bills_what_was_delivered(
    gateway: Proc, admin: Admin, redis_client: redis.Redis
) -> None:
    """An upstream that dies after 5 tokens: the call is billed for exactly those 5."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        status = await _status(
            session,
            gateway.url + "/v1/chat/completions",
            {"model": "mock-model", "messages": CHAT["messages"], "max_tokens": 30, "stream": True},
            **{"x-mock-disconnect-after": "5"},
        )
    assert status == -1
    _, records = assert_invariant(admin, redis_client, account_id, micros("10.00"))
    (record,) = records
    assert record["status"] == "upstream_error"
    assert record["completion_tokens"] == 5
    assert record["usage_source"] == "gateway"
