"""Tests of the mock OpenAI-compatible upstream: shapes, true usage, determinism, failures."""

from __future__ import annotations

import base64
import math
import struct
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
import pytest
import tiktoken
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.metering.tokenizers import get_encoding
from gateway.mock_upstream import CREATED, WORDS, MockOptions, create_mock_app

ClientFactory = Callable[[web.Application], Awaitable[TestClient[Any, Any]]]

ENCODINGS = ("cl100k_base", "o200k_base")
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


def tokens(encoding: tiktoken.Encoding, text: str) -> int:
    return len(encoding.encode(text, disallowed_special=()))


def cookbook_chat_tokens(
    encoding: tiktoken.Encoding,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> int:
    """OpenAI cookbook count for gpt-4o / gpt-4, written independently of the server."""
    total = 0
    for message in messages:
        total += 3
        for key, value in message.items():
            if isinstance(value, list):
                value = "".join(p["text"] for p in value if p.get("type") == "text")
            total += tokens(encoding, value)
            if key == "name":
                total += 1
    total += 3
    if tools:
        total += tokens(encoding, orjson.dumps(tools).decode())
    return total


def sse_events(raw: bytes) -> list[bytes]:
    """The `data:` payloads of an SSE body, checking the framing on the way."""
    assert raw.endswith(b"\n\n")
    events = raw.split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in events)
    return [event[len(b"data: ") :] for event in events]


async def read_lines(resp: aiohttp.ClientResponse, into: list[bytes]) -> None:
    """Append each received line to `into`, so lines read before an error are kept."""
    async for line in resp.content:
        into.append(line)


def chat_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something about water."},
        ],
    }
    body.update(extra)
    return body


async def post_json(client: TestClient[Any, Any], path: str, body: Any) -> dict[str, Any]:
    async with client.post(path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        result: dict[str, Any] = await resp.json()
        return result


async def post_raw(client: TestClient[Any, Any], path: str, body: Any) -> bytes:
    async with client.post(path, data=orjson.dumps(body)) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


def test_every_word_is_one_token_in_both_encodings() -> None:
    """Each word is one token spaced and capitalized, so text length in tokens = word count."""
    assert len(WORDS) >= 60
    assert len(set(WORDS)) == len(WORDS)
    for name in ENCODINGS:
        encoding = get_encoding(name)
        for word in WORDS:
            assert tokens(encoding, " " + word) == 1, (name, word)
            assert tokens(encoding, word.capitalize()) == 1, (name, word)


@pytest.mark.parametrize("tokenizer", ENCODINGS)
@pytest.mark.parametrize("max_tokens", [1, 7, 64, 300])
async def test_chat_completion_tokens_equal_retokenized_text(
    aiohttp_client: ClientFactory, tokenizer: str, max_tokens: int
) -> None:
    """Non-streamed chat: completion_tokens is the true token count of the text it returns."""
    client = await aiohttp_client(create_mock_app(MockOptions(tokenizer=tokenizer)))
    answer = await post_json(client, CHAT, chat_body(max_tokens=max_tokens))
    encoding = get_encoding(tokenizer)
    text = answer["choices"][0]["message"]["content"]
    usage = answer["usage"]
    assert usage["completion_tokens"] == max_tokens == tokens(encoding, text)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert text[0].isupper()
    assert answer["object"] == "chat.completion"
    assert answer["model"] == "gpt-4o-mini"
    assert answer["created"] == CREATED
    assert answer["id"].startswith("chatcmpl-")
    assert len(answer["id"]) == len("chatcmpl-") + 24
    assert answer["system_fingerprint"] == "fp_mock"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["choices"][0]["message"]["refusal"] is None
    assert answer["choices"][0]["logprobs"] is None
    assert answer["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("tokenizer", ENCODINGS)
async def test_completions_tokens_equal_retokenized_text(
    aiohttp_client: ClientFactory, tokenizer: str
) -> None:
    """Non-streamed /v1/completions: completion_tokens is the true count of `text`."""
    client = await aiohttp_client(create_mock_app(MockOptions(tokenizer=tokenizer)))
    answer = await post_json(
        client, COMPLETIONS, {"model": "m", "prompt": "Once upon a time", "max_tokens": 33}
    )
    choice = answer["choices"][0]
    assert answer["object"] == "text_completion"
    assert answer["id"].startswith("cmpl-")
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert (
        answer["usage"]["completion_tokens"]
        == 33
        == tokens(get_encoding(tokenizer), choice["text"])
    )
    assert answer["usage"]["prompt_tokens"] == tokens(get_encoding(tokenizer), "Once upon a time")


async def test_limit_sources_and_finish_reason(aiohttp_client: ClientFactory) -> None:
    """Length is max_completion_tokens, else max_tokens ("length"), else the default ("stop")."""
    client = await aiohttp_client(create_mock_app(MockOptions(default_max_tokens=5)))
    default = await post_json(client, CHAT, chat_body())
    assert default["usage"]["completion_tokens"] == 5
    assert default["choices"][0]["finish_reason"] == "stop"
    both = await post_json(client, CHAT, chat_body(max_tokens=9, max_completion_tokens=3))
    assert both["usage"]["completion_tokens"] == 3
    assert both["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("include_usage", [None, False, True])
async def test_stream_matches_non_streamed_answer(
    aiohttp_client: ClientFactory, path: str, include_usage: bool | None
) -> None:
    """Streamed deltas concatenate to the non-streamed text, one chunk per token, then [DONE];
    the usage chunk (with true numbers) appears only when include_usage is true."""
    client = await aiohttp_client(create_mock_app())
    chat = path == CHAT
    body: dict[str, Any] = (
        chat_body(max_tokens=12) if chat else {"model": "m", "prompt": "Hi", "max_tokens": 12}
    )
    plain = await post_json(client, path, body)
    streamed_body = dict(body, stream=True)
    if include_usage is not None:
        streamed_body["stream_options"] = {"include_usage": include_usage}
    async with client.post(path, json=streamed_body) as resp:
        assert resp.status == 200
        assert resp.content_type == "text/event-stream"
        events = sse_events(await resp.read())

    assert events[-1] == b"[DONE]"
    chunks = [orjson.loads(event) for event in events[:-1]]
    expected_object = "chat.completion.chunk" if chat else "text_completion"
    assert all(c["object"] == expected_object for c in chunks)
    assert all(c["id"] == plain["id"] and c["model"] == plain["model"] for c in chunks)
    if include_usage:
        *chunks, usage_chunk = chunks
        assert usage_chunk["choices"] == []
        assert usage_chunk["usage"] == plain["usage"]
        assert all("usage" in c and c["usage"] is None for c in chunks)
    else:
        assert all("usage" not in c for c in chunks)
    *chunks, final = chunks
    assert final["choices"][0]["finish_reason"] == "length"
    if chat:
        assert final["choices"][0]["delta"] == {}
        first, *chunks = chunks
        assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        pieces = [c["choices"][0]["delta"]["content"] for c in chunks]
        plain_text = plain["choices"][0]["message"]["content"]
    else:
        assert final["choices"][0]["text"] == ""
        pieces = [c["choices"][0]["text"] for c in chunks]
        plain_text = plain["choices"][0]["text"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)
    assert len(pieces) == 12
    assert "".join(pieces) == plain_text
    encoding = get_encoding("o200k_base")
    assert all(tokens(encoding, piece) == 1 for piece in pieces)


async def test_same_request_gives_identical_bytes(aiohttp_client: ClientFactory) -> None:
    """Equal requests answer byte-for-byte equal (streamed and not); key order is irrelevant,
    and a different request gets a different id and text."""
    client = await aiohttp_client(create_mock_app())
    body = chat_body(max_tokens=20, temperature=0.5)
    reordered = dict(reversed(list(body.items())))
    assert await post_raw(client, CHAT, body) == await post_raw(client, CHAT, reordered)
    stream = dict(body, stream=True, stream_options={"include_usage": True})
    assert await post_raw(client, CHAT, stream) == await post_raw(client, CHAT, stream)
    other = await post_json(client, CHAT, chat_body(max_tokens=20, temperature=0.6))
    first = orjson.loads(await post_raw(client, CHAT, body))
    assert other["id"] != first["id"]
    assert other["choices"][0]["message"]["content"] != first["choices"][0]["message"]["content"]


CHAT_PROMPTS: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = [
    ([{"role": "user", "content": "Hello"}], None),
    (
        [
            {"role": "system", "content": "You are a helpful, pattern-following assistant."},
            {"role": "system", "name": "example_user", "content": "New synergies will help."},
            {"role": "system", "name": "example_assistant", "content": "Things working well."},
            {"role": "user", "content": "This late pivot means we don't have time to boil."},
        ],
        None,
    ),
    (
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "text", "text": " Answer in French."},
                ],
            }
        ],
        None,
    ),
    ([{"role": "user", "content": "literal <|endoftext|> and <|im_start|> text"}], None),
    (
        [{"role": "user", "content": "Weather in Paris?"}],
        [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
        ],
    ),
]


@pytest.mark.parametrize("tokenizer", ENCODINGS)
@pytest.mark.parametrize(("messages", "tools"), CHAT_PROMPTS)
async def test_chat_prompt_tokens_follow_cookbook(
    aiohttp_client: ClientFactory,
    tokenizer: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
) -> None:
    """Chat prompt_tokens follow OpenAI's cookbook rule (3/message, +1/name, +3 priming,
    text parts only, special-token text as plain text, tools as their JSON)."""
    client = await aiohttp_client(create_mock_app(MockOptions(tokenizer=tokenizer)))
    body: dict[str, Any] = {"model": "gpt-4o", "messages": messages}
    if tools is not None:
        body["tools"] = tools
    answer = await post_json(client, CHAT, body)
    expected = cookbook_chat_tokens(get_encoding(tokenizer), messages, tools)
    assert answer["usage"]["prompt_tokens"] == expected


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("Hello there, world", lambda enc: tokens(enc, "Hello there, world")),
        (["one prompt", "and <|endoftext|> another"], None),
        ([1, 2, 3, 4, 5], lambda enc: 5),
        ([[1, 2], [3, 4, 5], [6]], lambda enc: 6),
    ],
)
async def test_completions_prompt_usage(
    aiohttp_client: ClientFactory, prompt: Any, expected: Callable[[Any], int] | None
) -> None:
    """Completions count a string, a list of strings, a token array or a list of token arrays."""
    client = await aiohttp_client(create_mock_app())
    encoding = get_encoding("o200k_base")
    answer = await post_json(client, COMPLETIONS, {"model": "m", "prompt": prompt})
    want = sum(tokens(encoding, p) for p in prompt) if expected is None else expected(encoding)
    assert answer["usage"]["prompt_tokens"] == want
    assert len(answer["choices"]) == 1


@pytest.mark.parametrize(("prompt"), [[], [1, "a"], [[1], []], 5, None, [True, False], [[1.5]]])
async def test_completions_reject_malformed_prompts(
    aiohttp_client: ClientFactory, prompt: Any
) -> None:
    """A prompt of any other shape is a 400 invalid_request_error naming `prompt`."""
    client = await aiohttp_client(create_mock_app())
    async with client.post(COMPLETIONS, json={"model": "m", "prompt": prompt}) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "prompt"


async def test_embeddings_usage_and_vectors(aiohttp_client: ClientFactory) -> None:
    """Embeddings: one unit vector per input, `dimensions` long, deterministic per input,
    base64 is the same float32 vector little-endian, usage counts the input tokens."""
    client = await aiohttp_client(create_mock_app(MockOptions(tokenizer="cl100k_base")))
    encoding = get_encoding("cl100k_base")
    inputs = ["first text", "second, longer text", "first text"]
    answer = await post_json(client, EMBEDDINGS, {"model": "emb", "input": inputs})
    assert answer["object"] == "list"
    assert answer["model"] == "emb"
    want = sum(tokens(encoding, s) for s in inputs)
    assert answer["usage"] == {"prompt_tokens": want, "total_tokens": want}
    vectors = [item["embedding"] for item in answer["data"]]
    assert [item["index"] for item in answer["data"]] == [0, 1, 2]
    assert all(item["object"] == "embedding" for item in answer["data"])
    assert all(len(v) == 8 for v in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert all(math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5) for v in vectors)

    single = await post_json(
        client,
        EMBEDDINGS,
        {"model": "emb", "input": "first text", "dimensions": 16, "encoding_format": "base64"},
    )
    packed = base64.b64decode(single["data"][0]["embedding"])
    unpacked = list(struct.unpack("<16f", packed))
    as_float = await post_json(
        client, EMBEDDINGS, {"model": "emb", "input": "first text", "dimensions": 16}
    )
    assert unpacked == as_float["data"][0]["embedding"]

    token_arrays = await post_json(client, EMBEDDINGS, {"model": "emb", "input": [[1, 2], [3]]})
    assert token_arrays["usage"]["prompt_tokens"] == 3
    assert len(token_arrays["data"]) == 2
    one_array = await post_json(client, EMBEDDINGS, {"model": "emb", "input": [5, 6, 7, 8]})
    assert one_array["usage"]["prompt_tokens"] == 4
    assert len(one_array["data"]) == 1


@pytest.mark.parametrize("status", [429, 500, 503])
@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, EMBEDDINGS])
async def test_x_mock_status_forces_an_error(
    aiohttp_client: ClientFactory, status: int, path: str
) -> None:
    """`x-mock-status` answers that status at once with an OpenAI-shaped error body."""
    client = await aiohttp_client(create_mock_app(MockOptions(ttft=5.0)))
    body = {"model": "m", "messages": [], "prompt": "x", "input": "x", "stream": True}
    async with client.post(path, json=body, headers={"x-mock-status": str(status)}) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert await resp.json() == {
            "error": {
                "message": "mock failure",
                "type": "server_error",
                "param": None,
                "code": "mock_failure",
            }
        }


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
@pytest.mark.parametrize("after", [0, 3])
async def test_disconnect_after_truncates_the_stream(
    aiohttp_client: ClientFactory, path: str, after: int
) -> None:
    """`x-mock-disconnect-after: N` sends N token chunks, then drops the connection: the
    client sees a payload error and never a finish chunk or [DONE]."""
    client = await aiohttp_client(create_mock_app())
    body: dict[str, Any] = {"model": "m", "prompt": "hi", "max_tokens": 10, "stream": True}
    body["messages"] = [{"role": "user", "content": "hi"}]
    received: list[bytes] = []
    headers = {"x-mock-disconnect-after": str(after)}
    async with client.post(path, json=body, headers=headers) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_lines(resp, received)
    events = [line for line in received if line.startswith(b"data: ")]
    assert b"data: [DONE]\n" not in received
    opening = 1 if path == CHAT else 0
    assert len(events) == opening + after
    assert all(orjson.loads(e[6:])["choices"][0]["finish_reason"] is None for e in events)

    # The server survives and answers the next request normally.
    async with client.post(path, json=dict(body, stream=False)) as resp:
        assert resp.status == 200


async def test_disconnect_without_stream_closes_without_answer(
    aiohttp_client: ClientFactory,
) -> None:
    """For a non-streamed request `x-mock-disconnect-after` closes the connection unanswered."""
    client = await aiohttp_client(create_mock_app())
    headers = {"x-mock-disconnect-after": "0"}
    with pytest.raises(aiohttp.ServerDisconnectedError):
        async with client.post(CHAT, json=chat_body(), headers=headers) as resp:
            await resp.read()


async def test_latency_headers_override_options(aiohttp_client: ClientFactory) -> None:
    """`x-mock-ttft` and `x-mock-token-delay` slow one request down; options stay untouched."""
    client = await aiohttp_client(create_mock_app())
    started = time.perf_counter()
    await post_json(client, CHAT, chat_body())
    assert time.perf_counter() - started < 0.2
    headers = {"x-mock-ttft": "0.1", "x-mock-token-delay": "0.02"}
    started = time.perf_counter()
    async with client.post(CHAT, json=chat_body(max_tokens=6, stream=True), headers=headers) as r:
        await r.read()
    assert time.perf_counter() - started >= 0.1 + 5 * 0.02
    async with client.post(CHAT, json=chat_body(), headers={"x-mock-ttft": "soon"}) as r:
        assert r.status == 400


async def test_api_key_is_enforced(aiohttp_client: ClientFactory) -> None:
    """With api_key set, /v1 requests need `Authorization: Bearer <key>`, else 401
    invalid_api_key; health and debug endpoints stay open."""
    client = await aiohttp_client(create_mock_app(MockOptions(api_key="sk-mock")))
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "sk-mock"}):
        async with client.post(CHAT, json=chat_body(), headers=headers) as resp:
            assert resp.status == 401
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_api_key"
            assert error["type"] == "invalid_request_error"
        async with client.get("/v1/models", headers=headers) as resp:
            assert resp.status == 401
    good = {"Authorization": "Bearer sk-mock"}
    async with client.post(CHAT, json=chat_body(), headers=good) as resp:
        assert resp.status == 200
    async with client.get("/v1/models", headers=good) as resp:
        assert resp.status == 200
    async with client.get("/healthz") as resp:
        assert resp.status == 200


async def test_debug_last_request_reports_headers_and_body(
    aiohttp_client: ClientFactory,
) -> None:
    """/debug/last-request returns the last POST's method, path, headers as sent and raw body."""
    client = await aiohttp_client(create_mock_app())
    async with client.get("/debug/last-request") as resp:
        assert await resp.json() is None
    raw = b'{"model": "m",\n "prompt": "caf\xc3\xa9"}'
    headers = {"X-Custom-Header": "kept", "Content-Type": "application/json"}
    async with client.post(COMPLETIONS + "?trace=1", data=raw, headers=headers) as resp:
        assert resp.status == 200
    async with client.get("/v1/models") as resp:  # GETs are not recorded
        assert resp.status == 200
    async with client.get("/debug/last-request") as resp:
        record = await resp.json()
    assert record["method"] == "POST"
    assert record["path"] == COMPLETIONS
    assert record["query"] == "trace=1"
    assert record["headers"]["X-Custom-Header"] == "kept"
    assert record["headers"]["Content-Type"] == "application/json"
    assert record["body"] == raw.decode()


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"messages": [{"role": "user", "content": "hi"}]}', "model"),
        (b'{"model": "m", "messages": "hi"}', "messages"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}', "n"),
        (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}',
         "max_tokens"),
    ],
)  # fmt: skip
async def test_bad_requests_are_400(
    aiohttp_client: ClientFactory, raw: bytes, param: str | None
) -> None:
    """Malformed JSON, a missing model or unsupported parameters give a 400
    invalid_request_error with code invalid_request."""
    client = await aiohttp_client(create_mock_app())
    async with client.post(CHAT, data=raw) as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["param"] == param


async def test_models_and_health(aiohttp_client: ClientFactory) -> None:
    """/v1/models lists mock-model, /v1/models/{id} echoes the id, /healthz says ok."""
    client = await aiohttp_client(create_mock_app())
    async with client.get("/v1/models") as resp:
        assert await resp.json() == {
            "object": "list",
            "data": [
                {"id": "mock-model", "object": "model", "created": CREATED, "owned_by": "mock"}
            ],
        }
    async with client.get("/v1/models/org/some-model") as resp:
        assert (await resp.json())["id"] == "org/some-model"
    async with client.get("/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
