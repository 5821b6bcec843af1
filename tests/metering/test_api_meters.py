"""The Responses and Messages APIs' local counts, usage readers and stream meters.

Oracles nobody here wrote: the OpenAI cookbook's published tools figure (105 on cl100k_base,
101 on o200k_base) for the same request written as a Responses and as a Messages request
(both render into the chat template); Anthropic's vision guide's image figures; the official
SDKs' event types (pydantic models from `openai` and `anthropic`) for the clean ends the
gateway writes when it stops a stream."""

from __future__ import annotations

import base64
import struct
import zlib
from typing import Any

import orjson
import pydantic
import pytest
from anthropic.types import RawMessageStreamEvent
from openai.types.responses import ResponseStreamEvent

from gateway.metering.events import MessagesMeter, ResponsesMeter, meter_class
from gateway.metering.prompt import count_prompt_sync
from gateway.metering.prompt_apis import anthropic_image_tokens
from gateway.metering.tokenizers import get_encoding
from gateway.metering.usage import read_messages_usage, read_responses_usage
from gateway.pricing import TokenUsage
from tests.billing.test_prompt_count import COOKBOOK_TOOL_MESSAGES, COOKBOOK_TOOLS

RESPONSE_EVENTS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(ResponseStreamEvent)
MESSAGE_EVENTS: pydantic.TypeAdapter[Any] = pydantic.TypeAdapter(RawMessageStreamEvent)
SYSTEM, USER = (m["content"] for m in COOKBOOK_TOOL_MESSAGES)
FUNCTION = COOKBOOK_TOOLS[0]["function"]


def _responses_request() -> dict[str, Any]:
    return {
        "model": "gpt-4o",
        "instructions": SYSTEM,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": USER}]}],
        "tools": [{"type": "function", **FUNCTION}],
    }


def _messages_request() -> dict[str, Any]:
    return {
        "model": "claude",
        "max_tokens": 10,
        "system": [{"type": "text", "text": SYSTEM}],
        "messages": [{"role": "user", "content": USER}],
        "tools": [
            {
                "name": FUNCTION["name"],
                "description": FUNCTION["description"],
                "input_schema": FUNCTION["parameters"],
            }
        ],
    }


@pytest.mark.parametrize(("encoding", "figure"), [("cl100k_base", 105), ("o200k_base", 101)])
@pytest.mark.parametrize("kind", ["responses", "messages"])
def test_the_cookbook_tools_figure_holds_for_both_apis(
    kind: str, encoding: str, figure: int
) -> None:
    """The cookbook's tools example, written in each API's own shape, counts what the API
    reported for it as a chat request."""
    payload = _responses_request() if kind == "responses" else _messages_request()
    assert count_prompt_sync(kind, payload, get_encoding(encoding)) == figure  # type: ignore[arg-type]


def test_responses_items_count_as_their_chat_messages() -> None:
    """A function call and its output count as the assistant tool call and tool message
    they are in chat; a string input is one user message; unknown items add nothing."""
    enc = get_encoding("o200k_base")
    call = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    responses = {
        "input": [
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": "c1", **call},
            {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
            {"type": "item_reference", "id": "x"},
        ]
    }
    chat = {
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]},
            {"role": "tool", "content": "sunny"},
        ]
    }
    assert count_prompt_sync("responses", responses, enc) == count_prompt_sync("chat", chat, enc)
    plain = count_prompt_sync("responses", {"input": "Hello there"}, enc)
    assert plain == 3 + 3 + 1 + len(enc.encode_ordinary("Hello there"))


def _png(width: int, height: int) -> str:
    """The base64 of a PNG's signature and header chunk (all the size reader needs)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + header
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + header))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


@pytest.mark.parametrize(
    ("width", "height", "figure"), [(200, 200, 54), (1000, 1000, 1334), (1092, 1092, 1590)]
)
def test_anthropic_images_cost_the_vision_guides_figures(
    width: int, height: int, figure: int
) -> None:
    """Anthropic's vision guide: tokens = width * height / 750 (its table: 200x200 ~54,
    1000x1000 ~1334, 1092x1092 ~1590), read from the image block's base64 header."""
    assert anthropic_image_tokens(width, height) == figure
    enc = get_encoding("o200k_base")
    image = {
        "type": "image",
        "source": {"type": "base64", "media_type": "image/png", "data": _png(width, height)},
    }
    text_only = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    with_image = {
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]
    }
    assert (
        count_prompt_sync("messages", with_image, enc)
        == count_prompt_sync("messages", text_only, enc) + figure
    )


def test_a_large_image_is_scaled_to_fit_first() -> None:
    """A 1568 px long edge, and no more pixels than 784x1568: 2000x1000 is 1568x784 (1640
    tokens, not 2667); 3000x2000 is scaled by sqrt(784*1568 / 6e6) to 1357x905 (1638)."""
    assert anthropic_image_tokens(2000, 1000) == -(-(1568 * 784) // 750)
    assert anthropic_image_tokens(3000, 2000) == -(-(1357 * 905) // 750)


def test_usage_readers_put_every_input_token_in_the_prompt() -> None:
    """Messages' input_tokens leave out the cache reads and writes; Responses' include its
    cached tokens."""
    assert read_messages_usage(
        {
            "input_tokens": 10,
            "cache_read_input_tokens": 100,
            "cache_creation_input_tokens": 20,
            "output_tokens": 7,
        }
    ) == TokenUsage(130, 7, 100, 20)
    assert read_messages_usage(
        {"input_tokens": 10, "cache_creation_input_tokens": None, "output_tokens": 7}
    ) == TokenUsage(10, 7)
    assert read_messages_usage({"input_tokens": 10}) is None
    assert read_responses_usage(
        {
            "input_tokens": 50,
            "input_tokens_details": {"cached_tokens": 30},
            "output_tokens": 9,
            "output_tokens_details": {"reasoning_tokens": 4},
            "total_tokens": 59,
        }
    ) == TokenUsage(50, 9, 30, 0, 4)
    assert read_responses_usage({"input_tokens": "50", "output_tokens": 1}) is None


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def test_a_messages_stream_merges_its_usage_and_counts_as_reported_only_at_its_end() -> None:
    meter = MessagesMeter()
    usage = {"input_tokens": 12, "cache_read_input_tokens": 3, "output_tokens": 1}
    start = {"type": "message_start", "message": {"id": "msg_1", "usage": usage}}
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": "Hi"},
    }
    meter.feed(_event("message_start", start) + _event("content_block_start", block))
    meter.feed(_event("content_block_delta", delta)[:20])  # an event split across reads
    meter.feed(_event("content_block_delta", delta)[20:])
    assert meter.reported_usage() is None  # message_delta not yet seen
    assert meter.texts == ["Hi"]
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"output_tokens": 5},
    }
    meter.feed(_event("message_delta", end) + _event("message_stop", {"type": "message_stop"}))
    assert meter.reported_usage() == TokenUsage(15, 5, 3, 0)
    assert meter.done


def test_a_responses_stream_gives_its_id_text_and_usage() -> None:
    meter = meter_class("responses")()
    assert isinstance(meter, ResponsesMeter)
    created = {"type": "response.created", "sequence_number": 0, "response": {"id": "resp_9"}}
    text = {
        "type": "response.output_text.delta",
        "sequence_number": 1,
        "delta": "Hey",
        "item_id": "m",
    }
    args = {"type": "response.function_call_arguments.delta", "sequence_number": 2, "delta": "{}"}
    usage = {"input_tokens": 4, "output_tokens": 2}
    done = {"type": "response.completed", "sequence_number": 3, "response": {"usage": usage}}
    raw = b"".join(
        _event(e["type"], e)
        for e in (created, text, args, done)  # type: ignore[arg-type]
    )
    assert meter.feed(raw) == raw  # passed on untouched
    assert meter.response_id == "resp_9"
    assert meter.texts == ["Hey", "{}"]
    assert meter.reported_usage() == TokenUsage(4, 2)


def _parsed_events(raw: bytes, adapter: pydantic.TypeAdapter[Any]) -> list[Any]:
    events = []
    for block in raw.split(b"\n\n")[:-1]:
        name, data = block.split(b"\n")
        payload = orjson.loads(data[len(b"data: ") :])
        assert name == b"event: " + payload["type"].encode()
        events.append(adapter.validate_python(payload))
    return events


def test_the_clean_ends_parse_as_the_sdks_events() -> None:
    """What the gateway writes when it stops a stream is valid for each SDK's event types:
    a Responses stream's `response.incomplete` (with the delivered text and the gateway's
    counts), a Messages stream's block stop, `message_delta` (max_tokens) and stop."""
    response = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "model": "m",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "status": "in_progress",
    }
    meter = ResponsesMeter()
    meter.feed(
        _event(
            "response.created",
            {"type": "response.created", "sequence_number": 0, "response": response},
        )
        + _event(
            "response.output_text.delta",
            {
                "type": "response.output_text.delta",
                "sequence_number": 1,
                "item_id": "msg_1",
                "output_index": 0,
                "content_index": 0,
                "delta": "Hello",
                "logprobs": [],
            },
        )
    )
    (end,) = _parsed_events(meter.closing_events(7, 1), RESPONSE_EVENTS)
    assert end.type == "response.incomplete"
    assert end.sequence_number == 2
    assert end.response.id == "resp_1"
    assert end.response.incomplete_details.reason == "max_output_tokens"
    assert end.response.output_text == "Hello"
    assert (end.response.usage.input_tokens, end.response.usage.output_tokens) == (7, 1)

    messages = MessagesMeter()
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    messages.feed(_event("content_block_start", block))
    stop, delta, final = _parsed_events(messages.closing_events(7, 3), MESSAGE_EVENTS)
    assert (stop.type, stop.index) == ("content_block_stop", 0)
    assert delta.delta.stop_reason == "max_tokens"
    assert delta.usage.output_tokens == 3
    assert final.type == "message_stop"
