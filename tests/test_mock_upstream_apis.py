"""The mock upstream's OpenAI Responses and Anthropic Messages APIs, checked with the official
SDKs (independent parsers of each wire format) and with the raw bytes: event sequences,
true usage, cache token classes, knobs and errors in each API's own shape."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pydantic
import pytest
import tiktoken
from aiohttp import web
from aiohttp.test_utils import TestClient
from anthropic.types import ErrorResponse, Message, MessageTokensCount, RawMessageStreamEvent
from openai.types.responses import Response, ResponseStreamEvent

from gateway.metering.tokenizers import get_encoding
from gateway.mock_upstream import CREATED, MockOptions, create_mock_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]

RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
ENCODINGS = ("cl100k_base", "o200k_base")
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01"}
DEFAULT_LENGTH = 16  # MockOptions.default_max_tokens

RESPONSE_EVENTS = pydantic.TypeAdapter(ResponseStreamEvent)
MESSAGE_EVENTS = pydantic.TypeAdapter(RawMessageStreamEvent)


def tokens(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


def named_events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) of each SSE event, checking each is `event:` + `data:` lines whose
    data names the same type."""
    assert raw.endswith(b"\n\n")
    events: list[tuple[str, dict[str, Any]]] = []
    for block in raw.split(b"\n\n")[:-1]:
        event_line, data_line = block.split(b"\n")
        assert event_line.startswith(b"event: "), block
        assert data_line.startswith(b"data: "), block
        name = event_line[len(b"event: ") :].decode()
        data = orjson.loads(data_line[len(b"data: ") :])
        assert data["type"] == name
        events.append((name, data))
    return events


async def post(
    client: TestClient[Any, Any],
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    async with client.post(path, data=orjson.dumps(body), headers=headers) as resp:
        return resp.status, await resp.read()


async def post_ok(
    client: TestClient[Any, Any],
    path: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> bytes:
    status, raw = await post(client, path, body, headers)
    assert status == 200, raw
    return raw


async def read_lines(resp: aiohttp.ClientResponse, into: list[bytes]) -> None:
    """Append each received line to `into`, so lines read before an error are kept."""
    async for line in resp.content:
        into.append(line)


def anthropic_headers(**extra: str) -> dict[str, str]:
    return {**ANTHROPIC_HEADERS, **extra}


@pytest.fixture
async def mock(aiohttp_client: ClientFactory) -> TestClient[Any, Any]:
    return await aiohttp_client(create_mock_app())


@pytest.fixture
async def openai_sdk(mock: TestClient[Any, Any]) -> AsyncIterator[openai.AsyncOpenAI]:
    base = str(mock.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


@pytest.fixture
async def anthropic_sdk(mock: TestClient[Any, Any]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    base = str(mock.make_url("")).rstrip("/")
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-test", max_retries=0) as sdk:
        yield sdk


# -- OpenAI Responses --------------------------------------------------------------------

INSTRUCTIONS = "You are terse."
RESPONSE_ITEMS: list[dict[str, Any]] = [
    {"role": "user", "content": "Say something about water."},
    {
        "type": "message",
        "role": "user",
        "content": [
            {"type": "input_text", "text": "And look at this <|endoftext|> picture:"},
            {"type": "input_image", "image_url": "https://example.com/a.png", "detail": "auto"},
        ],
    },
    {"type": "function_call", "call_id": "call_1", "name": "lookup", "arguments": '{"q":"sea"}'},
    {"type": "function_call_output", "call_id": "call_1", "output": "Salt water, mostly."},
    {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": "Noted.", "annotations": []}],
    },
]
RESPONSE_TEXTS = [
    INSTRUCTIONS,
    "Say something about water.",
    "And look at this <|endoftext|> picture:",
    '{"q":"sea"}',
    "Salt water, mostly.",
    "Noted.",
]


@pytest.mark.parametrize("tokenizer", ENCODINGS)
async def test_responses_sdk_whole_answer_has_true_usage(
    aiohttp_client: ClientFactory, tokenizer: str
) -> None:
    """`client.responses.create`: the text of the output message, input tokens = the tokens of
    the visible text (instructions, message texts, call arguments and outputs; the image
    counts nothing), output tokens = the tokens of the text; the raw answer passes the SDK's
    strict `Response` model."""
    mock = await aiohttp_client(create_mock_app(MockOptions(tokenizer=tokenizer)))
    encoding = get_encoding(tokenizer)
    base = str(mock.make_url("/v1"))
    async with openai.AsyncOpenAI(base_url=base, api_key="sk", max_retries=0) as sdk:
        response = await sdk.responses.create(
            model="gpt-4.1-mini",
            instructions=INSTRUCTIONS,
            input=RESPONSE_ITEMS,  # type: ignore[arg-type]
        )
    assert response.status == "completed"
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.created_at == CREATED
    assert response.model == "gpt-4.1-mini"
    assert response.instructions == INSTRUCTIONS
    assert response.incomplete_details is None
    text = response.output_text
    assert text
    assert text[0].isupper()
    (message,) = response.output
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.status == "completed"
    assert message.id.startswith("msg_")
    assert response.usage is not None
    usage = response.usage
    assert usage.input_tokens == sum(tokens(encoding, t) for t in RESPONSE_TEXTS)
    assert usage.output_tokens == tokens(encoding, text) == DEFAULT_LENGTH
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0

    raw = await post_ok(
        mock, RESPONSES, {"model": "gpt-4.1-mini", "instructions": INSTRUCTIONS, "input": "Hi"}
    )
    strict = Response.model_validate_json(raw)
    assert strict.usage is not None
    assert strict.usage.input_tokens == tokens(encoding, INSTRUCTIONS) + tokens(encoding, "Hi")


async def test_responses_sdk_stream_parses_every_event(
    mock: TestClient[Any, Any], openai_sdk: openai.AsyncOpenAI
) -> None:
    """A streamed response is created, in_progress, output_item.added, content_part.added,
    one output_text.delta per token, output_text.done, content_part.done, output_item.done,
    completed; sequence numbers count from 0, no [DONE]. The deltas join to the non-streamed
    text, and `responses.stream(...)` gives the same final response and usage."""
    body = {"model": "gpt-4.1-mini", "input": "Tell me about the sea.", "max_output_tokens": 50}
    raw_whole = await post_ok(mock, RESPONSES, body)
    whole = Response.model_validate_json(raw_whole)

    raw = await post_ok(mock, RESPONSES, dict(body, stream=True))
    assert b"[DONE]" not in raw
    events = named_events(raw)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * DEFAULT_LENGTH,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    for _, data in events:
        RESPONSE_EVENTS.validate_python(data)  # the SDK's strict models, every field
    assert events[0][1]["response"]["status"] == "in_progress"
    assert events[0][1]["response"]["usage"] is None
    assert events[-1][1]["response"] == orjson.loads(raw_whole)

    encoding = get_encoding("o200k_base")
    streamed = await openai_sdk.responses.create(stream=True, **body)  # type: ignore[call-overload]
    deltas: list[str] = []
    completed = None
    async for event in streamed:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            completed = event.response
    assert all(tokens(encoding, delta) == 1 for delta in deltas)
    assert "".join(deltas) == whole.output_text
    assert completed is not None
    assert completed.usage == whole.usage

    async with openai_sdk.responses.stream(**body) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_response()
    assert kinds == names
    assert final.output_text == whole.output_text
    assert final.usage == whole.usage
    assert final.usage is not None
    assert final.usage.output_tokens == tokens(encoding, final.output_text)


async def test_responses_max_output_tokens_cuts_the_answer(
    mock: TestClient[Any, Any], openai_sdk: openai.AsyncOpenAI
) -> None:
    """The answer's natural length is the default; a smaller max_output_tokens cuts it:
    status incomplete (reason max_output_tokens), and a stream ends with response.incomplete."""
    cut = await openai_sdk.responses.create(model="m", input="Hi", max_output_tokens=5)
    assert cut.status == "incomplete"
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"  # type: ignore[union-attr]
    assert cut.usage is not None
    assert cut.usage.output_tokens == 5 == tokens(get_encoding("o200k_base"), cut.output_text)

    raw = await post_ok(
        mock, RESPONSES, {"model": "m", "input": "Hi", "max_output_tokens": 5, "stream": True}
    )
    events = named_events(raw)
    assert events[-1][0] == "response.incomplete"
    assert events[-1][1]["response"]["usage"]["output_tokens"] == 5
    assert sum(name == "response.output_text.delta" for name, _ in events) == 5
    for _, data in events:
        RESPONSE_EVENTS.validate_python(data)

    default = await openai_sdk.responses.create(model="m", input="Hi")
    assert default.status == "completed"
    assert default.max_output_tokens is None
    assert default.usage is not None
    assert default.usage.output_tokens == DEFAULT_LENGTH


async def test_responses_usage_headers(mock: TestClient[Any, Any]) -> None:
    """Cached, cache-write and reasoning tokens land in Responses' details (input_tokens
    still includes the cached ones, as OpenAI counts them); prompt/completion overrides
    replace the reported numbers; x-mock-omit-usage gives `usage: null`, streamed too."""
    body = {"model": "m", "input": "Some words to count here."}
    headers = {
        "x-mock-usage-cached-tokens": "3",
        "x-mock-usage-cache-write-tokens": "2",
        "x-mock-usage-reasoning-tokens": "7",
    }
    true_input = tokens(get_encoding("o200k_base"), "Some words to count here.")
    answer = Response.model_validate_json(await post_ok(mock, RESPONSES, body, headers))
    assert answer.usage is not None
    assert answer.usage.input_tokens == true_input
    assert answer.usage.input_tokens_details.cached_tokens == 3
    assert answer.usage.input_tokens_details.cache_write_tokens == 2
    assert answer.usage.output_tokens_details.reasoning_tokens == 7

    override = {"x-mock-usage-prompt-tokens": "100", "x-mock-usage-completion-tokens": "9"}
    untrue = Response.model_validate_json(await post_ok(mock, RESPONSES, body, override))
    assert untrue.usage is not None
    assert (untrue.usage.input_tokens, untrue.usage.output_tokens) == (100, 9)
    assert untrue.usage.total_tokens == 109
    assert tokens(get_encoding("o200k_base"), untrue.output_text) == DEFAULT_LENGTH

    omit = {"x-mock-omit-usage": "true"}
    assert orjson.loads(await post_ok(mock, RESPONSES, body, omit))["usage"] is None
    events = named_events(await post_ok(mock, RESPONSES, dict(body, stream=True), omit))
    assert events[-1][0] == "response.completed"
    assert events[-1][1]["response"]["usage"] is None


async def test_responses_bad_requests_are_openai_shaped(mock: TestClient[Any, Any]) -> None:
    """A missing or malformed input, or a bad max_output_tokens, is a 400 naming the param."""
    cases: list[tuple[dict[str, Any], str]] = [
        ({"model": "m"}, "input"),
        ({"model": "m", "input": []}, "input"),
        ({"model": "m", "input": 5}, "input"),
        ({"model": "m", "input": [{"role": "user", "content": 5}]}, "input[0].content"),
        ({"model": "m", "input": "hi", "instructions": ["x"]}, "instructions"),
        ({"model": "m", "input": "hi", "max_output_tokens": -1}, "max_output_tokens"),
        ({"input": "hi"}, "model"),
    ]
    for body, param in cases:
        status, raw = await post(mock, RESPONSES, body)
        assert status == 400, body
        error = orjson.loads(raw)["error"]
        assert error["type"] == "invalid_request_error"
        assert error["param"] == param


# -- Anthropic Messages ------------------------------------------------------------------

SYSTEM_BLOCKS = [{"type": "text", "text": "You are terse."}, {"type": "text", "text": " Be kind."}]
MESSAGES_IN: list[dict[str, Any]] = [
    {"role": "user", "content": "Say something about water."},
    {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "sea"}},
        ],
    },
    {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Salt water, mostly."},
            {
                "type": "image",
                "source": {"type": "url", "url": "https://example.com/a.png"},
            },
            {"type": "text", "text": "Literal <|endoftext|> here."},
        ],
    },
]
MESSAGE_TEXTS = [
    "You are terse.",
    " Be kind.",
    "Say something about water.",
    "Let me look.",
    '{"q":"sea"}',
    "Salt water, mostly.",
    "Literal <|endoftext|> here.",
]


def messages_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "system": SYSTEM_BLOCKS,
        "messages": MESSAGES_IN,
    }
    body.update(extra)
    return body


@pytest.mark.parametrize("tokenizer", ENCODINGS)
async def test_messages_sdk_whole_answer_has_true_usage(
    aiohttp_client: ClientFactory, tokenizer: str
) -> None:
    """`client.messages.create`: one text block, end_turn (max_tokens above the natural
    length), input tokens = the tokens of system + message texts (tool input as JSON, the
    image nothing), output tokens = the tokens of the text; the raw answer passes the SDK's
    strict `Message` model; count_tokens gives the same input count."""
    mock = await aiohttp_client(create_mock_app(MockOptions(tokenizer=tokenizer)))
    encoding = get_encoding(tokenizer)
    base = str(mock.make_url("")).rstrip("/")
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk", max_retries=0) as sdk:
        message = await sdk.messages.create(**messages_body())
        counted = await sdk.messages.count_tokens(
            model="claude-sonnet-4-5",
            system=SYSTEM_BLOCKS,  # type: ignore[arg-type]
            messages=MESSAGES_IN,  # type: ignore[arg-type]
        )
    expected_input = sum(tokens(encoding, t) for t in MESSAGE_TEXTS)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == "claude-sonnet-4-5"
    assert message.stop_reason == "end_turn"
    assert message.stop_sequence is None
    (block,) = message.content
    assert block.type == "text"
    assert block.text[0].isupper()
    usage = message.usage
    assert usage.input_tokens == expected_input
    assert usage.output_tokens == tokens(encoding, block.text) == DEFAULT_LENGTH
    assert usage.cache_read_input_tokens == 0
    assert usage.cache_creation_input_tokens == 0
    assert counted.input_tokens == expected_input

    raw = await post_ok(mock, MESSAGES, messages_body(), ANTHROPIC_HEADERS)
    assert Message.model_validate_json(raw).usage == usage
    raw_count = await post_ok(mock, COUNT_TOKENS, messages_body(), ANTHROPIC_HEADERS)
    assert MessageTokensCount.model_validate_json(raw_count).input_tokens == expected_input
    assert orjson.loads(raw_count) == {"input_tokens": expected_input}


async def test_messages_sdk_stream_parses_every_event(
    mock: TestClient[Any, Any], anthropic_sdk: anthropic.AsyncAnthropic
) -> None:
    """A streamed message is message_start, content_block_start, ping, one text_delta per
    token, content_block_stop, message_delta, message_stop, each a named event; the SDK's
    `messages.stream(...).get_final_message()` equals the non-streamed message and usage."""
    body = messages_body()
    whole = Message.model_validate_json(await post_ok(mock, MESSAGES, body, ANTHROPIC_HEADERS))

    raw = await post_ok(mock, MESSAGES, dict(body, stream=True), ANTHROPIC_HEADERS)
    events = named_events(raw)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * DEFAULT_LENGTH,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    for name, data in events:
        if name != "ping":
            MESSAGE_EVENTS.validate_python(data)  # the SDK's strict models
    start = events[0][1]["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == whole.usage.input_tokens
    assert start["usage"]["output_tokens"] == 1  # as Anthropic's message_start says
    closing = events[-2][1]
    assert closing["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert closing["usage"]["output_tokens"] == whole.usage.output_tokens
    assert closing["usage"]["input_tokens"] == whole.usage.input_tokens  # cumulative

    encoding = get_encoding("o200k_base")
    async with anthropic_sdk.messages.stream(**body) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert all(tokens(encoding, piece) == 1 for piece in pieces)
    assert "".join(pieces) == whole.content[0].text  # type: ignore[union-attr]
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert final.usage == whole.usage

    created = await anthropic_sdk.messages.create(stream=True, **body)
    kinds = [event.type async for event in created]
    assert kinds == [name for name, _ in events if name != "ping"]  # the SDK drops pings


async def test_messages_max_tokens_cuts_the_answer(
    anthropic_sdk: anthropic.AsyncAnthropic,
) -> None:
    """max_tokens below the natural length cuts the answer (stop_reason max_tokens), streamed
    or not; at or above it the answer ends its turn."""
    cut = await anthropic_sdk.messages.create(**messages_body(max_tokens=4))
    assert cut.stop_reason == "max_tokens"
    assert cut.usage.output_tokens == 4
    async with anthropic_sdk.messages.stream(**messages_body(max_tokens=4)) as stream:
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 4
    assert final.content[0].text == cut.content[0].text  # type: ignore[union-attr]
    exact = await anthropic_sdk.messages.create(**messages_body(max_tokens=DEFAULT_LENGTH))
    assert exact.stop_reason == "end_turn"
    assert exact.usage.output_tokens == DEFAULT_LENGTH


@pytest.mark.parametrize(("cached", "written"), [(3, 2), (0, 4), (500, 0)])
async def test_cache_headers_in_both_apis(
    mock: TestClient[Any, Any],
    anthropic_sdk: anthropic.AsyncAnthropic,
    cached: int,
    written: int,
) -> None:
    """Anthropic's input_tokens exclude the cache: cache reads and writes become
    cache_read_input_tokens / cache_creation_input_tokens and input_tokens is the count less
    both, never below 0, in the message, message_start and message_delta. OpenAI's
    input_tokens include them, the classes in input_tokens_details."""
    headers = {
        "x-mock-usage-cached-tokens": str(cached),
        "x-mock-usage-cache-write-tokens": str(written),
    }
    count = sum(tokens(get_encoding("o200k_base"), t) for t in MESSAGE_TEXTS)
    expected_input = max(0, count - cached - written)
    message = await anthropic_sdk.messages.create(**messages_body(), extra_headers=headers)
    assert message.usage.input_tokens == expected_input
    assert message.usage.cache_read_input_tokens == cached
    assert message.usage.cache_creation_input_tokens == written
    async with anthropic_sdk.messages.stream(**messages_body(), extra_headers=headers) as stream:
        final = await stream.get_final_message()
    assert final.usage == message.usage
    raw = await post_ok(mock, MESSAGES, messages_body(stream=True), anthropic_headers(**headers))
    events = dict(named_events(raw))
    for usage in (events["message_start"]["message"]["usage"], events["message_delta"]["usage"]):
        assert usage["input_tokens"] == expected_input
        assert usage["cache_read_input_tokens"] == cached
        assert usage["cache_creation_input_tokens"] == written
    counted = await post_ok(mock, COUNT_TOKENS, messages_body(), anthropic_headers(**headers))
    assert orjson.loads(counted) == {"input_tokens": count}  # a count knows no cache

    response_body = {"model": "m", "input": "Some words to count here."}
    answer = Response.model_validate_json(await post_ok(mock, RESPONSES, response_body, headers))
    assert answer.usage is not None
    assert answer.usage.input_tokens == tokens(get_encoding("o200k_base"), response_body["input"])
    assert answer.usage.input_tokens_details.cached_tokens == cached
    assert answer.usage.input_tokens_details.cache_write_tokens == written


async def test_messages_usage_overrides_and_omit(mock: TestClient[Any, Any]) -> None:
    """The prompt override is the whole prompt (input_tokens = it less the cache), the
    completion override the output tokens; x-mock-omit-usage removes every usage object."""
    headers = anthropic_headers(
        **{
            "x-mock-usage-prompt-tokens": "100",
            "x-mock-usage-completion-tokens": "9",
            "x-mock-usage-cached-tokens": "30",
        }
    )
    usage = Message.model_validate_json(await post_ok(mock, MESSAGES, messages_body(), headers))
    assert (usage.usage.input_tokens, usage.usage.cache_read_input_tokens) == (70, 30)
    assert usage.usage.output_tokens == 9

    omit = anthropic_headers(**{"x-mock-omit-usage": "true"})
    assert "usage" not in orjson.loads(await post_ok(mock, MESSAGES, messages_body(), omit))
    events = dict(named_events(await post_ok(mock, MESSAGES, messages_body(stream=True), omit)))
    assert "usage" not in events["message_start"]["message"]
    assert "usage" not in events["message_delta"]
    assert events["message_delta"]["delta"]["stop_reason"] == "end_turn"


@pytest.mark.parametrize("max_tokens", [None, 0, -1, "5", True, 2.5])
async def test_messages_need_max_tokens(mock: TestClient[Any, Any], max_tokens: Any) -> None:
    """/v1/messages without max_tokens (or with one that is not an integer of at least 1) is
    a 400 in Anthropic's shape; count_tokens needs none."""
    body = messages_body(max_tokens=max_tokens)
    if max_tokens is None:
        del body["max_tokens"]
    status, raw = await post(mock, MESSAGES, body, ANTHROPIC_HEADERS)
    assert status == 400
    error = ErrorResponse.model_validate_json(raw)
    assert error.type == "error"
    assert error.error.type == "invalid_request_error"
    expected = "Field required" if max_tokens is None else "Input should be an integer"
    assert error.error.message.startswith(f"max_tokens: {expected}")
    status, _ = await post(mock, COUNT_TOKENS, body, ANTHROPIC_HEADERS)
    assert status == 200


async def test_messages_bad_requests_are_anthropic_shaped(mock: TestClient[Any, Any]) -> None:
    """No anthropic-version header, no messages, a bad role or content: 400s in Anthropic's
    shape."""
    status, raw = await post(mock, MESSAGES, messages_body())
    assert status == 400
    assert orjson.loads(raw) == {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "anthropic-version: header is required",
        },
    }
    bad_bodies = [
        {"model": "c", "max_tokens": 5},
        {"model": "c", "max_tokens": 5, "messages": []},
        {"model": "c", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
        {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": 5}]},
        {
            "model": "c",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "x"}],
            "system": 5,
        },
        {"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
    ]
    for path in (MESSAGES, COUNT_TOKENS):
        for body in bad_bodies:
            status, raw = await post(mock, path, body, ANTHROPIC_HEADERS)
            assert status == 400, (path, body)
            assert ErrorResponse.model_validate_json(raw).error.type == "invalid_request_error"


# -- knobs and errors on both --------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "anthropic_type", "sdk_error"),
    [
        (429, "rate_limit_error", anthropic.RateLimitError),
        (500, "api_error", anthropic.InternalServerError),
        (529, "overloaded_error", anthropic.OverloadedError),
        (503, "api_error", anthropic.APIStatusError),
    ],
)
async def test_x_mock_status_errors_in_each_apis_shape(
    mock: TestClient[Any, Any],
    openai_sdk: openai.AsyncOpenAI,
    anthropic_sdk: anthropic.AsyncAnthropic,
    status: int,
    anthropic_type: str,
    sdk_error: type[anthropic.APIStatusError],
) -> None:
    """`x-mock-status` answers a Responses call with OpenAI's error shape and a Messages or
    count_tokens call with Anthropic's, which each SDK raises as that status's error."""
    forced = {"x-mock-status": str(status)}
    code, raw = await post(mock, RESPONSES, {"model": "m", "input": "x", "stream": True}, forced)
    assert code == status
    assert orjson.loads(raw) == {
        "error": {
            "message": "mock failure",
            "type": "server_error",
            "param": None,
            "code": "mock_failure",
        }
    }
    with pytest.raises(openai.APIStatusError) as openai_info:
        await openai_sdk.responses.create(model="m", input="x", extra_headers=forced)
    assert openai_info.value.status_code == status

    for path in (MESSAGES, COUNT_TOKENS):
        code, raw = await post(mock, path, messages_body(stream=True), anthropic_headers(**forced))
        assert code == status
        assert orjson.loads(raw) == {
            "type": "error",
            "error": {"type": anthropic_type, "message": "mock failure"},
        }
    with pytest.raises(sdk_error) as anthropic_info:
        await anthropic_sdk.messages.create(**messages_body(), extra_headers=forced)
    assert anthropic_info.value.status_code == status
    assert anthropic_info.value.type == anthropic_type


async def test_api_key_on_the_new_routes(aiohttp_client: ClientFactory) -> None:
    """With an API key set, Responses needs the bearer token (else OpenAI's 401); Messages
    takes it as `x-api-key` or as a bearer token (the anthropic SDK sends the latter), else
    Anthropic's 401 authentication_error."""
    mock = await aiohttp_client(create_mock_app(MockOptions(api_key="sk-mock")))
    body = {"model": "m", "input": "hi"}
    assert (await post(mock, RESPONSES, body, {"Authorization": "Bearer sk-mock"}))[0] == 200
    status, raw = await post(mock, RESPONSES, body, {"x-api-key": "sk-mock"})
    assert status == 401
    assert orjson.loads(raw)["error"]["code"] == "invalid_api_key"

    for good in ({"x-api-key": "sk-mock"}, {"Authorization": "Bearer sk-mock"}):
        assert (await post(mock, MESSAGES, messages_body(), anthropic_headers(**good)))[0] == 200
    for bad, message in (
        ({}, "x-api-key header is required"),
        ({"x-api-key": "sk-wrong"}, "invalid x-api-key"),
        ({"Authorization": "Bearer sk-wrong"}, "invalid x-api-key"),
    ):
        for path in (MESSAGES, COUNT_TOKENS):
            status, raw = await post(mock, path, messages_body(), anthropic_headers(**bad))
            assert status == 401
            assert orjson.loads(raw) == {
                "type": "error",
                "error": {"type": "authentication_error", "message": message},
            }

    base = str(mock.make_url("")).rstrip("/")
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-mock", max_retries=0) as sdk:
        assert (await sdk.messages.create(**messages_body())).stop_reason == "end_turn"
    async with anthropic.AsyncAnthropic(base_url=base, api_key="sk-no", max_retries=0) as sdk:
        with pytest.raises(anthropic.AuthenticationError):
            await sdk.messages.create(**messages_body())


async def test_debug_last_request_shows_anthropic_headers(
    mock: TestClient[Any, Any], anthropic_sdk: anthropic.AsyncAnthropic
) -> None:
    """/debug/last-request records the anthropic-version and anthropic-beta headers the
    caller sent, with the body."""
    sent = {"anthropic-version": "2023-06-01", "anthropic-beta": "prompt-caching-2024-07-31"}
    await anthropic_sdk.messages.create(**messages_body(), extra_headers=sent)
    async with mock.get("/debug/last-request") as resp:
        record = await resp.json()
    headers = {name.lower(): value for name, value in record["headers"].items()}
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert record["path"] == MESSAGES
    assert orjson.loads(record["body"])["messages"] == MESSAGES_IN


STREAMS = [
    (RESPONSES, {"model": "m", "input": "hi", "stream": True}, {}, "response.output_text.delta"),
    (MESSAGES, messages_body(stream=True), ANTHROPIC_HEADERS, "content_block_delta"),
]


@pytest.mark.parametrize(("path", "body", "headers", "delta"), STREAMS)
@pytest.mark.parametrize("after", [0, 3])
async def test_disconnect_after_truncates_new_streams(
    mock: TestClient[Any, Any],
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    delta: str,
    after: int,
) -> None:
    """`x-mock-disconnect-after: N` sends the opening events and N deltas, then drops the
    connection (no final event); a non-streamed call is dropped unanswered."""
    received: list[bytes] = []
    async with mock.post(
        path, json=body, headers={**headers, "x-mock-disconnect-after": str(after)}
    ) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_lines(resp, received)
    names = [line[7:].strip().decode() for line in received if line.startswith(b"event: ")]
    assert names.count(delta) == after
    assert not {"response.completed", "message_delta", "message_stop"} & set(names)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with mock.post(
            path,
            json=dict(body, stream=False),
            headers={**headers, "x-mock-disconnect-after": "0"},
        ) as resp:
            await resp.read()
    async with mock.post(path, json=body, headers=headers) as resp:  # the server survives
        assert resp.status == 200
        await resp.read()


@pytest.mark.parametrize(("path", "body", "headers", "delta"), STREAMS)
async def test_latency_headers_on_new_streams(
    mock: TestClient[Any, Any],
    path: str,
    body: dict[str, Any],
    headers: dict[str, str],
    delta: str,
) -> None:
    """`x-mock-ttft` delays the first event and `x-mock-token-delay` spaces the deltas."""
    paced = {**headers, "x-mock-ttft": "0.1", "x-mock-token-delay": "0.02"}
    limited = dict(body, max_output_tokens=6) if path == RESPONSES else dict(body, max_tokens=6)
    started = time.perf_counter()
    raw = await post_ok(mock, path, limited, paced)
    assert time.perf_counter() - started >= 0.1 + 5 * 0.02
    assert [name for name, _ in named_events(raw)].count(delta) == 6


async def test_same_request_same_bytes_on_new_routes(mock: TestClient[Any, Any]) -> None:
    """Equal requests answer byte-for-byte equal on both new APIs, streamed and not."""
    for path, body, headers, _ in STREAMS:
        for streamed in (True, False):
            one = await post_ok(mock, path, dict(body, stream=streamed), headers)
            two = await post_ok(mock, path, dict(body, stream=streamed), headers)
            assert one == two
