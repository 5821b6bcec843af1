"""Clients that go away: before the first byte (timeouts, retries), and with a reset as a
stream ends. One rule for streams and non-streams: the prompt and what was relayed is billed,
as `client_disconnected`, and the upstream request is closed at once."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import orjson
import pytest
import redis
from aiohttp import web

from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, expected_cost, micros
from tests.conftest import model_entry
from tests.procs import Proc

UPSTREAM_DELAY_S = 2.0


class SlowUpstream:
    """A real HTTP model server on loopback that thinks for 2 s before answering and, like
    vLLM, notices a client that hangs up meanwhile (its handler is cancelled: an abort)."""

    def __init__(self) -> None:
        self.aborted: list[float] = []
        self.answered = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        try:
            await asyncio.sleep(UPSTREAM_DELAY_S)
        except asyncio.CancelledError:
            self.aborted.append(time.monotonic())
            raise
        self.answered += 1
        usage = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
        if body.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            chunk = {"id": "c", "object": "chat.completion.chunk", "choices": []}
            await response.write(b"data: " + orjson.dumps({**chunk, "usage": usage}) + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            return response
        message = {"role": "assistant", "content": "late"}
        return web.json_response(
            {
                "id": "c",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": usage,
            }
        )

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, handler_cancellation=True)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.fixture
async def slow_upstream() -> AsyncIterator[SlowUpstream]:
    upstream = SlowUpstream()
    await upstream.start()
    yield upstream
    await upstream.stop()


def _usage_records(admin: Admin, account_id: str, want: int, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        records = admin.usage(account_id)
        if len(records) >= want or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
async def test_sdk_timeout_with_retries_bills_each_attempt_its_prompt_only(
    make_gateway: Callable[..., Proc],
    slow_upstream: SlowUpstream,
    redis_client: redis.Redis,
    stream: bool,
) -> None:
    """OpenAI's SDK with `timeout=1, max_retries=2` against an upstream that needs 2 s: three
    attempts, each given up by the client before a byte came. Each is billed its prompt only
    (`client_disconnected`, no completion tokens), not the answer nobody received, and the
    upstream sees each request closed as soon as its client left (an abort), none answered."""
    gw = make_gateway([model_entry("m", slow_upstream.url)])
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, timeout=1, max_retries=2)
    started = time.monotonic()

    async def attempt() -> None:
        messages: Any = [{"role": "user", "content": "hello there"}]
        if not stream:
            await client.chat.completions.create(model="m", messages=messages)
            return
        answer = await client.chat.completions.create(model="m", messages=messages, stream=True)
        async for _ in answer:
            pass

    with pytest.raises(openai.APITimeoutError):
        await attempt()
    await client.close()
    records = await asyncio.to_thread(_usage_records, admin, account_id, 3)
    assert len(records) == 3, records
    assert len({r["request_id"] for r in records}) == 3
    for record in records:
        assert record["status"] == "client_disconnected", record
        assert record["completion_tokens"] == 0
        assert record["usage_source"] == "gateway"
        assert micros(record["cost"]) == expected_cost(record["prompt_tokens"], 0, "0.15", "0.60")
    await asyncio.sleep(0.2)
    assert len(slow_upstream.aborted) == 3
    assert slow_upstream.answered == 0
    # Each abort came about a second after its attempt began, not after the upstream's 2 s.
    assert slow_upstream.aborted[0] - started < UPSTREAM_DELAY_S - 0.5
    assert_invariant(admin, redis_client, account_id, micros("5.00"))


async def _stream_then_reset(port: int, key: str) -> str:
    """Read a stream up to its `[DONE]`, then hang up with a TCP reset (SO_LINGER 0), as a
    client killed at that moment does. Returns the call's x-request-id."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = orjson.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "reset me"}], "stream": True}
    )
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    await writer.drain()
    seen = b""
    while b"data: [DONE]" not in seen:
        chunk = await reader.read(65536)
        assert chunk, seen
        seen += chunk
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    head = seen.split(b"\r\n\r\n", 1)[0].decode()
    for line in head.split("\r\n"):
        if line.lower().startswith("x-request-id:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(head)


async def test_reset_at_stream_end_is_never_a_500(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """150 clients reset their connection right after the stream's `[DONE]`: none is counted
    as a 500, and each call has exactly one usage record, `ok` or `client_disconnected`
    (never `interrupted`), billed for the whole answer it was sent."""
    gw = make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")])
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="50.00")
    port = int(gw.url.rsplit(":", 1)[1])
    gate = asyncio.Semaphore(30)

    async def one() -> str:
        async with gate:
            return await _stream_then_reset(port, key)

    request_ids = await asyncio.gather(*(one() for _ in range(150)))
    records = await asyncio.to_thread(_usage_records, admin, account_id, 150)
    by_id = {r["request_id"]: r for r in records}
    assert len(records) == 150
    assert sorted(by_id) == sorted(request_ids)
    assert {r["status"] for r in records} <= {"ok", "client_disconnected"}
    assert {r["completion_tokens"] for r in records} == {16}  # the mock's whole answer
    metrics = await asyncio.to_thread(admin.call, "GET", "/metrics")
    lines = metrics.body.decode().splitlines()
    assert not [line for line in lines if 'status="500"' in line], lines
    assert_invariant(admin, redis_client, account_id, micros("50.00"))
