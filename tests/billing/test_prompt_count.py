"""The gateway's own prompt count equals the figures OpenAI published, and big prompts are
counted off the event loop.

The oracle is the table below: the prompt_tokens the OpenAI API reported for the examples of
the cookbook "How to count tokens with tiktoken" (openai/openai-cookbook,
examples/How_to_count_tokens_with_tiktoken.ipynb, sections 6 and 7), one row per model the
notebook prints. The mock upstream is not an oracle here (it counts with a rule of its own).
"""

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
from tests.billing.checks import one_usage_record
from tests.procs import Proc

# Section 6, "Counting tokens for chat completions API calls": `example_messages`.
COOKBOOK_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful, pattern-following assistant that translates corporate "
        "jargon into plain English.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "New synergies will help drive top-line growth.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Things working well together will increase revenue.",
    },
    {
        "role": "system",
        "name": "example_user",
        "content": "Let's circle back when we have more bandwidth to touch base on opportunities "
        "for increased leverage.",
    },
    {
        "role": "system",
        "name": "example_assistant",
        "content": "Let's talk later when we're less busy about how to do better.",
    },
    {
        "role": "user",
        "content": "This late pivot means we don't have time to boil the ocean for the client "
        "deliverable.",
    },
]

# Section 7, "Counting tokens for chat completions with tool calls": `tools`, `example_messages`.
COOKBOOK_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "function": {
            "name": "get_current_weather",
            "description": "Get the current weather in a given location",
            "parameters": {
                "type": "object",
                "properties": {
                    "location": {
                        "type": "string",
                        "description": "The city and state, e.g. San Francisco, CA",
                    },
                    "unit": {
                        "type": "string",
                        "description": "The unit of temperature to return",
                        "enum": ["celsius", "fahrenheit"],
                    },
                },
                "required": ["location"],
            },
        },
    }
]
COOKBOOK_TOOL_MESSAGES: list[dict[str, Any]] = [
    {
        "role": "system",
        "content": "You are a helpful assistant that can answer to questions about the weather.",
    },
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]

MESSAGES_CALL = {"messages": COOKBOOK_MESSAGES}
TOOLS_CALL = {"messages": COOKBOOK_TOOL_MESSAGES, "tools": COOKBOOK_TOOLS}
# The same functions in the legacy `functions` parameter: no figure of its own is published;
# OpenAI renders functions and tools into the same prompt text, so the tools figure holds.
FUNCTIONS_CALL = {
    "messages": COOKBOOK_TOOL_MESSAGES,
    "functions": [tool["function"] for tool in COOKBOOK_TOOLS],
}

# (model the notebook ran, its tiktoken encoding, request, prompt_tokens the API reported)
PUBLISHED: list[tuple[str, str, dict[str, Any], int]] = [
    ("gpt-3.5-turbo", "cl100k_base", MESSAGES_CALL, 129),
    ("gpt-4-0613", "cl100k_base", MESSAGES_CALL, 129),
    ("gpt-4", "cl100k_base", MESSAGES_CALL, 129),
    ("gpt-4o", "o200k_base", MESSAGES_CALL, 124),
    ("gpt-4o-mini", "o200k_base", MESSAGES_CALL, 124),
    ("gpt-3.5-turbo", "cl100k_base", TOOLS_CALL, 105),
    ("gpt-4", "cl100k_base", TOOLS_CALL, 105),
    ("gpt-4o", "o200k_base", TOOLS_CALL, 101),
    ("gpt-4o-mini", "o200k_base", TOOLS_CALL, 101),
]
LEGACY_FUNCTIONS: list[tuple[str, str, dict[str, Any], int]] = [
    (model, encoding, FUNCTIONS_CALL, figure)
    for model, encoding, call, figure in PUBLISHED
    if call is TOOLS_CALL
]


def _ids(rows: list[tuple[str, str, dict[str, Any], int]]) -> list[str]:
    names = {id(MESSAGES_CALL): "messages", id(TOOLS_CALL): "tools", id(FUNCTIONS_CALL): "fns"}
    return [f"{names[id(call)]}-{model}-{figure}" for model, _, call, figure in rows]


@pytest.mark.parametrize(("model", "encoding", "call", "figure"), PUBLISHED, ids=_ids(PUBLISHED))
def test_published_figures(model: str, encoding: str, call: dict[str, Any], figure: int) -> None:
    """The gateway counts, for each example and model of the cookbook, the prompt_tokens the
    OpenAI API reported."""
    assert count_prompt_sync("chat", {"model": model, **call}, get_encoding(encoding)) == figure


@pytest.mark.parametrize(
    ("model", "encoding", "call", "figure"), LEGACY_FUNCTIONS, ids=_ids(LEGACY_FUNCTIONS)
)
def test_legacy_functions_count_as_tools(
    model: str, encoding: str, call: dict[str, Any], figure: int
) -> None:
    """The legacy `functions` parameter is counted, with the tools formula: the cookbook's
    tools passed as functions count what the API reported for the tools."""
    assert count_prompt_sync("chat", {"model": model, **call}, get_encoding(encoding)) == figure


@pytest.mark.parametrize(("model", "encoding", "call", "figure"), PUBLISHED, ids=_ids(PUBLISHED))
async def test_published_figures_off_the_loop(
    model: str, encoding: str, call: dict[str, Any], figure: int
) -> None:
    """Counted on a worker thread (a body over OFFLOAD_BYTES), the figures are the same."""
    counted = await count_prompt("chat", call, get_encoding(encoding), OFFLOAD_BYTES + 1)
    assert counted == figure


def _tokens(encoding: str, text: str) -> int:
    return len(get_encoding(encoding).encode_ordinary(text))


@pytest.mark.parametrize("encoding", ["cl100k_base", "o200k_base"])
def test_tool_choice_and_function_call(encoding: str) -> None:
    """The documented approximation (OpenAI publishes no rule): "none" adds 1 token, naming a
    function adds 7 (tool_choice) or 4 (function_call) plus its name's tokens, "auto" and
    "required" add nothing."""
    enc = get_encoding(encoding)
    name = "get_current_weather"
    base = count_prompt_sync("chat", TOOLS_CALL, enc)
    legacy = count_prompt_sync("chat", FUNCTIONS_CALL, enc)
    named_tool = {"type": "function", "function": {"name": name}}
    choices = [("auto", 0), ("required", 0), ("none", 1), (named_tool, 7 + _tokens(encoding, name))]
    for choice, extra in choices:
        assert count_prompt_sync("chat", {**TOOLS_CALL, "tool_choice": choice}, enc) == base + extra
    calls = [("auto", 0), ("none", 1), ({"name": name}, 4 + _tokens(encoding, name))]
    for call, extra in calls:
        payload = {**FUNCTIONS_CALL, "function_call": call}
        assert count_prompt_sync("chat", payload, enc) == legacy + extra


def test_what_the_formula_does_not_cover() -> None:
    """The documented approximations: a nested schema adds nothing beyond its property's own
    line, a tool that is not a function counts as its compact JSON."""
    enc = get_encoding("o200k_base")
    messages = [{"role": "user", "content": "hi"}]
    flat = {
        "type": "function",
        "function": {
            "name": "f",
            "parameters": {"type": "object", "properties": {"p": {"type": "object"}}},
        },
    }
    nested = orjson.loads(orjson.dumps(flat))
    nested["function"]["parameters"]["properties"]["p"]["properties"] = {"q": {"type": "string"}}
    flat_count = count_prompt_sync("chat", {"messages": messages, "tools": [flat]}, enc)
    assert count_prompt_sync("chat", {"messages": messages, "tools": [nested]}, enc) == flat_count
    # 7 (function) + "f:" + 3 (properties) + 3 (one property) + "p:object:" + 12 (end)
    plain = count_prompt_sync("chat", {"messages": messages}, enc)
    f_line, p_line = _tokens("o200k_base", "f:"), _tokens("o200k_base", "p:object:")
    assert flat_count == plain + 7 + f_line + 3 + 3 + p_line + 12
    other = {"type": "custom", "custom": {"name": "grammar"}}
    counted = count_prompt_sync("chat", {"messages": messages, "tools": [other]}, enc)
    assert counted == plain + _tokens("o200k_base", orjson.dumps(other).decode())


@pytest.mark.parametrize(
    ("call", "figure"),
    [(MESSAGES_CALL, 124), (TOOLS_CALL, 101), (FUNCTIONS_CALL, 101)],
    ids=["messages", "tools", "functions"],
)
async def test_gateway_records_the_published_count(
    gateway: Proc, admin: Admin, call: dict[str, Any], figure: int
) -> None:
    """Through the gateway (a model on o200k_base), the usage record's own prompt count is
    the figure the API reported for gpt-4o; the bill follows the upstream's usage."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    payload = {"model": "mock-model", "max_tokens": 3, **call}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)) as resp,
    ):
        assert resp.status == 200
        reported = orjson.loads(await resp.read())["usage"]["prompt_tokens"]
    record = await one_usage_record(admin, account_id)
    assert record["gateway_prompt_tokens"] == figure
    assert record["usage_source"] == "upstream"
    assert record["prompt_tokens"] == reported


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
