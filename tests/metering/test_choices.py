"""Answers with several choices (`n` > 1): each choice's text is counted on its own, and the
counts summed, as the upstream counts them. Expected values come from tiktoken applied to
each choice's own text."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest

from gateway.metering.completion import CompletionMeter
from gateway.metering.tokenizers import get_encoding
from tests.admin_client import Admin
from tests.billing.checks import one_usage_record
from tests.procs import Proc

ENCODINGS = ["cl100k_base", "o200k_base"]
# Three choices, as a stream interleaves them: pieces that merge across choices when joined
# ("." + "." + "." is one token; "Paris" + "Rome" is not two).
PIECES: list[tuple[int, str]] = [
    (0, "Paris"),
    (1, "Rome"),
    (2, "Madrid"),
    (0, " is"),
    (1, " is"),
    (2, " is"),
    (0, " the"),
    (1, " the"),
    (2, " the"),
    (0, " answer"),
    (1, " answer"),
    (2, " answer"),
    (0, "."),
    (1, "."),
    (2, "."),
]


def _own_texts(pieces: list[tuple[int, str]]) -> dict[int, str]:
    texts: dict[int, str] = {}
    for index, piece in pieces:
        texts[index] = texts.get(index, "") + piece
    return texts


def _true_tokens(encoding: str, texts: dict[int, str]) -> int:
    enc = get_encoding(encoding)
    return sum(len(enc.encode_ordinary(text)) for text in texts.values())


def _chat_chunk(index: int, delta: dict[str, Any], finish: str | None = None) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-n",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "m",
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }
    )


def _chat_stream(pieces: list[tuple[int, str]]) -> bytes:
    """A hand-written OpenAI chat stream with n=3: a role chunk per choice, the pieces
    interleaved, a finish chunk per choice, [DONE]."""
    events = [_chat_chunk(k, {"role": "assistant", "content": ""}) for k in range(3)]
    events += [_chat_chunk(index, {"content": piece}) for index, piece in pieces]
    events += [_chat_chunk(k, {}, "stop") for k in range(3)]
    return b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"


def _feed(meter: CompletionMeter, data: bytes, size: int) -> bytes:
    out = b"".join(meter.feed(data[i : i + size]) for i in range(0, len(data), size))
    return out + meter.flush()


@pytest.mark.parametrize("size", [1, 5, 64, 1 << 16], ids=lambda s: f"cut{s}")
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_interleaved_choices_are_counted_one_by_one(encoding: str, size: int) -> None:
    """Three interleaved choices: the local count is the sum of each choice's own count,
    not the count of their pieces joined (which is smaller here), however the stream is cut."""
    meter = CompletionMeter()
    _feed(meter, _chat_stream(PIECES), size)
    own = _own_texts(PIECES)
    assert meter.choice_texts() == own
    expected = _true_tokens(encoding, own)
    joined = len(get_encoding(encoding).encode_ordinary("".join(p for _, p in PIECES)))
    assert joined < expected  # the merged count the meter must not take
    assert meter.local_tokens(get_encoding(encoding)) == expected


async def test_interleaved_choices_off_the_loop() -> None:
    """The worker-thread count of a long n>1 answer is the per-choice sum too."""
    pieces = PIECES * 400
    meter = CompletionMeter()
    _feed(meter, _chat_stream(pieces), 1 << 16)
    encoding = get_encoding("o200k_base")
    expected = _true_tokens("o200k_base", _own_texts(pieces))
    assert await meter.count_local_tokens(encoding) == expected == meter.local_tokens(encoding)


def test_several_choices_in_one_chunk_and_tool_calls() -> None:
    """A chunk may carry several choices at once, and tool-call deltas belong to their
    choice: each choice's text is its own content and tool-call pieces, in order."""
    both = orjson.dumps(
        {
            "choices": [
                {"index": 0, "delta": {"content": "a."}},
                {"index": 1, "delta": {"content": "b."}},
            ]
        }
    )
    call = orjson.dumps(
        {
            "choices": [
                {
                    "index": 1,
                    "delta": {
                        "tool_calls": [{"index": 0, "function": {"name": "f", "arguments": "."}}]
                    },
                },
                {"index": 0, "delta": {"content": "."}},
            ]
        }
    )
    meter = CompletionMeter()
    _feed(meter, b"data: " + both + b"\n\ndata: " + call + b"\n\ndata: [DONE]\n\n", 3)
    assert meter.choice_texts() == {0: "a..", 1: "b.f."}
    enc = get_encoding("cl100k_base")
    expected = len(enc.encode_ordinary("a..")) + len(enc.encode_ordinary("b.f."))
    assert meter.local_tokens(enc) == expected


def test_legacy_completion_choices() -> None:
    """`/v1/completions` with n=3: each choice's `text` is counted on its own."""
    events = [
        orjson.dumps({"choices": [{"index": index, "text": piece, "finish_reason": None}]})
        for index, piece in PIECES
    ]
    data = b"".join(b"data: " + e + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    meter = CompletionMeter()
    _feed(meter, data, 7)
    assert meter.choice_texts() == _own_texts(PIECES)
    assert meter.local_tokens(get_encoding("o200k_base")) == _true_tokens(
        "o200k_base", _own_texts(PIECES)
    )


def test_whole_answer_with_three_choices() -> None:
    """A non-streamed answer with three choices: their messages are counted one by one."""
    own = _own_texts(PIECES)
    body = orjson.dumps(
        {
            "choices": [
                {"index": k, "message": {"role": "assistant", "content": own[k]}} for k in own
            ]
        }
    )
    meter = CompletionMeter()
    meter.observe_body(body)
    assert meter.choice_texts() == own
    enc = get_encoding("cl100k_base")
    assert meter.local_tokens(enc) == _true_tokens("cl100k_base", own)


def test_one_choice_is_unchanged() -> None:
    """With one choice (index 0 or none given), the text is counted joined, as before."""
    events = [_chat_chunk(0, {"content": "hel"}), _chat_chunk(0, {"content": "lo world"})]
    meter = CompletionMeter()
    _feed(meter, b"".join(b"data: " + e + b"\n\n" for e in events), 4)
    unindexed = CompletionMeter()
    unindexed.feed(b'data: {"choices":[{"delta":{"content":"hel"}}]}\n\n')
    unindexed.feed(b'data: {"choices":[{"delta":{"content":"lo world"}}]}\n\n')
    enc = get_encoding("cl100k_base")
    for m in (meter, unindexed):
        assert m.choice_texts() == {0: "hello world"}
        assert m.local_tokens(enc) == len(enc.encode_ordinary("hello world")) == 2


async def test_gateway_bills_each_choice_when_the_upstream_reports_no_usage(
    gateway: Proc, admin: Admin
) -> None:
    """A stream with n=3 from an upstream that sends no usage: the gateway bills the sum of
    the choices' own token counts (tiktoken on each choice's text as the client got it)."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    payload = {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "three answers"}],
        "n": 3,
        "max_tokens": 12,
        "stream": True,
    }
    headers = {
        "Authorization": f"Bearer {key}",
        "x-mock-allow-n": "true",
        "x-mock-omit-usage": "true",
    }
    texts: dict[int, str] = {}
    joined = ""
    async with (
        aiohttp.ClientSession(headers=headers) as session,
        session.post(gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)) as resp,
    ):
        assert resp.status == 200
        raw = await resp.read()
    for event in raw.split(b"\n\n"):
        if not event.startswith(b"data: {"):
            continue
        chunk = orjson.loads(event[6:])
        assert "usage" not in chunk
        for choice in chunk["choices"]:
            piece = choice["delta"].get("content") or ""
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
            joined += piece
    assert sorted(texts) == [0, 1, 2]
    expected = _true_tokens("o200k_base", texts)  # the gateway's model is on o200k_base
    assert expected != len(get_encoding("o200k_base").encode_ordinary(joined))
    record = await one_usage_record(admin, account_id)
    assert record["usage_source"] == "gateway"
    assert record["completion_tokens"] == expected
    assert record["gateway_completion_tokens"] == expected
