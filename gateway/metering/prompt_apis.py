"""A Responses or Messages request as the chat request it would render to, for counting.

Neither OpenAI nor Anthropic publishes how these requests turn into prompt tokens; both are
rendered into the same chat template as a chat request. So the gateway counts one by the
chat formula (gateway/metering/prompt.py) over its chat equivalent: that count sizes the
hold, and bills the call only when the upstream reports no usage. An estimate, like every
local count of a prompt beside the cookbook's published examples.

Responses (`POST /v1/responses`): `instructions` is a system message; `input` a string (one
user message) or items: messages (`content` a string or `input_text` / `output_text` /
`input_image` / `input_audio` parts), `function_call` (an assistant message calling the
tool), `function_call_output` (a tool message), `reasoning` (its summary texts); other items
add nothing. A function tool `{type, name, description, parameters}` is a chat tool's
function; `tool_choice: {type: function, name}` names one.

Messages (`POST /v1/messages`): `system` (a string or text blocks) is a system message; each
message's `content` a string or blocks: `text`, `image` (a base64 source is sized by
Anthropic's published rule, below; any other source is `billing.image_tokens`), `tool_use`
(its name and input's JSON as text), `tool_result` (its content), `thinking` (its text);
other blocks add nothing. A tool `{name, description, input_schema}` is a chat function;
`tool_choice: {type: tool, name}` names one, `{type: none}` is "none".

Anthropic's images cost `width * height / 750` tokens, rounded up, once scaled to fit its
limits (the long edge at most 1568 px, and no more pixels than the largest size its vision
guide lists as sent unscaled, 784x1568): the guide's figures are 200x200: 54, 1000x1000:
1334, 1092x1092: 1590. The image part this module writes carries that count.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from gateway.metering.images import base64_size

__all__ = ["ANTHROPIC_IMAGE", "anthropic_image_tokens", "messages_as_chat", "responses_as_chat"]

# The part type a converted Anthropic image becomes: its count is already known.
ANTHROPIC_IMAGE = "counted_image"
_LONG_EDGE = 1568
_MOST_PIXELS = 784 * 1568
_PIXELS_PER_TOKEN = 750


def _json(value: Any) -> str:
    return orjson.dumps(value).decode()


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


# -- OpenAI Responses ------------------------------------------------------------------------


def _response_parts(parts: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for part in parts:
        if not isinstance(part, dict):
            continue
        kind = part.get("type")
        if kind in ("input_text", "output_text", "text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str):
                out.append(_text_part(text))
        elif kind == "input_image":
            url = part.get("image_url")
            out.append(
                {
                    "type": "image_url",
                    "image_url": {
                        "url": url if isinstance(url, str) else None,
                        "detail": part.get("detail"),
                    },
                }
            )
        elif kind == "input_audio":
            out.append({"type": "input_audio"})
    return out


def _response_item(item: dict[str, Any]) -> dict[str, Any] | None:
    kind = item.get("type", "message")  # an easy message ({role, content}) has no type
    if kind == "message":
        content = item.get("content")
        role = item.get("role") if isinstance(item.get("role"), str) else "user"
        if isinstance(content, list):
            return {"role": role, "content": _response_parts(content)}
        return {"role": role, "content": content if isinstance(content, str) else ""}
    if kind == "function_call":
        call = {"name": item.get("name"), "arguments": item.get("arguments")}
        return {"role": "assistant", "tool_calls": [{"type": "function", "function": call}]}
    if kind == "function_call_output":
        output = item.get("output")
        if isinstance(output, list):
            return {"role": "tool", "content": _response_parts(output)}
        return {"role": "tool", "content": output if isinstance(output, str) else _json(output)}
    if kind == "reasoning":
        summary = item.get("summary")
        texts = [
            _text_part(part["text"])
            for part in (summary if isinstance(summary, list) else [])
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        ]
        return {"role": "assistant", "content": texts} if texts else None
    return None


def _response_tool(tool: Any) -> Any:
    if isinstance(tool, dict) and tool.get("type") == "function" and "function" not in tool:
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        return {"type": "function", "function": function}
    return tool  # a built-in tool (web_search, file_search, ...): counted as its JSON


def responses_as_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """The chat request a Responses request counts as (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    instructions = payload.get("instructions")
    if isinstance(instructions, str):
        messages.append({"role": "system", "content": instructions})
    given = payload.get("input")
    if isinstance(given, str):
        messages.append({"role": "user", "content": given})
    elif isinstance(given, list):
        for item in given:
            if isinstance(item, dict):
                message = _response_item(item)
                if message is not None:
                    messages.append(message)
    chat: dict[str, Any] = {"messages": messages}
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [_response_tool(tool) for tool in tools]
        choice = payload.get("tool_choice")
        if isinstance(choice, dict) and choice.get("type") == "function":
            chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif choice is not None:
            chat["tool_choice"] = choice
    return chat


# -- Anthropic Messages ----------------------------------------------------------------------


def anthropic_image_tokens(width: int, height: int) -> int:
    """Tokens of an image of this size on Anthropic's models (see the module docstring)."""
    scale = min(1.0, _LONG_EDGE / max(width, height), math.sqrt(_MOST_PIXELS / (width * height)))
    if scale < 1.0:
        width, height = int(width * scale), int(height * scale)
    return max(1, -(-(width * height) // _PIXELS_PER_TOKEN))


def _image_block(block: dict[str, Any]) -> dict[str, Any]:
    source = block.get("source")
    if isinstance(source, dict) and source.get("type") == "base64":
        data = source.get("data")
        size = base64_size(data) if isinstance(data, str) else None
        if size is not None:
            return {"type": ANTHROPIC_IMAGE, "tokens": anthropic_image_tokens(*size)}
    return {"type": "image_url", "image_url": {"url": None}}  # the configured estimate


def _blocks(blocks: list[Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            out.append(_text_part(block["text"]))
        elif kind == "image":
            out.append(_image_block(block))
        elif kind == "tool_use":
            name = block.get("name")
            called = (name if isinstance(name, str) else "") + _json(block.get("input"))
            out.append(_text_part(called))
        elif kind == "tool_result":
            content = block.get("content")
            if isinstance(content, str):
                out.append(_text_part(content))
            elif isinstance(content, list):
                out.extend(_blocks(content))
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            out.append(_text_part(block["thinking"]))
    return out


def _anthropic_tool(tool: Any) -> Any:
    if isinstance(tool, dict) and "input_schema" in tool:
        function = {
            "name": tool.get("name"),
            "description": tool.get("description"),
            "parameters": tool.get("input_schema"),
        }
        return {"type": "function", "function": function}
    return tool  # a server tool (web search, ...): counted as its JSON


def messages_as_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """The chat request a Messages request counts as (see the module docstring)."""
    messages: list[dict[str, Any]] = []
    system = payload.get("system")
    if isinstance(system, str):
        messages.append({"role": "system", "content": system})
    elif isinstance(system, list):
        messages.append({"role": "system", "content": _blocks(system)})
    given = payload.get("messages")
    for message in given if isinstance(given, list) else []:
        if not isinstance(message, dict):
            continue
        role = message.get("role") if isinstance(message.get("role"), str) else "user"
        content = message.get("content")
        if isinstance(content, list):
            messages.append({"role": role, "content": _blocks(content)})
        else:
            messages.append({"role": role, "content": content if isinstance(content, str) else ""})
    chat: dict[str, Any] = {"messages": messages}
    tools = payload.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [_anthropic_tool(tool) for tool in tools]
        choice = payload.get("tool_choice")
        if isinstance(choice, dict):
            if choice.get("type") == "tool":
                chat["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
            elif choice.get("type") == "none":
                chat["tool_choice"] = "none"
    return chat
