"""Prompt tokens of a call, counted the way OpenAI publishes it, off the event loop when big.

Chat: each message costs 3 tokens plus its string values (+1 for a `name`); a list `content`
counts the text of its text parts; the reply is primed with 3 more. Non-string values (such
as `tool_calls`) and the request's `tools` count as their compact JSON: an approximation
(OpenAI does not publish the exact rule), and the upstream's `usage` wins when it reports one.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import orjson
import tiktoken

__all__ = ["OFFLOAD_BYTES", "CallKind", "count_prompt", "count_prompt_sync"]

CallKind = Literal["chat", "completions", "embeddings"]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Bodies larger than this are tokenized on a worker thread (tiktoken releases the GIL), so one
# big prompt does not stall every other call on the event loop.
OFFLOAD_BYTES = 16 * 1024


# Short strings (roles, names, a system prompt's short lines) recur in nearly every call: their
# counts are kept, per encoding, up to SHORT_CACHE_SIZE of them. A count is a pure function of
# (encoding, text), so a kept one is exact.
SHORT_TEXT = 64
SHORT_CACHE_SIZE = 4096
_short_counts: dict[tuple[str, str], int] = {}


def _count(encoding: tiktoken.Encoding, text: str) -> int:
    if len(text) > SHORT_TEXT:
        return len(encoding.encode_ordinary(text))
    key = (encoding.name, text)
    found = _short_counts.get(key)
    if found is None:
        found = len(encoding.encode_ordinary(text))
        if len(_short_counts) < SHORT_CACHE_SIZE:
            _short_counts[key] = found
    return found


def _chat(encoding: tiktoken.Encoding, payload: dict[str, Any]) -> int:
    messages = payload.get("messages")
    if not isinstance(messages, list):
        return 0
    total = REPLY_PRIMING
    for message in messages:
        if not isinstance(message, dict):
            continue
        total += TOKENS_PER_MESSAGE
        for key, value in message.items():
            if isinstance(value, str):
                total += _count(encoding, value)
                if key == "name":
                    total += TOKENS_PER_NAME
            elif key == "content" and isinstance(value, list):
                for part in value:
                    if isinstance(part, dict) and part.get("type") == "text":
                        text = part.get("text")
                        if isinstance(text, str):
                            total += _count(encoding, text)
            elif value is not None:
                total += _count(encoding, orjson.dumps(value).decode())
    tools = payload.get("tools")
    if tools:
        total += _count(encoding, orjson.dumps(tools).decode())
    return total


def _inputs(encoding: tiktoken.Encoding, value: Any) -> int:
    """A prompt or embedding input: a string, strings, token ids, or lists of token ids."""
    if isinstance(value, str):
        return _count(encoding, value)
    if not isinstance(value, list):
        return 0
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _count(encoding, item)
        elif isinstance(item, int):
            total += 1
        elif isinstance(item, list):
            total += len(item)
    return total


def count_prompt_sync(kind: CallKind, payload: dict[str, Any], encoding: tiktoken.Encoding) -> int:
    """Prompt tokens of one call body."""
    if kind == "chat":
        return _chat(encoding, payload)
    if kind == "completions":
        return _inputs(encoding, payload.get("prompt"))
    return _inputs(encoding, payload.get("input"))


async def count_prompt(
    kind: CallKind, payload: dict[str, Any], encoding: tiktoken.Encoding, body_size: int
) -> int:
    """`count_prompt_sync`, moved to a worker thread for bodies over OFFLOAD_BYTES."""
    if body_size <= OFFLOAD_BYTES:
        return count_prompt_sync(kind, payload, encoding)
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(None, count_prompt_sync, kind, payload, encoding)
