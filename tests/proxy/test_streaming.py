"""Streams are relayed as they arrive, never buffered to the end."""

from __future__ import annotations

import time

import aiohttp
import orjson

from tests.procs import Proc


async def test_first_chunk_arrives_before_upstream_sends_the_last(
    gateway: Proc, auth: dict[str, str]
) -> None:
    """With 20 tokens 100 ms apart, the first content chunk reaches the client while the
    upstream still has most of the answer to send."""
    payload = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "count"}],
        "max_tokens": 20,
        "stream": True,
    }
    arrivals: list[float] = []
    started = time.monotonic()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            data=orjson.dumps(payload),
            headers={"x-mock-token-delay": "0.1", **auth},
        ) as resp,
    ):
        assert resp.status == 200
        async for line in resp.content:
            if (
                line.startswith(b"data: {")
                and b'"content":"' in line
                and b'"content":""' not in line
            ):
                arrivals.append(time.monotonic() - started)
    assert len(arrivals) == 20
    total = arrivals[-1]
    assert total >= 1.8  # the upstream really paced the tokens
    # The first token left the upstream ~0.1 s in; had the gateway buffered, it would
    # arrive with the last one, ~1.9 s later.
    assert arrivals[0] < total - 1.2
    # And the tokens arrive spread out, not in one burst.
    assert arrivals[10] - arrivals[0] > 0.7


async def test_openai_sdk_streams_through_the_gateway(gateway: Proc, api_key: str) -> None:
    """The official SDK, pointed at the gateway, reads a stream token by token."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key=api_key)
    stream = await client.chat.completions.create(
        model="mock-model",
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces: list[str] = []
    usage = None
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    await client.close()
    assert len(pieces) == 7
    assert usage is not None
    assert usage.completion_tokens == 7
