"""Completion tokens of the Responses and Messages APIs, as their answers and typed events pass.

Both APIs always report usage (no `stream_options` to add, nothing to hide), so these meters
only read: each SSE event's JSON names its `type`, and the meter takes the text a client is
given (and the tool calls' names and arguments, and reasoning text) for the local count, and
the `usage` when the answer's end reports it:

- Responses: `response.output_text.delta`, `response.refusal.delta`,
  `response.function_call_arguments.delta`, `response.reasoning_summary_text.delta` and
  `response.reasoning_text.delta` carry text as `delta`; `response.output_item.added` names a
  function call; `response.completed`, `response.incomplete` and `response.failed` carry the
  whole response and its `usage`. `response.created` gives the response's id (the gateway
  records who created it). A whole answer's `output` holds the same as items.
- Messages: `content_block_start` (a `tool_use` block's name), `content_block_delta`
  (`text_delta` text, `input_json_delta` partial JSON, `thinking_delta` thinking); the usage
  is `message_start`'s (input) merged with `message_delta`'s (the cumulative output, and any
  input counts it restates), and counts as reported only once `message_delta` has come: a
  stream cut before it is billed by the gateway's count, as a chat stream cut before its
  usage chunk is.

A stream that strict enforcement or a cost cap ends early gets its opening events (those of
the chunk it ends at that come before its first text: `response.created`, `message_start`)
and its API's own clean end (`closing_events`): `response.incomplete` (reason
`max_output_tokens`) with the text delivered and the gateway's counts as usage; or
`content_block_stop` (if a block is open), `message_delta` (`stop_reason: max_tokens`, the
output count) and `message_stop`.
"""

from __future__ import annotations

from typing import Any

import orjson

from gateway.metering.completion import CompletionMeter
from gateway.metering.prompt import CallKind
from gateway.metering.usage import read_messages_usage, read_responses_usage

__all__ = ["MessagesMeter", "ResponsesMeter", "meter_class"]

_RESPONSE_TEXT = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_summary_text.delta",
        "response.reasoning_text.delta",
    }
)
_RESPONSE_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _event(name: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


class _TypedEventsMeter(CompletionMeter):
    """What the two APIs' meters share: their text comes in events whose type has `_TEXT`
    in it (each such event one piece), after opening events that carry none."""

    __slots__ = ()

    _TEXT = b""

    def observe_body(self, body: bytes) -> None:
        try:
            answer = orjson.loads(body)
        except orjson.JSONDecodeError:
            return
        if isinstance(answer, dict):
            self.done = True
            self._whole(answer)

    def _whole(self, answer: dict[str, Any]) -> None:
        """Take a whole answer's text and usage."""
        raise NotImplementedError

    def pieces_in(self, chunk: bytes) -> int:
        return chunk.count(self._TEXT)

    def events_within(self, chunk: bytes, pieces: int) -> bytes:
        return b""  # these streams stop after their opening events (`leading_events`)

    def leading_events(self, chunk: bytes) -> bytes:
        if self._pending or b"\r" in chunk:  # mid-event, or CRLF framing: nothing to add
            return b""
        first = chunk.find(self._TEXT)
        end = chunk.rfind(b"\n\n", 0, len(chunk) if first < 0 else first)
        return chunk[: end + 2] if end >= 0 else b""


class ResponsesMeter(_TypedEventsMeter):
    """The meter of `POST /v1/responses` (see the module docstring)."""

    __slots__ = ("_envelope", "_item_id", "_sequence", "_shown", "response_id")

    _TEXT = b'.delta"'  # "type":"response.output_text.delta", ...arguments.delta, ...

    read_usage = staticmethod(read_responses_usage)

    def __init__(self, strip_usage: bool = False, price: Any = None) -> None:
        super().__init__()
        self.response_id: str | None = None
        self._envelope: dict[str, Any] = {}  # response.created's response, for the end
        self._item_id: str | None = None
        self._sequence = -1
        self._shown: list[str] = []  # the output text itself (not tool arguments)

    def _whole(self, answer: dict[str, Any]) -> None:
        if isinstance(answer.get("id"), str):
            self.response_id = answer["id"]
        usage = answer.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        output = answer.get("output")
        for item in output if isinstance(output, list) else ():
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "message":
                for part in item.get("content") or ():
                    if isinstance(part, dict):
                        text = part.get("text", part.get("refusal"))
                        if isinstance(text, str):
                            self.texts.append(text)
            elif kind == "function_call":
                for key in ("name", "arguments"):
                    if isinstance(item.get(key), str):
                        self.texts.append(item[key])
            elif kind == "reasoning":
                for part in item.get("summary") or ():
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        self.texts.append(part["text"])

    def _take(self, obj: dict[str, Any], delta_key: str) -> None:
        kind = obj.get("type")
        sequence = obj.get("sequence_number")
        if type(sequence) is int:
            self._sequence = sequence
        if kind in _RESPONSE_TEXT:
            delta = obj.get("delta")
            if isinstance(delta, str):
                self.texts.append(delta)
                if kind == "response.output_text.delta":
                    self._shown.append(delta)
                    if self._item_id is None and isinstance(obj.get("item_id"), str):
                        self._item_id = obj["item_id"]
        elif kind == "response.output_item.added":
            item = obj.get("item")
            if (
                isinstance(item, dict)
                and item.get("type") == "function_call"
                and isinstance(item.get("name"), str)
            ):
                self.texts.append(item["name"])
        elif kind == "response.created":
            response = obj.get("response")
            if isinstance(response, dict):
                self._envelope = response
                if isinstance(response.get("id"), str):
                    self.response_id = response["id"]
        elif kind in _RESPONSE_ENDS:
            response = obj.get("response")
            if isinstance(response, dict) and isinstance(response.get("usage"), dict):
                self.usage = response["usage"]
            self.done = True

    def closing_events(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        output = []
        if self._shown:
            output.append(
                {
                    "type": "message",
                    "id": self._item_id or "msg_gateway",
                    "status": "incomplete",
                    "role": "assistant",
                    "content": [
                        {"type": "output_text", "text": "".join(self._shown), "annotations": []}
                    ],
                }
            )
        usage = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens,
        }
        response = {
            **self._envelope,
            "status": "incomplete",
            "incomplete_details": {"reason": "max_output_tokens"},
            "output": output,
            "usage": usage,
        }
        self._sequence += 1
        end = {"type": "response.incomplete", "sequence_number": self._sequence}
        return _event("response.incomplete", {**end, "response": response})


class MessagesMeter(_TypedEventsMeter):
    """The meter of Anthropic's `POST /v1/messages` (see the module docstring)."""

    __slots__ = ("_open_block", "_started")

    _TEXT = b'"content_block_delta"'

    read_usage = staticmethod(read_messages_usage)

    def __init__(self, strip_usage: bool = False, price: Any = None) -> None:
        super().__init__()
        self._started: dict[str, Any] = {}  # message_start's usage
        self._open_block: int | None = None

    def _whole(self, answer: dict[str, Any]) -> None:
        usage = answer.get("usage")
        if isinstance(usage, dict):
            self.usage = usage
        content = answer.get("content")
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, dict):
                continue
            kind = block.get("type")
            if kind == "text" and isinstance(block.get("text"), str):
                self.texts.append(block["text"])
            elif kind == "tool_use":
                if isinstance(block.get("name"), str):
                    self.texts.append(block["name"])
                self.texts.append(orjson.dumps(block.get("input")).decode())
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                self.texts.append(block["thinking"])

    def _take(self, obj: dict[str, Any], delta_key: str) -> None:
        kind = obj.get("type")
        if kind == "content_block_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                for key in ("text", "partial_json", "thinking"):
                    piece = delta.get(key)
                    if isinstance(piece, str):
                        self.texts.append(piece)
                        break
        elif kind == "content_block_start":
            index = obj.get("index")
            self._open_block = index if type(index) is int else 0
            block = obj.get("content_block")
            if isinstance(block, dict):
                if block.get("type") == "tool_use" and isinstance(block.get("name"), str):
                    self.texts.append(block["name"])
                elif isinstance(block.get("text"), str) and block["text"]:
                    self.texts.append(block["text"])
        elif kind == "content_block_stop":
            self._open_block = None
        elif kind == "message_delta":
            usage = obj.get("usage")
            if isinstance(usage, dict):
                given = {key: value for key, value in usage.items() if value is not None}
                self.usage = {**self._started, **given}
        elif kind == "message_start":
            message = obj.get("message")
            usage = message.get("usage") if isinstance(message, dict) else None
            if isinstance(usage, dict):
                self._started = {key: value for key, value in usage.items() if value is not None}
        elif kind == "message_stop":
            self.done = True

    def closing_events(self, prompt_tokens: int, completion_tokens: int) -> bytes:
        out = b""
        if self._open_block is not None:
            stop = {"type": "content_block_stop", "index": self._open_block}
            out += _event("content_block_stop", stop)
        out += _event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                "usage": {"output_tokens": completion_tokens},
            },
        )
        return out + _event("message_stop", {"type": "message_stop"})


_METERS: dict[CallKind, type[CompletionMeter]] = {
    "responses": ResponsesMeter,
    "messages": MessagesMeter,
}


def meter_class(kind: CallKind) -> type[CompletionMeter]:
    """The meter of an API's answers."""
    return _METERS.get(kind, CompletionMeter)
