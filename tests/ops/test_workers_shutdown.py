"""`serve --workers N` and graceful shutdown: one store, shared limits, nothing left held."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros
from tests.conftest import GATEWAY_ENV, model_entry
from tests.procs import Proc, children, start_gateway, wait_dead

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _fresh_connection_call(url: str, key: str) -> int:
    """One call on a new connection (SO_REUSEPORT spreads connections over the workers)."""
    async with (
        aiohttp.ClientSession(
            headers={"Authorization": f"Bearer {key}"}, connector=aiohttp.TCPConnector()
        ) as session,
        session.post(url + "/v1/chat/completions", data=orjson.dumps(CHAT)) as resp,
    ):
        await resp.read()
        return resp.status


async def test_workers_share_one_store_port_metrics_and_limits(
    tmp_path: Path, mock_a: Proc
) -> None:
    """Two workers behind one port: the embedded store is started once, both workers serve,
    /metrics adds up every worker's calls, and a rate limit holds across them; SIGTERM stops
    the supervisor, the workers and the store."""
    config = {
        "store": {"url": "embedded", "data_dir": str(tmp_path / "store")},
        "rate_limits": {"requests": "12/minute"},
        "models": [model_entry("m", mock_a.url, upstream_model="mock-model")],
    }
    gw = start_gateway(tmp_path, config, env=GATEWAY_ENV, args=("--workers", "2"))
    try:
        deadline = time.monotonic() + 15
        while gw.log().count("gateway listening") < 2:
            assert time.monotonic() < deadline, gw.log()
            await asyncio.sleep(0.05)
        kids = children(gw.pid)
        valkeys = [pid for pid, cmd in kids if b"valkey-server" in cmd]
        workers = [pid for pid, cmd in kids if b"--worker" in cmd]
        assert len(valkeys) == 1
        assert len(workers) == 2
        _, key = Admin(gw.url).funded(["m"])
        statuses = [await _fresh_connection_call(gw.url, key) for _ in range(16)]
        assert statuses.count(200) == 12
        assert statuses.count(429) == 4
        async with aiohttp.ClientSession() as session:
            totals = set()
            for _ in range(4):  # whichever worker answers, the sum is the same
                async with session.get(gw.url + "/metrics", headers={"Connection": "close"}) as r:
                    text = await r.text()
                totals.add(
                    sum(
                        s.value
                        for f in text_string_to_metric_families(text)
                        if f.name == "gateway_requests"
                        for s in f.samples
                        if s.name == "gateway_requests_total"
                    )
                )
        assert totals == {16.0}
        listening = [e for e in gw.events() if e.get("event") == "gateway listening"]
        assert len({event["pid"] for event in listening}) == 2
    finally:
        code = gw.stop(signal.SIGTERM, timeout=30)
    assert code == 0
    for pid, _ in kids:
        assert await asyncio.to_thread(wait_dead, pid), f"process {pid} outlived the supervisor"


async def _stream(url: str, key: str, max_tokens: int, out: dict[str, Any], name: str) -> None:
    body = {**CHAT, "max_tokens": max_tokens, "stream": True}
    received = b""
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
            session.post(
                url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"x-mock-token-delay": "0.2"},
            ) as resp,
        ):
            async for chunk in resp.content.iter_any():
                received += chunk
        out[name] = ("complete", received)
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        out[name] = ("cut", received)


async def test_sigterm_drains_then_settles_every_call(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis, admin: Admin
) -> None:
    """On SIGTERM the gateway stops accepting, lets streams finish within the drain time, cuts
    the rest at its end, settles every one (a usage record each, nothing left held) and exits 0."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        server={"drain_timeout": "1.5s"},
    )
    account_id, key = Admin(gw.url).funded(["m"], amount="10.00")
    results: dict[str, Any] = {}
    tasks = [
        asyncio.create_task(_stream(gw.url, key, 3, results, "short")),
        *(asyncio.create_task(_stream(gw.url, key, 40, results, f"long{i}")) for i in range(3)),
    ]
    await asyncio.sleep(0.5)
    stopped_at = time.monotonic()
    gw.popen.send_signal(signal.SIGTERM)
    await asyncio.sleep(0.2)
    with pytest.raises(aiohttp.ClientConnectionError):
        await _fresh_connection_call(gw.url, key)
    await asyncio.gather(*tasks)
    code = await asyncio.to_thread(gw.popen.wait, 30)
    assert code == 0
    assert time.monotonic() - stopped_at < 10
    assert results["short"][0] == "complete"
    assert results["short"][1].endswith(b"data: [DONE]\n\n")
    for i in range(3):
        state, received = results[f"long{i}"]
        assert state == "cut"
        assert b"[DONE]" not in received
    # The gateway is gone: read the account through the shared gateway on the same store.
    _, records = assert_invariant(admin, redis_client, account_id, micros("10.00"))
    statuses = sorted(r["status"] for r in records)
    assert statuses == ["interrupted", "interrupted", "interrupted", "ok"]
    for record in records:
        if record["status"] == "interrupted":
            assert 0 < record["completion_tokens"] < 40
