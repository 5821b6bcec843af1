"""Completion tokens as they pass: the text of a whole answer or of an SSE stream.

The meter reads only what counting needs (choice text, tool-call arguments, `usage`). Each
choice's text is kept apart (by its `index`): with `n` > 1 the choices are counted one by one
and summed, as the upstream counts them (their texts joined would tokenize differently).

Usage the gateway asked for on the client's behalf (`strip_usage`: the gateway set
`stream_options.include_usage` and the client had not) is read, then hidden again, so the
client gets the events the upstream would have sent without the gateway. The gateway cannot
know what a given upstream sends when not asked, so the rule is the one that is exact for
OpenAI and vLLM (which send no `usage` key at all when not asked):

- an event whose `usage` is not null (a report, even of zeros) and that, without it, carries
  nothing a client could use is dropped. "Nothing" means: its `choices` are absent, empty, or
  each has only an `index` besides blank values (null, "", {}, [] or objects of those: the
  empty `delta` and null `finish_reason` / `logprobs` of LiteLLM's usage chunk, the empty
  `text` of a legacy completion's), and its other fields are the envelope (`id`, `object`,
  `created`, `model`, `system_fingerprint`, `service_tier`, `obfuscation`) or blank.
  OpenAI's and vLLM's usage chunk (`"choices": []`) and LiteLLM's
  (`[{"index": 0, "delta": {}}]`) are such events;
- from every other event that has a top-level `usage` key (OpenAI's `"usage": null` on every
  chunk, vLLM's continuous usage, a finish chunk that also carries the usage), the key alone
  is removed, with the comma that separated it: every other byte of the event is kept, and
  every event without a `usage` key is passed on untouched. (An event split over several
  `data:` lines is re-serialized instead.)

Where an upstream would have sent usage unasked (LiteLLM puts zero usage on each legacy
completions chunk), the client does not get it through a gateway that forced usage: the
gateway cannot tell it from the usage it asked for.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import orjson
import tiktoken

from gateway.metering.prompt import OFFLOAD_BYTES
from gateway.metering.usage import read_usage
from gateway.pricing import TokenUsage

__all__ = ["CompletionMeter", "UsagePrice"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
_NOT_JSON = object()
# A JSON string or one structural character: enough to find a top-level member's bytes.
_JSON_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[{}\[\],:]')
_USAGE_KEY = b'"usage"'
_WHITESPACE = b" \t\r\n"
# Top-level fields that say nothing by themselves: a chunk of only these (and usage) is the
# usage chunk.
_ENVELOPE = frozenset(
    {"id", "object", "created", "model", "system_fingerprint", "service_tier", "obfuscation"}
)


def _payload(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None if it has none."""
    if event.startswith(b"data: ") and event.count(b"\n", 0, -2) == 0:
        return event[6:].strip()  # the usual case: a single `data: ...` line
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)


def _blank(value: Any) -> bool:
    """Null, "", [], {} or an object of such values: nothing a client could use."""
    if value is None:
        return True
    if isinstance(value, str | list):
        return not value
    if isinstance(value, dict):
        return all(_blank(item) for item in value.values())
    return False


def _usage_only(obj: dict[str, Any]) -> bool:
    """True when the event has a `usage` (not null) and, without it, carries nothing else."""
    if obj.get("usage") is None:
        return False
    for key, value in obj.items():
        if key == "usage" or key in _ENVELOPE:
            continue
        if key == "choices":
            if not isinstance(value, list):
                return False
            for choice in value:
                if not isinstance(choice, dict):
                    return False
                for field, item in choice.items():
                    if field != "index" and not _blank(item):
                        return False
        elif not _blank(value):
            return False
    return True


def _cut_member(text: bytes, start: int) -> bytes | None:
    """`text` without the top-level `"usage"` member of the JSON object that opens at
    `start` (and without the comma that separated it from a neighbour); None if that object
    has no such member spelled plainly."""
    depth = 0
    expect_key = False
    comma = -1  # the last top-level comma before the member
    member = -1  # where the member's key starts
    for match in _JSON_TOKEN.finditer(text, start):
        at = match.start()
        char = text[at]
        if char == 0x7B or char == 0x5B:  # { [
            depth += 1
            expect_key = depth == 1
            continue
        if char == 0x7D or char == 0x5D:  # } ]
            depth -= 1
            if depth == 0:
                if member < 0:
                    return None
                end = at
                while text[end - 1] in _WHITESPACE:
                    end -= 1
                return text[: comma if comma >= 0 else member] + text[end:]
            continue
        if depth != 1:
            continue
        if char == 0x2C:  # ,
            if member >= 0:
                end = match.end()
                while end < len(text) and text[end] in _WHITESPACE:
                    end += 1
                return text[:member] + text[end:]
            comma = at
            expect_key = True
        elif char == 0x22:  # a string: a key where one is expected
            if expect_key and member < 0 and match.group() == _USAGE_KEY:
                member = at
            expect_key = False
        else:
            expect_key = False
    return None


def _without_usage(event: bytes, obj: dict[str, Any]) -> bytes:
    """The event with its top-level `usage` member removed, all its other bytes kept."""
    if obj["usage"] is None and event.count(_USAGE_KEY) == 1:
        for pattern in _NULL_USAGE:  # the usual case: OpenAI's `"usage":null`
            if pattern in event:
                return event.replace(pattern, b"", 1)
    data = event.find(b"data:")
    if data >= 0 and event.count(b"data:") == 1:
        brace = event.find(b"{", data)
        if brace >= 0:
            cut = _cut_member(event, brace)
            if cut is not None:
                return cut
    # Several `data:` lines (or a key spelled with escapes): the event is written anew, its
    # other lines kept where they were.
    rest = {key: value for key, value in obj.items() if key != "usage"}
    ending = event[len(event.rstrip(b"\r\n")) :]
    lines = event[: len(event) - len(ending)].splitlines()
    newline = b"\r\n" if b"\r\n" in event else b"\n"
    out: list[bytes] = []
    written = False
    for line in lines:
        if not line.startswith(b"data:"):
            out.append(line)
        elif not written:
            out.append(b"data: " + orjson.dumps(rest))
            written = True
    return newline.join(out) + ending


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def _stripped(
    events: list[bytes], objects: list[dict[str, Any] | None], sep: bytes
) -> tuple[bytes, bool]:
    """The events a client that did not ask for usage gets (see the module docstring),
    joined with `sep`, and whether there are any."""
    nulls = 0
    for obj in objects:
        if obj is not None and "usage" in obj:
            if obj["usage"] is not None:
                break
            nulls += 1
    else:
        # The usual case (OpenAI's `"usage":null` on every chunk, or no usage at all): one
        # replace over the joined events, when each of their keys is found once, plainly.
        joined = sep.join(events)
        if not nulls:
            return joined, bool(events)
        if joined.count(_USAGE_KEY) == nulls:
            for pattern in _NULL_USAGE:
                joined = joined.replace(pattern, b"")
            if _USAGE_KEY not in joined:
                return joined, bool(events)
    out: list[bytes] = []
    for event, obj in zip(events, objects, strict=True):
        if obj is None or "usage" not in obj:
            out.append(event)
        elif not _usage_only(obj):
            out.append(_without_usage(event, obj))
    return sep.join(out), bool(out)


# The call's cost of a usage report (a decimal string), or None to leave the report as it is.
UsagePrice = Callable[[dict[str, Any]], str | None]


def _with_cost(event: bytes, cost: str) -> bytes:
    """The event with `"cost": "<cost>"` as the last member of its top-level `usage` object,
    every other byte kept; the event as it is when its usage is not spelled plainly."""
    data = event.find(b"data:")
    brace = event.find(b"{", data) if data >= 0 else -1
    if brace < 0:
        return event
    depth, key, opened = 0, False, -1
    for match in _JSON_TOKEN.finditer(event, brace):
        char = event[match.start()]
        if char == 0x7B or char == 0x5B:  # { [
            depth += 1
            if depth == 2 and key and char == 0x7B:
                opened = match.start()
            continue
        if char == 0x7D or char == 0x5D:  # } ]
            if depth == 2 and opened >= 0:
                at = match.start()
                inner = event[opened + 1 : at].strip(_WHITESPACE)
                member = b'"cost":"' + cost.encode() + b'"'
                return event[:at] + (b"," + member if inner else member) + event[at:]
            depth -= 1
            continue
        if depth == 1 and char == 0x22:
            key = match.group() == _USAGE_KEY
    return event


def _priced(
    events: list[bytes], objects: list[dict[str, Any] | None], sep: bytes, price: UsagePrice
) -> bytes:
    """The events, the usage report among them (an event of usage alone) carrying its cost."""
    out: list[bytes] = []
    for event, obj in zip(events, objects, strict=True):
        if obj is not None and isinstance(obj.get("usage"), dict) and _usage_only(obj):
            cost = price(obj["usage"])
            if cost is not None:
                event = _with_cost(event, cost)
        out.append(event)
    return sep.join(out)


class CompletionMeter:
    """Collects one answer's completion text and the upstream's `usage`, if any."""

    __slots__ = (
        "_choice",
        "_done",
        "_last",
        "_marks",
        "_pending",
        "_price",
        "_queued",
        "_read",
        "_strip_usage",
        "_texts",
        "_usage",
    )

    def __init__(self, strip_usage: bool = False, price: UsagePrice | None = None) -> None:
        self._strip_usage = strip_usage
        # With `price` (the client asked for usage and the gateway reports costs), the usage
        # chunk gets the call's cost as `"cost": "<decimal>"` in its `usage` object.
        self._price = None if strip_usage else price
        self._pending = b""
        # Every piece of text, in the order it came, whatever its choice: `_marks` says where
        # the choice changes, as (position in `texts`, choice index) from then on; with one
        # choice (index 0, the usual case) there are none.
        self._texts: list[str] = []
        self._marks: list[tuple[int, int]] = []
        self._choice = 0
        self._usage: dict[str, Any] | None = None
        self._read: tuple[dict[str, Any] | None, TokenUsage | None] = (None, None)
        self._done = False  # the stream's `[DONE]` was seen
        self._last: dict[str, Any] | None = None  # the last chunk with choices (for its id)
        # Whole events already relayed but not yet read (`_relay_first`): read, in order,
        # before anything the meter knows is looked at.
        self._queued: list[bytes] = []

    # What the meter has read; each first reads what was relayed unread.

    @property
    def texts(self) -> list[str]:
        """Every piece of text, in the order it came (see `_marks` for the choices)."""
        if self._queued:
            self._catch_up()
        return self._texts

    @property
    def usage(self) -> dict[str, Any] | None:
        """The upstream's last `usage` object, if any."""
        if self._queued:
            self._catch_up()
        return self._usage

    @usage.setter
    def usage(self, value: dict[str, Any] | None) -> None:
        self._usage = value

    @property
    def done(self) -> bool:
        if self._queued:
            self._catch_up()
        return self._done

    @done.setter
    def done(self, value: bool) -> None:
        self._done = value

    @property
    def last(self) -> dict[str, Any] | None:
        if self._queued:
            self._catch_up()
        return self._last

    def _catch_up(self) -> None:
        queued, self._queued = self._queued, []
        for complete in queued:
            self._parse(self._payloads(complete, complete.split(b"\n\n")))

    # whole answers ----------------------------------------------------------------------

    def observe_body(self, body: bytes) -> None:
        """Read a non-streamed answer."""
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(answer, dict):
            self._take(answer, delta_key="message")
            self.done = True

    # streams ----------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> bytes:
        """Read a stream chunk; return the bytes to send on (all of it unless stripping).

        The events that a chunk completes are parsed with one orjson call (a JSON array of
        their payloads): a fast upstream packs dozens of events in one read, and per-event
        Python work was most of a streamed call's metering cost."""
        carried = self._pending
        data = carried + chunk if carried else chunk
        if b"\r" in data:  # CRLF separators: the general, slower split
            return self._feed_crlf(data, chunk, carried)
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return chunk if self._passes(chunk, carried) else b""
        complete, self._pending = data[:cut], data[cut + 2 :]
        if self._strip_usage and (relayed := self._relay_first(complete)) is not None:
            return relayed
        events = complete.split(b"\n\n")
        objects = self._parse(self._payloads(complete, events))
        if self._passes(chunk, carried):
            return chunk
        if self._price is not None:
            return _priced(events, objects, b"\n\n", self._price) + b"\n\n"
        out, kept = _stripped(events, objects, b"\n\n")
        return out + b"\n\n" if kept else b""

    @staticmethod
    def _payloads(complete: bytes, events: list[bytes]) -> list[bytes | None]:
        if complete.count(b"\n") == 2 * (len(events) - 1):  # one line per event: the usual
            return [e[6:] if e[:6] == b"data: " else _payload(e) for e in events]
        return [_payload(e) for e in events]

    def _relay_first(self, complete: bytes) -> bytes | None:
        """The bytes to send on for these whole events, before they are read: the events
        ahead of the first that mentions `usage` go on as they came (nothing in them is
        stripped) and are read after the relay has written them (`_queued`: whatever looks
        at the meter reads them first). A fast upstream sends dozens of events in one read,
        and reading them all before the first byte went on was most of a stream's metering
        cost in its time to first token. The events from the first `usage` on are judged
        now (parsed, not yet read), and so are those from the first `\\u` escape on (a usage
        key may be spelled with one). None: the first event is one of those (read it now)."""
        at = complete.find(_USAGE_KEY)
        escape = complete.find(b"\\u")
        if escape >= 0 and (at < 0 or escape < at):
            at = escape
        if at < 0:
            self._queued.append(complete)
            return complete + b"\n\n"
        head_end = complete.rfind(b"\n\n", 0, at)
        if head_end < 0:
            return None
        rest = complete[head_end + 2 :]
        events = rest.split(b"\n\n")
        objects = self._parse(self._payloads(rest, events), take=False)
        out, kept = _stripped(events, objects, b"\n\n")
        self._queued.append(complete)
        return complete[: head_end + 2] + (out + b"\n\n" if kept else b"")

    def _feed_crlf(self, data: bytes, chunk: bytes, carried: bytes) -> bytes:
        events = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._pending = data[start:]
        objects = self._parse([_payload(event) for event in events])
        if self._passes(chunk, carried):
            return chunk
        if self._price is not None:
            return _priced(events, objects, b"", self._price)
        return _stripped(events, objects, b"")[0]

    def _passes(self, chunk: bytes, carried: bytes) -> bool:
        """Whether the chunk goes on as it came: nothing is stripped or priced, or (pricing)
        it holds no usage report and nothing is held back, before it or after it. Else only
        whole events go on (a partial one waits for its end)."""
        if self._strip_usage:
            return False
        if self._price is None:
            return True
        return not carried and not self._pending and _USAGE_KEY not in chunk

    def _parse(
        self, payloads: list[bytes | None], take: bool = True
    ) -> list[dict[str, Any] | None]:
        """Each payload's JSON object (None for `[DONE]`, comments and what is not JSON),
        taking its text and usage on the way unless `take` is false. (`[DONE]` entries
        become None in place.)"""
        if take and self._queued:
            self._catch_up()  # in the order they came
        wanted: list[bytes] = []
        for k, payload in enumerate(payloads):
            if payload is None:
                continue
            if payload[:1] == b"[" and payload.strip() == b"[DONE]":
                if take:
                    self._done = True
                payloads[k] = None
            else:
                wanted.append(payload)
        if len(wanted) == 1:
            parsed = [_loads(wanted[0])]
        elif wanted:
            try:
                parsed = orjson.loads(b"[" + b",".join(wanted) + b"]")
            except orjson.JSONDecodeError:  # one bad payload: parse them one by one
                parsed = [_loads(p) for p in wanted]
        else:
            parsed = []
        found = iter(parsed)
        objects: list[dict[str, Any] | None] = []
        reader = self._take if take else None
        for payload in payloads:
            obj = None if payload is None else next(found)
            if isinstance(obj, dict):
                if reader is not None:
                    reader(obj, "delta")
                objects.append(obj)
            else:
                objects.append(None)
        return objects

    def flush(self) -> bytes:
        """What is left of an unterminated last event (sent on as it is)."""
        rest, self._pending = self._pending, b""
        return rest

    # both -------------------------------------------------------------------------------

    def _take(self, obj: dict[str, Any], delta_key: str) -> None:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        if choices:
            self._last = obj
        texts = self._texts
        for choice in choices:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if index != self._choice:
                if type(index) is not int:
                    index = 0
                if index != self._choice:
                    self._marks.append((len(texts), index))
                    self._choice = index
            text = choice.get("text")
            if isinstance(text, str):
                texts.append(text)
            part = choice.get(delta_key)
            if not isinstance(part, dict):
                continue
            content = part.get("content")
            if isinstance(content, str):
                texts.append(content)
            calls = part.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict):
                        for key in ("name", "arguments"):
                            value = function.get(key)
                            if isinstance(value, str):
                                texts.append(value)

    def choice_texts(self) -> dict[int, str]:
        """The text seen of each choice, by its index."""
        texts = self.texts
        if not self._marks:
            return {0: "".join(texts)} if texts else {}
        pieces: dict[int, list[str]] = {}
        starts = [(0, 0), *self._marks]
        ends = [position for position, _ in self._marks] + [len(texts)]
        for (start, index), end in zip(starts, ends, strict=True):
            pieces.setdefault(index, []).extend(texts[start:end])
        return {index: "".join(parts) for index, parts in pieces.items() if parts}

    def local_tokens(self, encoding: tiktoken.Encoding) -> int:
        """Completion tokens counted by the gateway from the text it saw: each choice's text
        tokenized on its own, summed."""
        if not self.texts:
            return 0
        if not self._marks:
            return len(encoding.encode_ordinary("".join(self.texts)))
        return sum(len(encoding.encode_ordinary(t)) for t in self.choice_texts().values())

    async def count_local_tokens(self, encoding: tiktoken.Encoding) -> int:
        """`local_tokens`, on a worker thread for a long answer (as prompts are counted)."""
        if sum(map(len, self.texts)) <= OFFLOAD_BYTES:
            return self.local_tokens(encoding)
        return await asyncio.to_thread(self.local_tokens, encoding)

    # How this API's `usage` names the token classes (the Responses and Messages meters,
    # gateway/metering/events.py, read theirs).
    read_usage = staticmethod(read_usage)

    def reported_usage(self) -> TokenUsage | None:
        """The tokens, by class, that the upstream's `usage` reported, if it did (read once
        per usage object: a whole answer's is read for its cost header, then for its bill)."""
        usage = self.usage
        seen, reported = self._read
        if usage is not seen:
            reported = self.read_usage(usage)
            self._read = (usage, reported)
        return reported

    def pieces_in(self, chunk: bytes) -> int:
        """At most how many pieces of text `chunk` adds (one per event: chat's deltas)."""
        return chunk.count(b"data:")

    def leading_events(self, chunk: bytes) -> bytes:
        """The whole events at the head of `chunk` that carry no text, to send before a
        stream is ended there (the Responses and Messages meters: a stream's opening events
        come before its first text; chat's closing chunk needs none)."""
        return b""

    def events_within(self, chunk: bytes, pieces: int) -> bytes:
        """The head of `chunk`, up to the end of a whole event, that adds at most `pieces`
        pieces of text (one per event, as `pieces_in` counts them): what a stream stopped in
        this chunk still delivers of it. A fast upstream's one read may hold far more than
        the stream's hold covers; without this the whole read would be withheld."""
        if pieces <= 0 or b"\r" in chunk:
            return b""
        carried = 1 if self._pending else 0  # the event this chunk ends began before it
        end = 0
        while (boundary := chunk.find(b"\n\n", end)) >= 0:
            if carried + chunk.count(b"data:", 0, boundary) > pieces:
                break
            end = boundary + 2
        return chunk[:end]

    def closing_events(self, prompt_tokens: int, completion_tokens: int) -> bytes | None:
        """The clean end of a stream stopped early, in this API's events; None for chat and
        legacy completions, whose end the gate writes (gateway/billing/gate.py)."""
        return None
