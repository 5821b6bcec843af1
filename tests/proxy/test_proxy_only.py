"""`billing.metering: false`: a pure proxy, for measuring the proxy alone."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson
import redis

from tests.conftest import model_entry
from tests.procs import Proc


async def test_metering_off_forwards_without_key_or_ledger(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """With metering off, calls need no key, reach the upstream unchanged and write nothing to
    the store; /v1/models lists every configured model."""
    gw = make_gateway([model_entry("mock-model", mock_a.url)], billing={"metering": False})
    before = redis_client.dbsize()
    body = orjson.dumps(
        {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    )
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/v1/chat/completions", data=body) as resp:
            assert resp.status == 200
            answer = await resp.read()
        async with session.get(mock_a.url + "/debug/last-request") as resp:
            seen = await resp.json()
        async with session.get(gw.url + "/v1/models") as resp:
            models = await resp.json()
    assert answer.endswith(b"data: [DONE]\n\n")
    assert b'"usage"' not in answer
    assert seen["body"] == body.decode()
    assert [m["id"] for m in models["data"]] == ["mock-model"]
    assert redis_client.dbsize() == before
