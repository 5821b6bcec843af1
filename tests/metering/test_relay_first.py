"""The stream meter sends events on before it reads them (issue 19: time to first token), and
a stopped stream still delivers the events its hold covers.

The relay-first path must give the client exactly the bytes, and the meter exactly the text
and usage, that reading every event first gives: checked against that path (the meter with
`_relay_first` turned off) on random streams split at random points, with usage chunks,
`"usage": null` members, usage mentioned in content, escapes and multi-line events."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.metering.completion import CompletionMeter
from gateway.metering.events import MessagesMeter

USAGE = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}


class _ReadFirst(CompletionMeter):
    """The meter as it was: every event read before any byte goes on."""

    __slots__ = ()

    def _relay_first(self, complete: bytes) -> bytes | None:
        return None


def _event(rng: random.Random, i: int) -> bytes:
    kind = rng.random()
    base: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "model": "m"}
    if kind < 0.08:
        return b"data: " + orjson.dumps({**base, "choices": [], "usage": USAGE})
    if kind < 0.14:
        obj = {**base, "choices": [{"index": 0, "delta": {"content": f"t{i}"}}], "usage": None}
        return b"data: " + orjson.dumps(obj)
    if kind < 0.18:
        text = f'the word "usage" {i}'
        return b"data: " + orjson.dumps(
            {**base, "choices": [{"index": 0, "delta": {"content": text}}]}
        )
    if kind < 0.22:  # a non-ASCII piece written with an escape, as Python's json writes it
        return b'data: {"choices":[{"index":0,"delta":{"content":"caf\\u00e9"}}]}'
    if kind < 0.25:  # one event over two data: lines
        return b'data: {"choices":[{"index":1,\ndata: "delta":{"content":"two"}}]}'
    index = 1 if kind < 0.4 else 0
    return b"data: " + orjson.dumps(
        {**base, "choices": [{"index": index, "delta": {"content": f" w{i}"}}]}
    )


def _stream(rng: random.Random) -> bytes:
    events = [_event(rng, i) for i in range(rng.randint(1, 40))]
    return b"\n\n".join([*events, b"data: [DONE]"]) + b"\n\n"


def _relay(meter: CompletionMeter, data: bytes, cuts: list[int]) -> bytes:
    out, start = [], 0
    for cut in [*cuts, len(data)]:
        out.append(meter.feed(data[start:cut]))
        start = cut
    out.append(meter.flush())
    return b"".join(out)


@pytest.mark.parametrize("seed", range(300))
def test_relay_first_sends_and_reads_what_reading_first_does(seed: int) -> None:
    rng = random.Random(seed)
    data = _stream(rng)
    cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 6))))
    fast, slow = CompletionMeter(strip_usage=True), _ReadFirst(strip_usage=True)
    assert _relay(fast, data, cuts) == _relay(slow, data, cuts)
    assert fast.texts == slow.texts
    assert fast.choice_texts() == slow.choice_texts()
    assert fast.usage == slow.usage
    assert fast.done == slow.done
    assert fast.last == slow.last


def test_a_fast_upstreams_one_read_goes_on_before_it_is_read() -> None:
    """64 events, the usage chunk and `[DONE]` in one read: every event but the usage chunk
    goes on, and nothing of them is read until the meter is looked at."""
    events = [
        b"data: " + orjson.dumps({"choices": [{"index": 0, "delta": {"content": f" t{i}"}}]})
        for i in range(64)
    ]
    usage = b"data: " + orjson.dumps({"choices": [], "usage": USAGE})
    data = b"\n\n".join([*events, usage, b"data: [DONE]"]) + b"\n\n"
    meter = CompletionMeter(strip_usage=True)
    out = meter.feed(data)
    assert out == b"\n\n".join([*events, b"data: [DONE]"]) + b"\n\n"
    assert meter._texts == []  # not read yet: the relay writes first
    assert len(meter.texts) == 64  # read once looked at
    assert meter.usage == USAGE
    assert meter.done


def test_a_stopped_stream_delivers_the_whole_events_its_hold_covers() -> None:
    """`events_within`: the head of a chunk, to the end of a whole event, with at most the
    pieces asked for; an event begun in the previous chunk counts as one; CRLF framing
    delivers nothing (as before); the Messages meter keeps to its opening events."""
    events = [b'data: {"choices":[{"index":0,"delta":{"content":"x"}}]}'] * 10
    chunk = b"\n\n".join(events) + b"\n\n"
    meter = CompletionMeter()
    assert meter.events_within(chunk, 3) == b"\n\n".join(events[:3]) + b"\n\n"
    assert meter.events_within(chunk, 0) == b""
    assert meter.events_within(chunk, 50) == chunk
    meter.feed(chunk[:20])  # mid-event: the next chunk ends that event first
    rest = chunk[20:]
    assert rest.count(b"data:") == 9
    head = meter.events_within(rest, 3)
    assert head.count(b"data:") == 2
    assert head.endswith(b"\n\n")
    assert CompletionMeter().events_within(chunk.replace(b"\n\n", b"\r\n\r\n"), 3) == b""
    assert MessagesMeter().events_within(chunk, 3) == b""
