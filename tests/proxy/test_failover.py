"""Round-robin over a model's upstreams, and failover while none has been reached."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson

from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.procs import Proc, free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def _last_request_id(session: aiohttp.ClientSession, mock: Proc) -> str | None:
    async with session.get(mock.url + "/debug/last-request") as resp:
        if resp.status != 200:
            return None
        data = await resp.json()
    if not data:
        return None
    headers = {k.lower(): v for k, v in data["headers"].items()}
    sent = headers.get("x-request-id")
    # The upstream gets the gateway's id as a UUID: the same 32 hex digits.
    return "req_" + sent.replace("-", "") if sent else None


async def test_round_robin_alternates_upstreams(
    make_gateway: Callable[..., Proc], mock_a: Proc, mock_b: Proc
) -> None:
    """Two equal upstreams take turns: consecutive calls land on different servers."""
    gw = make_gateway([model_entry("m", mock_a.url, mock_b.url, upstream_model="mock-model")])
    _, key = Admin(gw.url).funded(["m"])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        landed: list[str] = []
        for _ in range(4):
            async with session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(CHAT)) as r:
                assert r.status == 200
                request_id = r.headers["x-request-id"]
            on_a = await _last_request_id(session, mock_a) == request_id
            on_b = await _last_request_id(session, mock_b) == request_id
            assert on_a != on_b
            landed.append("a" if on_a else "b")
    assert landed in (["a", "b", "a", "b"], ["b", "a", "b", "a"])


async def test_failover_skips_an_unreachable_upstream(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """With one upstream refusing connections, every call is served by the other."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway([model_entry("m", dead, mock_a.url, upstream_model="mock-model")])
    _, key = Admin(gw.url).funded(["m"])
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for stream in (False, True, False, True):
            body = orjson.dumps({**CHAT, "stream": stream})
            async with session.post(gw.url + "/v1/chat/completions", data=body) as r:
                assert r.status == 200
                answer = await r.read()
                request_id = r.headers["x-request-id"]
            assert await _last_request_id(session, mock_a) == request_id
            if stream:
                assert answer.endswith(b"data: [DONE]\n\n")
            else:
                assert orjson.loads(answer)["object"] == "chat.completion"
