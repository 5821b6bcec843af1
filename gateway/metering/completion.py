"""Completion tokens as they pass: the text of a whole answer or of an SSE stream.

The meter reads only what counting needs (choice text, tool-call arguments, `usage`). When
the gateway asked the upstream for stream usage on the client's behalf, the meter also hides
it again: it drops the usage-only chunk and the `"usage":null` fields, so the client gets the
bytes it would have got without the gateway.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
import tiktoken

from gateway.metering.prompt import OFFLOAD_BYTES

__all__ = ["CompletionMeter"]

_EVENT_END = re.compile(rb"\r?\n\r?\n")
_NULL_USAGE = (b',"usage":null', b'"usage":null,', b', "usage": null', b'"usage": null, ')
_NOT_JSON = object()


def _payload(event: bytes) -> bytes | None:
    """The data of one SSE event (its `data:` lines joined), or None if it has none."""
    if event.startswith(b"data: ") and event.count(b"\n", 0, -2) == 0:
        return event[6:].strip()  # the usual case: a single `data: ...` line
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(lines)


def _usage_only(obj: dict[str, Any] | None) -> bool:
    """The usage chunk only the gateway asked for (no choices)."""
    return obj is not None and bool(obj.get("usage")) and not obj.get("choices")


def _loads(payload: bytes) -> Any:
    try:
        return orjson.loads(payload)
    except orjson.JSONDecodeError:
        return _NOT_JSON


class CompletionMeter:
    """Collects one answer's completion text and the upstream's `usage`, if any."""

    __slots__ = ("_pending", "_strip_usage", "done", "last", "texts", "usage")

    def __init__(self, strip_usage: bool = False) -> None:
        self._strip_usage = strip_usage
        self._pending = b""
        self.texts: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.done = False  # the stream's `[DONE]` was seen
        self.last: dict[str, Any] | None = None  # the last chunk with choices (for its id)

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
        data = self._pending + chunk if self._pending else chunk
        if b"\r" in data:  # CRLF separators: the general, slower split
            return self._feed_crlf(data, chunk)
        cut = data.rfind(b"\n\n")
        if cut < 0:
            self._pending = data
            return b"" if self._strip_usage else chunk
        complete, self._pending = data[:cut], data[cut + 2 :]
        events = complete.split(b"\n\n")
        if complete.count(b"\n") == 2 * (len(events) - 1):  # one line per event: the usual
            payloads = [e[6:] if e[:6] == b"data: " else _payload(e) for e in events]
        else:
            payloads = [_payload(e) for e in events]
        objects = self._parse(payloads)
        if not self._strip_usage:
            return chunk
        kept = [e for e, obj in zip(events, objects, strict=True) if not _usage_only(obj)]
        if not kept:
            return b""
        out = b"\n\n".join(kept) + b"\n\n"
        if b'"usage"' in out:  # inside a JSON string the quotes would be escaped
            for pattern in _NULL_USAGE:
                out = out.replace(pattern, b"")
        return out

    def _feed_crlf(self, data: bytes, chunk: bytes) -> bytes:
        events = []
        start = 0
        for match in _EVENT_END.finditer(data):
            events.append(data[start : match.end()])
            start = match.end()
        self._pending = data[start:]
        objects = self._parse([_payload(event) for event in events])
        if not self._strip_usage:
            return chunk
        out: list[bytes] = []
        for event, obj in zip(events, objects, strict=True):
            if _usage_only(obj):
                continue
            if b"usage" in event:
                for pattern in _NULL_USAGE:
                    event = event.replace(pattern, b"")
            out.append(event)
        return b"".join(out)

    def _parse(self, payloads: list[bytes | None]) -> list[dict[str, Any] | None]:
        """Each payload's JSON object (None for `[DONE]`, comments and what is not JSON),
        taking its text and usage on the way. (`[DONE]` entries become None in place.)"""
        wanted: list[bytes] = []
        for k, payload in enumerate(payloads):
            if payload is None:
                continue
            if payload[:1] == b"[" and payload.strip() == b"[DONE]":
                self.done = True
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
        take = self._take
        for payload in payloads:
            obj = None if payload is None else next(found)
            if isinstance(obj, dict):
                take(obj, "delta")
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
            self.usage = usage
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        if choices:
            self.last = obj
        texts = self.texts
        for choice in choices:
            if not isinstance(choice, dict):
                continue
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

    def local_tokens(self, encoding: tiktoken.Encoding) -> int:
        """Completion tokens counted by the gateway from the text it saw."""
        if not self.texts:
            return 0
        return len(encoding.encode_ordinary("".join(self.texts)))

    async def count_local_tokens(self, encoding: tiktoken.Encoding) -> int:
        """`local_tokens`, on a worker thread for a long answer (as prompts are counted)."""
        if sum(map(len, self.texts)) <= OFFLOAD_BYTES:
            return self.local_tokens(encoding)
        return await asyncio.to_thread(self.local_tokens, encoding)

    def upstream_tokens(self) -> tuple[int, int] | None:
        """(prompt, completion) tokens the upstream reported, if it did."""
        usage = self.usage
        if usage is None:
            return None
        prompt = usage.get("prompt_tokens")
        completion = usage.get("completion_tokens", 0)
        if type(prompt) is not int or type(completion) is not int or prompt < 0 or completion < 0:
            return None
        return prompt, completion
