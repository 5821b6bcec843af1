"""How the mock upstream speaks OpenAI's Responses API and Anthropic's Messages API.

Pure functions, no I/O: what a request's input text is (so the server can count it), and how
an answer, its stream events, its usage and errors look on each API's wire. The server
(`gateway.mock_upstream`) validates the request, generates the words and paces the stream.

The shapes follow the official SDKs' parsers (openai `types.responses`, anthropic `types`)
and recorded traffic: a Responses stream is `response.created`, `response.in_progress`,
`response.output_item.added`, `response.content_part.added`, one `response.output_text.delta`
per token, `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`, then `response.completed` (or `response.incomplete` when
`max_output_tokens` cut the answer) carrying the whole response and its usage, each event an
`event: <type>` line and a `data:` line whose JSON has `type` and `sequence_number`, and no
`[DONE]`. A Messages stream is `message_start` (input usage, one output token),
`content_block_start`, `ping`, one `content_block_delta` (`text_delta`) per token,
`content_block_stop`, `message_delta` (`stop_reason` and the cumulative usage) and
`message_stop`; Anthropic's SDK ignores a `data:` line without its `event:` line.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

__all__ = [
    "InvalidRequest",
    "MessageAnswer",
    "ResponseAnswer",
    "anthropic_error_body",
    "message_events",
    "message_object",
    "messages_input_tokens",
    "messages_usage",
    "response_events",
    "response_object",
    "responses_input_tokens",
    "responses_usage",
]

Count = Callable[[str], int]
"""Tokens of a text in the server's encoding."""

_PLACEHOLDER: Final = "\x00"
_PLACEHOLDER_JSON: Final = orjson.dumps(_PLACEHOLDER)


class InvalidRequest(Exception):
    """A request the API would refuse with a 400 (message, and the parameter at fault)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def _event(event_type: str, payload: dict[str, Any]) -> bytes:
    """One SSE event as both APIs send it: a named event whose data repeats the type."""
    return b"event: " + event_type.encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"


def _template(event_type: str, payload: dict[str, Any]) -> list[bytes]:
    """An event cut at each placeholder string value, in key order."""
    return _event(event_type, payload).split(_PLACEHOLDER_JSON)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


def _parts_text(parts: Any, kinds: frozenset[str], where: str) -> list[str]:
    """The texts of a content list's parts whose `type` is one of `kinds`."""
    if not isinstance(parts, list):
        raise InvalidRequest(f"{where} must be a string or an array of content parts", where)
    texts: list[str] = []
    for part in parts:
        if not isinstance(part, dict):
            raise InvalidRequest(f"each part of {where} must be an object", where)
        text = part.get("text")
        if part.get("type") in kinds and isinstance(text, str):
            texts.append(text)
    return texts


# -- OpenAI Responses --------------------------------------------------------------------

_RESPONSES_TEXT_PARTS: Final = frozenset({"input_text", "output_text"})


def responses_input_tokens(body: dict[str, Any], count: Count) -> int:
    """Tokens of a Responses request's visible text: `instructions`, then `input` (a string,
    or items: messages' string content or `input_text` / `output_text` parts,
    `function_call_output` outputs, `function_call` arguments). Images, files and the
    `tools` definitions count nothing in the mock."""
    total = 0
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise InvalidRequest("instructions must be a string", "instructions")
        total += count(instructions)
    raw = body.get("input")
    if isinstance(raw, str):
        return total + count(raw)
    if not isinstance(raw, list) or not raw:
        raise InvalidRequest("input must be a string or a non-empty array of input items", "input")
    for index, item in enumerate(raw):
        if not isinstance(item, dict):
            raise InvalidRequest("each input item must be an object", "input")
        total += sum(count(text) for text in _item_texts(item, f"input[{index}]"))
    return total


def _item_texts(item: dict[str, Any], where: str) -> list[str]:
    kind = item.get("type", "message")  # an easy message ({role, content}) has no type
    if kind == "message":
        content = item.get("content")
        if isinstance(content, str):
            return [content]
        return _parts_text(content, _RESPONSES_TEXT_PARTS, f"{where}.content")
    if kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, str):
            return [output]
        return _parts_text(output, _RESPONSES_TEXT_PARTS, f"{where}.output")
    if kind == "function_call":
        arguments = item.get("arguments")
        return [arguments] if isinstance(arguments, str) else []
    return []


def responses_usage(
    input_tokens: int, output_tokens: int, cached: int, written: int, reasoning: int
) -> dict[str, Any]:
    """Responses `usage`: input tokens include the cached ones, as OpenAI counts them."""
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": written},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input_tokens + output_tokens,
    }


@dataclass(frozen=True)
class ResponseAnswer:
    """A generated Responses answer, ready to render."""

    response_id: str
    item_id: str
    created_at: int
    model: str
    body: dict[str, Any]  # the request, for the parameters the response echoes
    text: str
    complete: bool  # False: max_output_tokens cut it short
    usage: dict[str, Any] | None  # None: the answer reports no usage


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _message_item(answer: ResponseAnswer, status: str, text: str | None) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {
        "id": answer.item_id,
        "type": "message",
        "status": status,
        "content": content,
        "role": "assistant",
    }


def _final_status(answer: ResponseAnswer) -> str:
    return "completed" if answer.complete else "incomplete"


def response_object(answer: ResponseAnswer, *, final: bool = True) -> dict[str, Any]:
    """The `response` object: whole (final) or as a stream's first events show it."""
    body = answer.body
    status = _final_status(answer) if final else "in_progress"
    output = [_message_item(answer, status, answer.text)] if final else []
    incomplete = None if not final or answer.complete else {"reason": "max_output_tokens"}
    return {
        "id": answer.response_id,
        "object": "response",
        "created_at": answer.created_at,
        "status": status,
        "background": False,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": answer.model,
        "output": output,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": body.get("reasoning", {"effort": None, "summary": None}),
        "service_tier": "default",
        "store": body.get("store", True),
        "temperature": body.get("temperature", 1.0),
        "text": body.get("text", {"format": {"type": "text"}}),
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": body.get("top_p", 1.0),
        "truncation": body.get("truncation", "disabled"),
        "usage": answer.usage if final else None,
        "user": body.get("user"),
        "metadata": body.get("metadata", {}),
    }


_RESPONSE_HEAD_EVENTS: Final = 4  # created, in_progress, output_item.added, content_part.added


def response_events(
    answer: ResponseAnswer, pieces: Iterable[bytes], token_count: int
) -> tuple[bytes, Iterator[bytes], bytes]:
    """A Responses stream of `token_count` tokens: (the events before the text, one delta
    event per token piece (a JSON string), the events after the text). Sequence numbers
    count from 0."""
    started = response_object(answer, final=False)
    where = {"item_id": answer.item_id, "output_index": 0, "content_index": 0}
    head = b"".join(
        [
            _event(
                "response.created",
                {"type": "response.created", "sequence_number": 0, "response": started},
            ),
            _event(
                "response.in_progress",
                {"type": "response.in_progress", "sequence_number": 1, "response": started},
            ),
            _event(
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "sequence_number": 2,
                    "output_index": 0,
                    "item": _message_item(answer, "in_progress", None),
                },
            ),
            _event(
                "response.content_part.added",
                {
                    "type": "response.content_part.added",
                    "sequence_number": 3,
                    **where,
                    "part": _output_text(""),
                },
            ),
        ]
    )
    delta_type = "response.output_text.delta"
    before_seq, before_delta, after_delta = _template(
        delta_type,
        {
            "type": delta_type,
            "sequence_number": _PLACEHOLDER,
            **where,
            "delta": _PLACEHOLDER,
            "logprobs": [],
        },
    )

    def deltas() -> Iterator[bytes]:
        for seq, piece in enumerate(pieces, _RESPONSE_HEAD_EVENTS):
            yield before_seq + str(seq).encode() + before_delta + piece + after_delta

    seq = _RESPONSE_HEAD_EVENTS + token_count
    whole = response_object(answer)
    status = whole["status"]
    last = "response.completed" if answer.complete else "response.incomplete"
    done: list[tuple[str, dict[str, Any]]] = [
        ("response.output_text.done", {**where, "text": answer.text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": _output_text(answer.text)}),
        (
            "response.output_item.done",
            {"output_index": 0, "item": _message_item(answer, status, answer.text)},
        ),
        (last, {"response": whole}),
    ]
    tail = b"".join(
        _event(kind, {"type": kind, "sequence_number": seq + k, **fields})
        for k, (kind, fields) in enumerate(done)
    )
    return head, deltas(), tail


# -- Anthropic Messages ------------------------------------------------------------------

_TEXT: Final = frozenset({"text"})


def messages_input_tokens(body: dict[str, Any], count: Count) -> int:
    """Tokens of a Messages request's visible text: `system` (a string or text blocks), then
    each message's string content or blocks (`text`, a `tool_result`'s content as string or
    text blocks, a `tool_use`'s input as compact JSON). Images, documents and the `tools`
    definitions count nothing in the mock."""
    total = 0
    system = body.get("system")
    if isinstance(system, str):
        total += count(system)
    elif system is not None:
        total += sum(count(text) for text in _parts_text(system, _TEXT, "system"))
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("messages: Field required", "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages: at least one message is required", "messages")
    for index, message in enumerate(messages):
        where = f"messages.{index}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise InvalidRequest(f"{where}.role: Input should be 'user' or 'assistant'", where)
        total += sum(count(text) for text in _block_texts(message.get("content"), where))
    return total


def _block_texts(content: Any, where: str) -> list[str]:
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise InvalidRequest(f"{where}.content: Input should be a string or a list", where)
    texts: list[str] = []
    for block in content:
        if not isinstance(block, dict):
            raise InvalidRequest(f"{where}.content: each block must be an object", where)
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_result":
            result = block.get("content")
            if isinstance(result, str):
                texts.append(result)
            elif result is not None:
                texts.extend(_parts_text(result, _TEXT, f"{where}.content"))
        elif kind == "tool_use" and "input" in block:
            texts.append(_json_text(block["input"]))
    return texts


def messages_usage(
    prompt_tokens: int, output_tokens: int, cached: int, written: int
) -> dict[str, Any]:
    """Messages `usage` for a prompt of `prompt_tokens`: Anthropic's `input_tokens` are the
    ones neither read from nor written to the cache (never below 0)."""
    return {
        "input_tokens": max(0, prompt_tokens - cached - written),
        "cache_creation_input_tokens": written,
        "cache_read_input_tokens": cached,
        "cache_creation": {"ephemeral_5m_input_tokens": written, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


@dataclass(frozen=True)
class MessageAnswer:
    """A generated Messages answer, ready to render."""

    message_id: str
    model: str
    text: str
    complete: bool  # False: max_tokens cut it short
    usage: dict[str, Any] | None  # None: the answer reports no usage


def _stop_reason(answer: MessageAnswer) -> str:
    return "end_turn" if answer.complete else "max_tokens"


def message_object(answer: MessageAnswer, *, final: bool = True) -> dict[str, Any]:
    """The message: whole (final), or as `message_start` shows it (no content, no stop
    reason, one output token so far)."""
    message: dict[str, Any] = {
        "id": answer.message_id,
        "type": "message",
        "role": "assistant",
        "model": answer.model,
        "content": [{"type": "text", "text": answer.text}] if final else [],
        "stop_reason": _stop_reason(answer) if final else None,
        "stop_sequence": None,
    }
    if answer.usage is not None:
        usage = answer.usage
        if not final:
            usage = {**usage, "output_tokens": min(1, usage["output_tokens"])}
        message["usage"] = usage
    return message


def message_events(
    answer: MessageAnswer, pieces: Iterable[bytes]
) -> tuple[bytes, Iterator[bytes], bytes]:
    """A Messages stream: (the events before the text, one `content_block_delta` per token
    piece (a JSON string), the events after the text)."""
    head = b"".join(
        [
            _event(
                "message_start",
                {"type": "message_start", "message": message_object(answer, final=False)},
            ),
            _event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            ),
            _event("ping", {"type": "ping"}),
        ]
    )
    delta_type = "content_block_delta"
    before, after = _template(
        delta_type,
        {"type": delta_type, "index": 0, "delta": {"type": "text_delta", "text": _PLACEHOLDER}},
    )
    closing: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": _stop_reason(answer), "stop_sequence": None},
    }
    if answer.usage is not None:
        # Cumulative, as Anthropic sends it now: the input side again, and all the output.
        usage = answer.usage
        closing["usage"] = {
            key: usage[key]
            for key in (
                "input_tokens",
                "cache_creation_input_tokens",
                "cache_read_input_tokens",
                "output_tokens",
            )
        }
    tail = b"".join(
        [
            _event("content_block_stop", {"type": "content_block_stop", "index": 0}),
            _event("message_delta", closing),
            _event("message_stop", {"type": "message_stop"}),
        ]
    )
    return head, (before + piece + after for piece in pieces), tail


_ANTHROPIC_ERROR_TYPES: Final = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(status: int, message: str) -> bytes:
    """Anthropic's error shape, its `error.type` named after the HTTP status (the types the
    anthropic SDK's `ErrorObject` union knows; any other 5xx is `api_error`, 4xx
    `invalid_request_error`)."""
    fallback = "api_error" if status >= 500 else "invalid_request_error"
    err_type = _ANTHROPIC_ERROR_TYPES.get(status, fallback)
    return orjson.dumps({"type": "error", "error": {"type": err_type, "message": message}})
