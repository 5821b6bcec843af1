"""Prompt tokens of a call, counted the way OpenAI publishes it, off the event loop when big.

Chat messages follow the cookbook "How to count tokens with tiktoken" (openai-cookbook,
examples/How_to_count_tokens_with_tiktoken.ipynb): each message costs 3 tokens plus its string
values (+1 for a `name`); a list `content` counts the text of its text parts (and its images
and audio, below); the reply is primed with 3 more. Exact for the cookbook's messages example
(129 on cl100k_base, 124 on o200k_base, as the API reported).

Images (`image_url` parts) follow OpenAI's vision guide for gpt-4o-class models (see
gateway/metering/images.py): 85 tokens at `detail: "low"`, else 170 per 512px tile of the
scaled image + 85, exact for the guide's examples (1024x1024 high: 765; 2048x4096 high: 1105;
4096x8192 low: 85). `auto` or no detail is held as high. The size is read from the header of a
base64 `data:` URL (PNG, JPEG, GIF, WebP); an image whose size is not known there (an http(s)
URL, another format, a malformed part) is an estimate, `MediaEstimates.image_tokens`
(`billing.image_tokens`). Other models bill images by other published rules (gpt-4o-mini:
2833 + 5667 per tile; gpt-4.1-mini: 32px patches): for them this is an estimate too, and the
upstream's usage is what is billed.

Responses and Messages requests are counted as the chat requests they render to
(gateway/metering/prompt_apis.py).

Tools follow the same notebook's `num_tokens_for_tools`, with its constants per encoding
(o200k_base: gpt-4o, gpt-4o-mini; cl100k_base: gpt-4, gpt-3.5-turbo). For each function:
FUNC_INIT (7 on o200k_base, 10 on cl100k_base) + the tokens of `name:description` (one
trailing "." of the description dropped); if its `parameters.properties` is not empty,
PROP_INIT (3) and, per property, PROP_KEY (3) + the tokens of `key:type:description` (same
"." rule), and if it has an `enum`, ENUM_INIT (-3) + ENUM_ITEM (3) and the tokens of each
item; FUNC_END (12) once after the last function. Exact for the cookbook's tools example (105
on cl100k_base, 101 on o200k_base, as the API reported).

The legacy `functions` parameter is counted with the same formula: a function there is a tool
without its `{"type": "function", "function": ...}` wrapper, and OpenAI renders both into
the same prompt text. `functions` and `tools` together share one FUNC_END.

What the published formula does not cover is an approximation, and the upstream's `usage`
wins whenever it reports one:

- parts of a schema the formula has no term for (a property's nested `properties`, `items`,
  `anyOf`, `required`, ...) add nothing; a `type` that is not a string counts as its compact
  JSON, a missing `type` or `description` as "";
- a tool that is not a function tool (no `function` object) counts as its compact JSON;
- `tool_choice` / `function_call`: "none" adds 1 token and naming a function adds 7 (tools)
  or 4 (functions) + the tokens of its name; "auto", "required" and absence add nothing.
  OpenAI publishes no rule; these are the deltas measured against the API on cl100k_base
  models by pamelafox/openai-messages-token-helper (tool_choice) and hmarr/openai-chat-tokens
  (function_call), used for both encodings;
- non-string message values (such as `tool_calls`) count as their compact JSON;
- an `input_audio` part counts `MediaEstimates.audio_tokens` (`billing.audio_tokens`), whatever
  its length: the gateway does not decode audio;
- other parts of a list `content` (neither text, image nor audio) add nothing.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import orjson
import tiktoken

from gateway.metering.images import image_tokens
from gateway.metering.prompt_apis import ANTHROPIC_IMAGE, messages_as_chat, responses_as_chat

if TYPE_CHECKING:
    from gateway.config.schema import BillingConfig

__all__ = ["OFFLOAD_BYTES", "CallKind", "MediaEstimates", "count_prompt", "count_prompt_sync"]

CallKind = Literal["chat", "completions", "embeddings", "responses", "messages"]

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
REPLY_PRIMING = 3
# Bodies larger than this are tokenized on a worker thread (tiktoken releases the GIL), so one
# big prompt does not stall every other call on the event loop.
OFFLOAD_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class ToolCosts:
    """The constants of the cookbook's `num_tokens_for_tools` for one encoding."""

    func_init: int
    prop_init: int = 3
    prop_key: int = 3
    enum_init: int = -3
    enum_item: int = 3
    func_end: int = 12


TOOL_COSTS: dict[str, ToolCosts] = {
    "o200k_base": ToolCosts(func_init=7),  # gpt-4o, gpt-4o-mini
    "cl100k_base": ToolCosts(func_init=10),  # gpt-4, gpt-3.5-turbo
}
# tool_choice / function_call (measured, not published by OpenAI: see the module docstring)
CHOICE_NONE = 1
TOOL_CHOICE_NAMED = 7
FUNCTION_CALL_NAMED = 4


@dataclass(frozen=True, slots=True)
class MediaEstimates:
    """What a chat prompt's image of unknown size, and each of its audio parts, is counted as:
    `billing.image_tokens` and `billing.audio_tokens`. The defaults are the config's."""

    image_tokens: int = 1445
    audio_tokens: int = 600

    @classmethod
    def of(cls, billing: BillingConfig) -> MediaEstimates:
        return cls(image_tokens=billing.image_tokens, audio_tokens=billing.audio_tokens)


DEFAULT_MEDIA = MediaEstimates()


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


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _text(value: Any) -> str:
    """A schema word as the formula writes it: a string as it is, else its compact JSON."""
    if isinstance(value, str):
        return value
    return "" if value is None else _json(value)


def _described(description: Any) -> str:
    text = description if isinstance(description, str) else ""
    return text[:-1] if text.endswith(".") else text


def _function(encoding: tiktoken.Encoding, costs: ToolCosts, function: dict[str, Any]) -> int:
    """One function definition, by the cookbook's formula (without FUNC_END)."""
    name = function.get("name")
    line = (name if isinstance(name, str) else "") + ":" + _described(function.get("description"))
    total = costs.func_init + _count(encoding, line)
    parameters = function.get("parameters")
    properties = parameters.get("properties") if isinstance(parameters, dict) else None
    if not isinstance(properties, dict) or not properties:
        return total
    total += costs.prop_init
    for key, prop in properties.items():
        total += costs.prop_key
        if not isinstance(prop, dict):
            prop = {}
        enum = prop.get("enum")
        if isinstance(enum, list):
            total += costs.enum_init
            for item in enum:
                total += costs.enum_item + _count(encoding, _text(item))
        p_type = _text(prop.get("type"))
        total += _count(encoding, f"{key}:{p_type}:{_described(prop.get('description'))}")
    return total


def _named(choice: Any, wrapped: bool) -> str | None:
    """The function a `tool_choice` (wrapped) or `function_call` names, if it names one."""
    if not isinstance(choice, dict):
        return None
    if wrapped:
        choice = choice.get("function")
        if not isinstance(choice, dict):
            return None
    name = choice.get("name")
    return name if isinstance(name, str) else None


def _choice(encoding: tiktoken.Encoding, choice: Any, wrapped: bool) -> int:
    if choice == "none":
        return CHOICE_NONE
    name = _named(choice, wrapped)
    if name is None:
        return 0
    return (TOOL_CHOICE_NAMED if wrapped else FUNCTION_CALL_NAMED) + _count(encoding, name)


def _tools(encoding: tiktoken.Encoding, payload: dict[str, Any]) -> int:
    """`tools`, `functions`, `tool_choice` and `function_call` of a chat request."""
    tools = payload.get("tools")
    functions = payload.get("functions")
    if not tools and not functions:
        return 0
    costs = TOOL_COSTS.get(encoding.name, TOOL_COSTS["o200k_base"])
    total = 0
    defined = 0
    if isinstance(tools, list):
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict):
                total += _function(encoding, costs, function)
                defined += 1
            elif tool is not None:
                total += _count(encoding, _json(tool))
    elif tools:
        total += _count(encoding, _json(tools))
    if isinstance(functions, list):
        for function in functions:
            if isinstance(function, dict):
                total += _function(encoding, costs, function)
                defined += 1
            elif function is not None:
                total += _count(encoding, _json(function))
    elif functions:
        total += _count(encoding, _json(functions))
    if defined:
        total += costs.func_end
    total += _choice(encoding, payload.get("tool_choice"), wrapped=True)
    total += _choice(encoding, payload.get("function_call"), wrapped=False)
    return total


def _image(image_url: Any, media: MediaEstimates) -> int:
    """An `image_url` part: its `image_url` an object with a `url` (and a `detail`) or a URL."""
    if isinstance(image_url, dict):
        url, detail = image_url.get("url"), image_url.get("detail")
    else:
        url, detail = image_url, None
    if not isinstance(url, str):
        return media.image_tokens
    return image_tokens(url, detail, media.image_tokens)


def _parts(encoding: tiktoken.Encoding, parts: list[Any], media: MediaEstimates) -> int:
    """A list `content`: its text parts' text, its images and its audio."""
    total = 0
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if isinstance(text, str):
                total += _count(encoding, text)
        elif kind == "image_url":
            total += _image(part.get("image_url"), media)
        elif kind == "input_audio":
            total += media.audio_tokens
        elif kind == ANTHROPIC_IMAGE:  # a Messages image, already sized (prompt_apis)
            total += part["tokens"]
    return total


def _chat(encoding: tiktoken.Encoding, payload: dict[str, Any], media: MediaEstimates) -> int:
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
                total += _parts(encoding, value, media)
            elif value is not None:
                total += _count(encoding, _json(value))
    if "tools" in payload or "functions" in payload:
        total += _tools(encoding, payload)
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


def count_prompt_sync(
    kind: CallKind,
    payload: dict[str, Any],
    encoding: tiktoken.Encoding,
    *,
    media: MediaEstimates | None = None,
) -> int:
    """Prompt tokens of one call body; `media` (None: the config's defaults) sizes what a chat
    prompt carries besides text when the formula cannot."""
    media = DEFAULT_MEDIA if media is None else media
    if kind == "chat":
        return _chat(encoding, payload, media)
    if kind == "responses":  # counted as the chat request it renders to (prompt_apis)
        return _chat(encoding, responses_as_chat(payload), media)
    if kind == "messages":
        return _chat(encoding, messages_as_chat(payload), media)
    if kind == "completions":
        return _inputs(encoding, payload.get("prompt"))
    return _inputs(encoding, payload.get("input"))


async def count_prompt(
    kind: CallKind,
    payload: dict[str, Any],
    encoding: tiktoken.Encoding,
    body_size: int,
    *,
    media: MediaEstimates | None = None,
) -> int:
    """`count_prompt_sync`, moved to a worker thread for bodies over OFFLOAD_BYTES."""
    if body_size <= OFFLOAD_BYTES:
        return count_prompt_sync(kind, payload, encoding, media=media)
    loop = asyncio.get_running_loop()
    count = functools.partial(count_prompt_sync, kind, payload, encoding, media=media)
    return await loop.run_in_executor(None, count)
