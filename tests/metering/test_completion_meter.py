"""CompletionMeter: completion text and upstream usage read from answers as they pass."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.metering.completion import CompletionMeter
from gateway.metering.tokenizers import get_encoding
from gateway.pricing import TokenUsage

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
WORDS = ["Hello", " there", ", friend"]


def _chunk(delta: dict[str, Any], finish: str | None = None, usage: bool = True) -> bytes:
    """One OpenAI chat chunk, compact JSON, as an upstream asked for usage writes it."""
    payload: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        payload["usage"] = None
    return orjson.dumps(payload)


def _usage_chunk() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "m",
            "choices": [],
            "usage": USAGE,
        }
    )


def _sse(events: list[bytes], sep: bytes = b"\n\n") -> bytes:
    return b"".join(b"data: " + event + sep for event in events)


def _stream(with_usage: bool, sep: bytes = b"\n\n") -> bytes:
    """A chat stream; with the usage fields an `include_usage` request gets, or without."""
    events = [_chunk({"role": "assistant", "content": ""}, usage=with_usage)]
    events += [_chunk({"content": word}, usage=with_usage) for word in WORDS]
    events.append(_chunk({}, finish="stop", usage=with_usage))
    if with_usage:
        events.append(_usage_chunk())
    return _sse(events, sep) + b"data: [DONE]" + sep


def _feed_all(meter: CompletionMeter, data: bytes, sizes: list[int]) -> bytes:
    """Feed `data` cut into pieces of `sizes` (cycled), then flush; what the client gets."""
    out = bytearray()
    pos, i = 0, 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out += meter.feed(data[pos : pos + size])
        pos += size
        i += 1
    out += meter.flush()
    return bytes(out)


def _random_sizes(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 40) for _ in range(64)]


CUTS = [[1], [2], [3], [7], [4096], *[_random_sizes(seed) for seed in range(5)]]


@pytest.mark.parametrize("sizes", CUTS, ids=[f"cut{i}" for i in range(len(CUTS))])
@pytest.mark.parametrize("strip", [False, True], ids=["passthrough", "strip"])
def test_chunk_boundaries_do_not_matter(sizes: list[int], strip: bool) -> None:
    """However the stream is cut (down to byte by byte), the meter reads the same texts and
    usage, sees `[DONE]`, and hands on the same bytes."""
    data = _stream(with_usage=True)
    whole = CompletionMeter(strip_usage=strip)
    expected = whole.feed(data) + whole.flush()
    meter = CompletionMeter(strip_usage=strip)
    got = _feed_all(meter, data, sizes)
    assert got == expected
    assert meter.texts == whole.texts
    assert "".join(meter.texts) == "".join(WORDS)
    assert meter.usage == whole.usage == USAGE
    assert meter.done
    assert meter.reported_usage() == TokenUsage(9, 3)


def test_passthrough_returns_every_chunk_as_is() -> None:
    """Without strip_usage, each fed chunk comes back unchanged, usage chunk included."""
    data = _stream(with_usage=True)
    meter = CompletionMeter()
    for start in range(0, len(data), 5):
        piece = data[start : start + 5]
        assert meter.feed(piece) == piece
    assert meter.flush() == b""
    assert meter.usage == USAGE


@pytest.mark.parametrize("sizes", CUTS, ids=[f"cut{i}" for i in range(len(CUTS))])
def test_strip_usage_gives_the_stream_without_usage(sizes: list[int]) -> None:
    """With strip_usage, the usage-only chunk is dropped and every `"usage":null` removed;
    every other byte is kept: the client gets the stream it would have got without asking
    for usage."""
    meter = CompletionMeter(strip_usage=True)
    got = _feed_all(meter, _stream(with_usage=True), sizes)
    assert got == _stream(with_usage=False)
    assert meter.usage == USAGE
    assert meter.done


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        (
            b'{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}],"usage":null}',
            b'{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}',
        ),
        (
            b'{"usage":null,"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}',
            b'{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}',
        ),
        (
            b'{"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}], "usage": null}',
            b'{"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}',
        ),
        (
            b'{"usage": null, "id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}',
            b'{"id": "x", "choices": [{"index": 0, "delta": {"content": "a"}}]}',
        ),
    ],
    ids=["compact-last", "compact-first", "spaced-last", "spaced-first"],
)
def test_strip_usage_removes_the_null_field_wherever_it_is(sent: bytes, kept: bytes) -> None:
    """`"usage":null` is removed whether it comes first or last in the chunk and whether the
    JSON is compact or written with spaces (Python's json.dumps); the rest stays valid JSON."""
    meter = CompletionMeter(strip_usage=True)
    got = _feed_all(meter, _sse([sent]) + b"data: [DONE]\n\n", [3])
    assert got == _sse([kept]) + b"data: [DONE]\n\n"
    assert orjson.loads(kept)["choices"][0]["delta"]["content"] == "a"
    assert meter.texts == ["a"]


def test_strip_usage_keeps_usage_text_inside_content() -> None:
    """Only the usage field is removed: content that mentions `"usage":null` reaches the
    client intact (inside a JSON string its quotes are escaped)."""
    content = 'say ,"usage":null and "usage": null, please'
    event = _chunk({"content": content}, usage=False)
    data = _sse([event]) + b"data: [DONE]\n\n"
    meter = CompletionMeter(strip_usage=True)
    assert _feed_all(meter, data, [1]) == data
    assert meter.texts == [content]


def test_done_is_set_only_by_done() -> None:
    """`done` is false until the `[DONE]` event arrives (with or without a space)."""
    meter = CompletionMeter()
    meter.feed(_sse([_chunk({"content": "hi"})]))
    assert not meter.done
    meter.feed(b"data:[DONE]\n\n")
    assert meter.done
    cut = CompletionMeter()
    cut.feed(_sse([_chunk({"content": "hi"})]) + b"data: [DO")
    assert not cut.done
    assert cut.flush() == b"data: [DO"
    assert not cut.done


@pytest.mark.parametrize("sizes", [[1], [3], [4096]], ids=["bytes", "threes", "whole"])
def test_crlf_separators(sizes: list[int]) -> None:
    """Events separated by `\\r\\n\\r\\n` are read, and stripped, like `\\n\\n` ones."""
    meter = CompletionMeter(strip_usage=True)
    got = _feed_all(meter, _stream(with_usage=True, sep=b"\r\n\r\n"), sizes)
    assert got == _stream(with_usage=False, sep=b"\r\n\r\n")
    assert "".join(meter.texts) == "".join(WORDS)
    assert meter.usage == USAGE
    assert meter.done


def test_tool_call_deltas_are_counted() -> None:
    """Tool-call names and argument fragments count as completion text."""
    events = [
        _chunk(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": ""},
                    }
                ],
            }
        ),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "Paris"}'}}]}),
        _chunk({}, finish="tool_calls"),
    ]
    meter = CompletionMeter()
    _feed_all(meter, _sse(events) + b"data: [DONE]\n\n", [1])
    assert "".join(meter.texts) == 'get_weather{"city": "Paris"}'
    enc = get_encoding("o200k_base")
    assert meter.local_tokens(enc) == len(enc.encode_ordinary('get_weather{"city": "Paris"}'))
    assert meter.local_tokens(enc) > 0
    assert meter.usage is None
    assert meter.reported_usage() is None


def test_legacy_completion_stream_text_is_counted() -> None:
    """`/v1/completions` streams carry `text` in each choice; it is counted."""
    events = [
        orjson.dumps({"choices": [{"index": 0, "text": word, "finish_reason": None}]})
        for word in WORDS
    ]
    meter = CompletionMeter()
    _feed_all(meter, _sse(events) + b"data: [DONE]\n\n", [2])
    assert meter.texts == WORDS


def test_observe_body_reads_a_whole_answer() -> None:
    """A non-streamed chat answer: message content, tool calls and usage are read."""
    body = orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {
                        "role": "assistant",
                        "content": "Hello there",
                        "tool_calls": [
                            {
                                "id": "c",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{}"},
                            }
                        ],
                    },
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        }
    )
    meter = CompletionMeter()
    meter.observe_body(body)
    assert meter.texts == ["Hello there", "f", "{}"]
    assert meter.usage == USAGE
    assert meter.reported_usage() == TokenUsage(9, 3)
    assert meter.done
    enc = get_encoding("cl100k_base")
    assert meter.local_tokens(enc) == len(enc.encode_ordinary("Hello theref{}"))


def test_observe_body_reads_completions_and_embeddings() -> None:
    """A legacy completion's `text` is read; an embeddings answer has prompt usage only."""
    meter = CompletionMeter()
    meter.observe_body(orjson.dumps({"choices": [{"index": 0, "text": "abc"}], "usage": USAGE}))
    assert meter.texts == ["abc"]
    embeddings = CompletionMeter()
    embeddings.observe_body(
        orjson.dumps(
            {"data": [{"embedding": [0.1]}], "usage": {"prompt_tokens": 4, "total_tokens": 4}}
        )
    )
    assert embeddings.texts == []
    assert embeddings.reported_usage() == TokenUsage(4, 0)
    assert embeddings.local_tokens(get_encoding("cl100k_base")) == 0


@pytest.mark.parametrize("body", [b"", b"{not json", b"[1, 2]", b'"text"', b"null"])
def test_observe_body_ignores_what_is_not_an_answer(body: bytes) -> None:
    """A body that is not a JSON object leaves the meter empty, without raising."""
    meter = CompletionMeter()
    meter.observe_body(body)
    assert meter.texts == []
    assert meter.usage is None
    assert not meter.done


def test_malformed_lines_are_ignored() -> None:
    """Broken JSON, non-object JSON, comments and other SSE fields are skipped; the events
    around them still count, and every byte is handed on even when stripping."""
    data = (
        b": keep-alive\n\n"
        + b"data: {not json\n\n"
        + b"data: [1, 2]\n\n"
        + b'data: "text"\n\n'
        + b"event: message\nid: 7\n"
        + b"data: "
        + _chunk({"content": "ok"}, usage=False)
        + b"\n\n"
        + b'data: {"choices": "nope"}\n\n'
        + b'data: {"choices": [1, null, {"delta": "x"}, {"delta": {"content": 5}}]}\n\n'
        + b'data: {"choices": [{"delta": {"tool_calls": [1, {"function": "f"}]}}]}\n\n'
        + b"data: [DONE]\n\n"
    )
    for strip in (False, True):
        meter = CompletionMeter(strip_usage=strip)
        assert _feed_all(meter, data, [1]) == data
        assert meter.texts == ["ok"]
        assert meter.usage is None
        assert meter.done


def test_unterminated_last_event_is_flushed_unread() -> None:
    """An event without its closing blank line is handed on by flush() as it is."""
    tail = b"data: " + _chunk({"content": "late"})
    meter = CompletionMeter(strip_usage=True)
    out = meter.feed(_sse([_chunk({"content": "a"}, usage=False)]) + tail)
    assert out + meter.flush() == _sse([_chunk({"content": "a"}, usage=False)]) + tail
    assert meter.flush() == b""


def test_last_usage_wins() -> None:
    """When several chunks carry usage, the last one is the one billed."""
    first = orjson.dumps({"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}})
    meter = CompletionMeter()
    meter.feed(_sse([first, _usage_chunk()]))
    assert meter.reported_usage() == TokenUsage(9, 3)


@pytest.mark.parametrize(
    "usage",
    [
        {"prompt_tokens": -1, "completion_tokens": 3},
        {"prompt_tokens": 9, "completion_tokens": -3},
        {"prompt_tokens": 9.0, "completion_tokens": 3},
        {"prompt_tokens": 9, "completion_tokens": 3.5},
        {"prompt_tokens": "9", "completion_tokens": 3},
        {"prompt_tokens": 9, "completion_tokens": "3"},
        {"prompt_tokens": True, "completion_tokens": 3},
        {"prompt_tokens": 9, "completion_tokens": False},
        {"prompt_tokens": None, "completion_tokens": 3},
        {"prompt_tokens": 9, "completion_tokens": None},
        {"completion_tokens": 3},
        {},
    ],
)
def test_upstream_tokens_rejects_bad_numbers(usage: dict[str, Any]) -> None:
    """Usage whose token counts are missing, negative or not integers (floats, strings,
    booleans) is not trusted: upstream_tokens() is None, so the gateway's count is billed."""
    meter = CompletionMeter()
    meter.observe_body(orjson.dumps({"choices": [], "usage": usage}))
    assert meter.reported_usage() is None


def test_upstream_tokens_accepts_zero_and_big_ints() -> None:
    """Zero and large integer counts are taken as they are."""
    for prompt, completion in [(0, 0), (10**9, 2**40)]:
        meter = CompletionMeter()
        usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        meter.observe_body(orjson.dumps({"usage": usage}))
        assert meter.reported_usage() == TokenUsage(prompt, completion)


def test_local_tokens_count_the_joined_text() -> None:
    """The local count tokenizes the concatenated text, not each delta apart (BPE merges
    across delta boundaries)."""
    meter = CompletionMeter()
    meter.feed(_sse([_chunk({"content": "hel"}), _chunk({"content": "lo world"})]))
    enc = get_encoding("cl100k_base")
    assert meter.local_tokens(enc) == len(enc.encode_ordinary("hello world")) == 2
    assert CompletionMeter().local_tokens(enc) == 0


async def test_long_answer_is_counted_off_the_loop_with_the_same_result() -> None:
    """A completion longer than the offload threshold is counted on a worker thread, and the
    count equals the one made on the loop."""
    from gateway.metering.prompt import OFFLOAD_BYTES
    from gateway.metering.tokenizers import get_encoding

    encoding = get_encoding("o200k_base")
    meter = CompletionMeter()
    meter.texts.extend(["word "] * (OFFLOAD_BYTES // 5 + 10))
    assert sum(map(len, meter.texts)) > OFFLOAD_BYTES
    assert await meter.count_local_tokens(encoding) == meter.local_tokens(encoding)
    short = CompletionMeter()
    short.texts.append("Hello there")
    assert await short.count_local_tokens(encoding) == 2
