"""The gateway's own prompt count equals what the upstream reports, and big prompts are
counted off the event loop."""

from __future__ import annotations

import asyncio
import gc
import random
import time
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.metering.prompt import OFFLOAD_BYTES, count_prompt, count_prompt_sync
from gateway.metering.tokenizers import get_encoding
from tests.admin_client import Admin
from tests.procs import Proc

CORPUS: list[dict[str, Any]] = [
    {"messages": [{"role": "user", "content": "Hello!"}]},
    {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "And of Japan?"},
        ]
    },
    {"messages": [{"role": "user", "name": "alice_smith", "content": "Named speaker."}]},
    {"messages": [{"role": "user", "content": "日本語のテキストと中文和한국어 😀🚀 émigré naïve"}]},
    {"messages": [{"role": "user", "content": "Special text <|endoftext|> and <|fim_prefix|>"}]},
    {"messages": [{"role": "user", "content": "def f(x):\n    return x ** 2\n\n\tprint(f(3))"}]},
    {"messages": [{"role": "user", "content": "1234567890 3.14159 -42 1e10 0xFF"}]},
    {"messages": [{"role": "user", "content": ""}]},
    {"messages": [{"role": "user", "content": "   leading and trailing spaces   \n\n"}]},
    {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Describe this picture."},
                    {"type": "text", "text": "Second part."},
                ],
            }
        ]
    },
    {
        "messages": [
            {"role": "user", "content": "What's the weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city": "Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": -3}'},
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "weather",
                    "description": "Current weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    },
    {"messages": [{"role": "user", "content": "word " * 3000}]},
]


def _random_text(rng: random.Random, n: int) -> str:
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFG 0123456789 .,;:!?'\"()[]{}\n\tßçø漢字😀"
    return "".join(rng.choice(alphabet) for _ in range(n))


RNG = random.Random(20261126)
CORPUS += [
    {"messages": [{"role": "user", "content": _random_text(RNG, RNG.randint(1, 400))}]}
    for _ in range(12)
]


@pytest.mark.parametrize("index", range(len(CORPUS)))
async def test_local_prompt_count_equals_upstream(gateway: Proc, admin: Admin, index: int) -> None:
    """For each request of a varied corpus, the usage record's gateway count of prompt tokens
    equals the prompt tokens the upstream reported (and billed)."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    payload = {"model": "mock-model", "max_tokens": 3, **CORPUS[index]}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)) as resp,
    ):
        assert resp.status == 200
        reported = orjson.loads(await resp.read())["usage"]["prompt_tokens"]
    (record,) = admin.usage(account_id)
    assert record["usage_source"] == "upstream"
    assert record["prompt_tokens"] == reported
    # The gateway's own count, recorded beside the upstream's, agrees.
    assert record["gateway_prompt_tokens"] == reported
    assert count_prompt_sync("chat", payload, get_encoding("o200k_base")) == reported


async def test_large_prompt_does_not_stall_the_event_loop() -> None:
    """While an ~8 MB prompt is counted, the event loop keeps turning: its longest pause is a
    small fraction of the time the count takes when run on the loop itself."""
    encoding = get_encoding("o200k_base")
    rng = random.Random(7)
    words = ["alpha", "beta", "sea", "model", "token", "ocean", "月", "😀", "def f(x):", "\n"]
    text = " ".join(rng.choice(words) for _ in range(1_600_000))
    payload = {"messages": [{"role": "user", "content": text}]}
    assert len(text) > OFFLOAD_BYTES

    started = time.perf_counter()
    expected = count_prompt_sync("chat", payload, encoding)
    on_loop = time.perf_counter() - started

    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    # The counting thread's allocations set off full collections, which pause every thread
    # for as long as the heap takes to scan: in this process the heap holds the whole test
    # session's objects (a gateway's holds its own), so they are set aside for the measure.
    gc.collect()
    gc.freeze()
    try:
        task = asyncio.create_task(ticker())
        await asyncio.sleep(0.01)
        counted = await count_prompt("chat", payload, encoding, len(text))
        stop.set()
        await task
    finally:
        gc.unfreeze()
    assert counted == expected
    assert max(gaps) < on_loop / 3, (max(gaps), on_loop)
