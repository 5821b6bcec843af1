"""Usage the gateway forced (`stream_options.include_usage`) is hidden again, byte for byte:
for each server's shape, the stream the gateway relays to a client that did not ask for usage
equals the stream that server sends when not asked.

Each shape is written twice by hand, from the servers' own code and documentation: as the
server streams it with `include_usage: true` (what the gateway receives) and without it
(what the client would have got directly).

- OpenAI: with include_usage every chunk has `"usage":null` and a last chunk with
  `"choices":[]` carries the usage (API reference, `stream_options`); without, no usage key.
- vLLM (entrypoints/openai/serving_chat.py): chunks are dumped with exclude_unset, so they
  have no usage key; with include_usage a last chunk with `"choices":[]` carries it; with
  `continuous_usage_stats` as well, every chunk carries the usage so far.
- LiteLLM (litellm_core_utils/streaming_handler.py): with include_usage one more chunk before
  [DONE], built from an empty model response: `"choices":[{"index":0,"delta":{}}]` and the
  usage. Legacy completions (TextCompletionStreamWrapper): zero usage on every chunk when not
  asked; when asked, `"usage":null` on each and the usage on a last chunk with an empty text.
- A server that puts the usage on its finish chunk (content and usage in one event).
"""

from __future__ import annotations

import random

import orjson
import pytest

from gateway.metering.completion import CompletionMeter
from gateway.pricing import TokenUsage

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}
DONE = b"data: [DONE]"


def _sse(payloads: list[bytes], sep: bytes) -> bytes:
    return b"".join(b"data: " + p + sep for p in payloads) + DONE + sep


# -- OpenAI chat ------------------------------------------------------------------------------

_OA = b'"id":"chatcmpl-A","object":"chat.completion.chunk","created":1727000000,'
_OA += b'"model":"gpt-4o-mini-2024-07-18","service_tier":"default","system_fingerprint":"fp_1",'
_OA_CHOICES = [
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},'
    b'"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]',
]
_OA_USAGE = (
    b'"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12,'
    b'"prompt_tokens_details":{"cached_tokens":0,"audio_tokens":0},'
    b'"completion_tokens_details":{"reasoning_tokens":0,"audio_tokens":0,'
    b'"accepted_prediction_tokens":0,"rejected_prediction_tokens":0}}'
)
OPENAI_USAGE = {
    **USAGE,
    "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
    "completion_tokens_details": {
        "reasoning_tokens": 0,
        "audio_tokens": 0,
        "accepted_prediction_tokens": 0,
        "rejected_prediction_tokens": 0,
    },
}


def openai_chat(include_usage: bool) -> list[bytes]:
    obf = [b',"obfuscation":"q%d"' % k for k in range(len(_OA_CHOICES))]
    if not include_usage:
        return [b"{" + _OA + c + o + b"}" for c, o in zip(_OA_CHOICES, obf, strict=True)]
    out = [
        b"{" + _OA + c + b',"usage":null' + o + b"}" for c, o in zip(_OA_CHOICES, obf, strict=True)
    ]
    return [*out, b"{" + _OA + b'"choices":[],' + _OA_USAGE + b',"obfuscation":"zz"}']


# -- OpenAI legacy completions ----------------------------------------------------------------

_OC = b'"id":"cmpl-A","object":"text_completion","created":1727000000,'


def _oc_choice(text: str, finish: str | None) -> bytes:
    return (
        b'"choices":[{"text":'
        + orjson.dumps(text)
        + b',"index":0,"logprobs":null,"finish_reason":'
        + orjson.dumps(finish)
        + b"}]"
    )


_OC_TAIL = b',"model":"gpt-3.5-turbo-instruct","system_fingerprint":null'
_OC_CHOICES = [_oc_choice("Hello", None), _oc_choice(" there", None), _oc_choice("!", "stop")]


def openai_completions(include_usage: bool) -> list[bytes]:
    if not include_usage:
        return [b"{" + _OC + c + _OC_TAIL + b"}" for c in _OC_CHOICES]
    out = [b"{" + _OC + c + _OC_TAIL + b',"usage":null}' for c in _OC_CHOICES]
    usage = b',"usage":' + orjson.dumps(USAGE)
    return [*out, b"{" + _OC + b'"choices":[]' + _OC_TAIL + usage + b"}"]


# -- vLLM chat --------------------------------------------------------------------------------

_VL = b'"id":"chatcmpl-V","object":"chat.completion.chunk","created":1727000000,"model":"llama",'
_VL_CHOICES = [
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
    b'"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{"content":"Hello"},"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{"content":" there"},"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"index":0,"delta":{"content":"!"},"logprobs":null,"finish_reason":"stop",'
    b'"stop_reason":null}]',
]


def _vl_usage(completion: int) -> bytes:
    usage = {"prompt_tokens": 9, "total_tokens": 9 + completion, "completion_tokens": completion}
    return b',"usage":' + orjson.dumps(usage)


def vllm_chat(include_usage: bool) -> list[bytes]:
    out = [b"{" + _VL + c + b"}" for c in _VL_CHOICES]
    if include_usage:
        out.append(b"{" + _VL + b'"choices":[]' + _vl_usage(3) + b"}")
    return out


def vllm_continuous(include_usage: bool) -> list[bytes]:
    """The client asked `{"continuous_usage_stats": true}` alone: vLLM sends usage only
    once include_usage is set too (which the gateway does), then on every chunk."""
    if not include_usage:
        return vllm_chat(False)
    counts = [0, 1, 2, 3]
    out = [b"{" + _VL + c + _vl_usage(n) + b"}" for c, n in zip(_VL_CHOICES, counts, strict=True)]
    return [*out, b"{" + _VL + b'"choices":[]' + _vl_usage(3) + b"}"]


# -- LiteLLM proxy ------------------------------------------------------------------------------

_LL = b'"id":"chatcmpl-L","created":1727000000,"model":"gpt-4o","object":"chat.completion.chunk",'
_LL += b'"system_fingerprint":"fp_1",'
_LL_CHOICES = [
    b'"choices":[{"index":0,"delta":{"content":"Hello","role":"assistant"}}]',
    b'"choices":[{"index":0,"delta":{"content":" there"}}]',
    b'"choices":[{"index":0,"delta":{"content":"!"}}]',
    b'"choices":[{"finish_reason":"stop","index":0,"delta":{}}]',
]


def litellm_chat(include_usage: bool) -> list[bytes]:
    out = [b"{" + _LL + c + b"}" for c in _LL_CHOICES]
    if include_usage:
        usage = (
            b'"usage":{"completion_tokens":3,"prompt_tokens":9,"total_tokens":12,'
            b'"completion_tokens_details":null,"prompt_tokens_details":null}'
        )
        out.append(b"{" + _LL + b'"choices":[{"index":0,"delta":{}}],' + usage + b"}")
    return out


_LC = b'"id":"cmpl-L","object":"text_completion","created":1727000000,"model":"gpt-3.5-turbo",'
_LC_CHOICES = [
    b'"choices":[{"text":"Hello","index":0,"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"text":" there","index":0,"logprobs":null,"finish_reason":null}]',
    b'"choices":[{"text":"!","index":0,"logprobs":null,"finish_reason":"stop"}]',
]
_ZERO = b',"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}'


def litellm_completions(include_usage: bool) -> list[bytes]:
    if not include_usage:
        return [b"{" + _LC + c + _ZERO + b"}" for c in _LC_CHOICES]
    out = [b"{" + _LC + c + b',"usage":null}' for c in _LC_CHOICES]
    last = b'"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":null}]'
    return [*out, b"{" + _LC + last + b',"usage":' + orjson.dumps(USAGE) + b"}"]


# -- usage on the finish chunk ------------------------------------------------------------------

_FIN = [
    b'{"id":"gen-1","provider":"OpenAI","model":"m","object":"chat.completion.chunk",'
    b'"created":1727000000,"choices":[{"index":0,"delta":{"role":"assistant",'
    b'"content":"Hello there!"},"finish_reason":null,"logprobs":null}]}',
    b'{"id":"gen-1","provider":"OpenAI","model":"m","object":"chat.completion.chunk",'
    b'"created":1727000000,"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"finish_reason":"stop","native_finish_reason":"stop","logprobs":null}]%s}',
]


def finish_with_usage(include_usage: bool) -> list[bytes]:
    usage = b',"usage":' + orjson.dumps(USAGE) if include_usage else b""
    return [_FIN[0], _FIN[1] % usage]


def spaced_finish_with_usage(include_usage: bool) -> list[bytes]:
    """Python's json.dumps (", " and ": "), the usage in the middle of the object."""
    head = b'{"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, '
    first = head + b'"delta": {"content": "Hello there!"}, "finish_reason": null}]}'
    usage = b'"usage": {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}'
    last = head + b'"delta": {}, "finish_reason": "stop"}], ' + usage + b', "model": "m"}'
    if not include_usage:
        last = head + b'"delta": {}, "finish_reason": "stop"}], "model": "m"}'
    return [first, last]


def usage_first(include_usage: bool) -> list[bytes]:
    """The usage as the first member of a content chunk."""
    body = b'"id":"x","choices":[{"index":0,"delta":{"content":"Hello there!"},'
    body += b'"finish_reason":"stop"}]}'
    if not include_usage:
        return [b"{" + body]
    return [b'{"usage":' + orjson.dumps(USAGE) + b"," + body]


SHAPES = {
    "openai-chat": (openai_chat, OPENAI_USAGE),
    "openai-completions": (openai_completions, USAGE),
    "vllm-chat": (vllm_chat, USAGE),
    "vllm-continuous-usage": (vllm_continuous, USAGE),
    "litellm-chat": (
        litellm_chat,
        {**USAGE, "completion_tokens_details": None, "prompt_tokens_details": None},
    ),
    "finish-chunk-usage": (finish_with_usage, USAGE),
    "finish-chunk-usage-spaced": (spaced_finish_with_usage, USAGE),
    "usage-first": (usage_first, USAGE),
}


def _random_sizes(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(1, 40) for _ in range(64)]


CUTS = [[1], [3], [7], [1 << 16], _random_sizes(1), _random_sizes(2)]
SEPARATORS = {"lf": b"\n\n", "crlf": b"\r\n\r\n"}


def _relay(data: bytes, sizes: list[int]) -> tuple[bytes, CompletionMeter]:
    """What a client that did not ask for usage gets of `data`, fed in pieces of `sizes`."""
    meter = CompletionMeter(strip_usage=True)
    out = bytearray()
    pos = i = 0
    while pos < len(data):
        size = sizes[i % len(sizes)]
        out += meter.feed(data[pos : pos + size])
        pos += size
        i += 1
    return bytes(out + meter.flush()), meter


@pytest.mark.parametrize("sep", SEPARATORS.values(), ids=SEPARATORS.keys())
@pytest.mark.parametrize("sizes", CUTS, ids=[f"cut{i}" for i in range(len(CUTS))])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPES.keys())
def test_stripped_stream_is_the_stream_without_usage(
    shape: str, sizes: list[int], sep: bytes
) -> None:
    """For each server's shape, however the stream is cut and framed, the client gets the
    very bytes the server sends when not asked for usage, and the meter has read the usage."""
    build, usage = SHAPES[shape]
    got, meter = _relay(_sse(build(True), sep), sizes)
    assert got == _sse(build(False), sep)
    assert meter.usage == usage
    assert meter.reported_usage() == TokenUsage(9, 3)
    assert "".join(meter.texts) == "Hello there!"
    assert meter.done


@pytest.mark.parametrize("sep", SEPARATORS.values(), ids=SEPARATORS.keys())
@pytest.mark.parametrize("sizes", CUTS, ids=[f"cut{i}" for i in range(len(CUTS))])
def test_litellm_legacy_completions(sizes: list[int], sep: bytes) -> None:
    """LiteLLM's legacy completions: the usage-only last chunk (an empty text) is dropped and
    the `"usage":null` fields removed. The zero usage LiteLLM puts on every chunk when not
    asked cannot be told from the usage the gateway asked for, so the client gets the stream
    without it: the direct stream with its zero usage fields removed (the documented
    difference)."""
    got, meter = _relay(_sse(litellm_completions(True), sep), sizes)
    direct = _sse(litellm_completions(False), sep)
    assert got != direct
    assert got == direct.replace(_ZERO, b"")
    assert meter.usage == USAGE
    assert "".join(meter.texts) == "Hello there!"


def test_events_without_usage_pass_untouched() -> None:
    """Only events with a top-level usage key are rewritten: an event that mentions usage
    in its content, or carries a usage object inside a choice, reaches the client as it came;
    an event with other fields than the envelope keeps them and loses only its usage."""
    mention = b'{"choices":[{"index":0,"delta":{"content":"\\"usage\\":{} and usage"}}]}'
    nested = b'{"choices":[{"index":0,"delta":{"content":"a"},"usage":{"x":1}}]}'
    flagged = b'{"id":"x","choices":[],"prompt_filter_results":[{"prompt_index":0}],'
    flagged_usage = flagged + b'"usage":' + orjson.dumps(USAGE) + b"}"
    data = _sse([mention, nested, flagged_usage], b"\n\n")
    got, meter = _relay(data, [5])
    assert got == _sse([mention, nested, flagged[:-1] + b"}"], b"\n\n")
    assert meter.usage == USAGE


def test_usage_key_spelled_with_an_escape_is_rewritten() -> None:
    """A usage key the byte scan cannot see (written with a \\u escape) is still removed:
    that one event is serialized anew."""
    event = b'{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}],"\\u0075sage":null}'
    got, _ = _relay(_sse([event], b"\n\n"), [1 << 16])
    assert got == _sse([b'{"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}'], b"\n\n")


def test_multiline_data_event_is_rewritten_in_place() -> None:
    """An event whose JSON spans several `data:` lines (and has an `id:` line) loses its
    usage; its other lines stay where they were."""
    event = b'id: 7\ndata: {"id":"x","choices":[{"index":0,\ndata: "delta":{"content":"a"}}],'
    event += b'"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n'
    got, meter = _relay(event + DONE + b"\n\n", [4])
    expected = b'id: 7\ndata: {"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    assert got == expected + DONE + b"\n\n"
    assert meter.reported_usage() == TokenUsage(1, 1)
    assert meter.texts == ["a"]


def test_passthrough_when_the_client_asked() -> None:
    """Without strip_usage (the client asked for usage), every shape passes unchanged."""
    for build, _ in SHAPES.values():
        data = _sse(build(True), b"\n\n")
        meter = CompletionMeter()
        assert b"".join(meter.feed(data[i : i + 9]) for i in range(0, len(data), 9)) == data
