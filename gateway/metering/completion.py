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
        """Read a stream chunk; return the bytes to send on (all of it unless stripping)."""
        data = self._pending + chunk if self._pending else chunk
        out: list[bytes] = []
        start = 0
        for match in _EVENT_END.finditer(data):
            event = data[start : match.end()]
            start = match.end()
            kept = self._event(event)
            if kept:
                out.append(kept)
        self._pending = data[start:]
        if not self._strip_usage:
            return chunk
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left of an unterminated last event (sent on as it is)."""
        rest, self._pending = self._pending, b""
        return rest

    def _event(self, event: bytes) -> bytes:
        for line in event.splitlines():
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                self.done = True
                continue
            try:
                obj = orjson.loads(payload)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            self._take(obj, delta_key="delta")
            if self._strip_usage and obj.get("usage") and not obj.get("choices"):
                return b""  # the usage chunk only the gateway asked for
        if self._strip_usage and b"usage" in event:
            for pattern in _NULL_USAGE:
                event = event.replace(pattern, b"")
        return event

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
