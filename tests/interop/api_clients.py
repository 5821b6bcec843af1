"""The official SDKs on the two newer APIs: OpenAI's Responses API (`openai`'s
`client.responses.create`, whole and streamed) and Anthropic's Messages API (`anthropic`'s
`client.messages.create`, whole and streamed, and its `client.messages.stream` helper).

Each call answers an `ApiReply`: the status and headers of the HTTP answer, what the SDK made
of it (a whole answer's dict, or a stream's events as dicts), the answer's text, and the usage
the client was told, as the SDK itself accumulates it (a Responses stream's usage is the one
of its `response.completed` event; a Messages stream's the final message's, which
`message_delta` updates over `message_start`'s). The same code makes the direct call and the
call through the gateway, so the two replies can be compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import anthropic
import openai
from anthropic import AsyncAnthropic
from openai import AsyncOpenAI

__all__ = [
    "API_OF",
    "CALLS",
    "ApiCall",
    "ApiReply",
    "count_tokens",
    "make_call",
    "normalise_reply",
]

TIMEOUT = 60.0
PROMPT = "Say hello to the gateway."
MAX_TOKENS = 32  # more than the mock's answer (16 tokens): every answer ends on its own

# (API, how the SDK is called)
CALLS = [
    "responses",  # client.responses.create(...)
    "responses-stream",  # client.responses.create(..., stream=True)
    "messages",  # client.messages.create(...)
    "messages-create-stream",  # client.messages.create(..., stream=True): the raw events
    "messages-stream",  # async with client.messages.stream(...): the SDK's helper
]
ApiCall = Literal[
    "responses", "responses-stream", "messages", "messages-create-stream", "messages-stream"
]
API_OF: dict[str, Literal["responses", "messages"]] = {
    call: ("responses" if call.startswith("responses") else "messages") for call in CALLS
}


@dataclass
class ApiReply:
    status: int
    headers: dict[str, str] = field(default_factory=dict)  # names in lower case
    answer: Any = None  # the whole answer (dict), or the stream's events (list of dicts)
    text: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    error: Any = None  # an error answer's JSON body

    @property
    def stream(self) -> bool:
        return isinstance(self.answer, list)


def _headers(raw: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in raw.items()}


async def _responses(base: str, key: str, model: str, stream: bool) -> ApiReply:
    """`base` ends in /v1, as the OpenAI SDK's base_url does."""
    sdk = AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=TIMEOUT)
    try:
        raw = await sdk.responses.with_raw_response.create(
            model=model, input=PROMPT, max_output_tokens=MAX_TOKENS, stream=stream
        )
        headers = _headers(raw.headers)
        parsed: Any = raw.parse()
        if not stream:
            answer = parsed.to_dict()
            return ApiReply(raw.status_code, headers, answer, parsed.output_text, answer["usage"])
        events = [event.to_dict() async for event in parsed]
        finals = [e["response"] for e in events if e["type"] == "response.completed"]
        assert len(finals) == 1, events
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        text = "".join(
            part["text"]
            for item in finals[0]["output"]
            if item["type"] == "message"
            for part in item["content"]
            if part["type"] == "output_text"
        )
        assert deltas == text, (deltas, text)
        return ApiReply(raw.status_code, headers, events, text, finals[0]["usage"])
    except openai.APIStatusError as exc:
        return ApiReply(exc.status_code, _headers(exc.response.headers), error=exc.response.json())
    finally:
        await sdk.close()


def _message_text(message: dict[str, Any]) -> str:
    return "".join(block["text"] for block in message["content"] if block["type"] == "text")


def _accumulated_usage(events: list[dict[str, Any]]) -> dict[str, Any]:
    """A Messages stream's usage as Anthropic's SDK accumulates it: message_start's, each of
    its members that a message_delta carries (not null) replaced by the delta's."""
    (start,) = [e for e in events if e["type"] == "message_start"]
    usage = dict(start["message"]["usage"])
    for event in events:
        if event["type"] == "message_delta":
            usage.update({k: v for k, v in event["usage"].items() if v is not None})
    return usage


async def _messages(base: str, key: str, model: str, how: str) -> ApiReply:
    """`base` is the server's root (no /v1), as the Anthropic SDK's base_url is."""
    sdk = AsyncAnthropic(base_url=base, api_key=key, max_retries=0, timeout=TIMEOUT)
    args: dict[str, Any] = {
        "model": model,
        "max_tokens": MAX_TOKENS,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    try:
        if how == "messages-stream":
            async with sdk.messages.stream(**args) as helper:
                headers = _headers(helper.response.headers)
                status = helper.response.status_code
                events: list[dict[str, Any]] = [event.to_dict() async for event in helper]
                final: dict[str, Any] = (await helper.get_final_message()).to_dict()
            deltas = "".join(e["text"] for e in events if e["type"] == "text")
            assert deltas == _message_text(final), (deltas, final)
            return ApiReply(status, headers, events, _message_text(final), final["usage"])
        stream = how == "messages-create-stream"
        raw = await sdk.messages.with_raw_response.create(**args, stream=stream)
        headers = _headers(raw.headers)
        parsed: Any = await raw.parse()
        if not stream:
            answer: dict[str, Any] = parsed.to_dict()
            text = _message_text(answer)
            return ApiReply(raw.status_code, headers, answer, text, answer["usage"])
        events = [event.to_dict() async for event in parsed]
        text = "".join(
            e["delta"]["text"]
            for e in events
            if e["type"] == "content_block_delta" and e["delta"]["type"] == "text_delta"
        )
        return ApiReply(raw.status_code, headers, events, text, _accumulated_usage(events))
    except anthropic.APIStatusError as exc:
        return ApiReply(exc.status_code, _headers(exc.response.headers), error=exc.response.json())
    finally:
        await sdk.close()


async def make_call(root: str, key: str, model: str, call: str) -> ApiReply:
    """`call` (one of CALLS) to the server at `root` (http://host:port, no /v1)."""
    if API_OF[call] == "responses":
        return await _responses(root + "/v1", key, model, call == "responses-stream")
    return await _messages(root, key, model, call)


async def count_tokens(root: str, key: str, model: str) -> ApiReply:
    """`client.messages.count_tokens(...)` of the prompt every Messages call sends."""
    sdk = AsyncAnthropic(base_url=root, api_key=key, max_retries=0, timeout=TIMEOUT)
    try:
        raw = await sdk.messages.with_raw_response.count_tokens(
            model=model, messages=[{"role": "user", "content": PROMPT}]
        )
        answer = (await raw.parse()).to_dict()
        return ApiReply(raw.status_code, _headers(raw.headers), answer)
    except anthropic.APIStatusError as exc:
        return ApiReply(exc.status_code, _headers(exc.response.headers), error=exc.response.json())
    finally:
        await sdk.close()


# Members that differ between two identical calls: ids LiteLLM makes per call (a Responses
# id encodes, encrypted, the call's provider and upstream id; an answer it translates gets
# random item ids and the time of the call) and timestamps.
PER_CALL = frozenset({"id", "item_id", "created_at", "created"})


def normalise_reply(value: Any) -> Any:
    """An answer or event list with per-call members replaced, at any depth, and any `usage`
    object's `cost` dropped (LiteLLM's own, null, on a whole Responses answer; any the gateway
    reports is checked by the billing tests)."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if k in PER_CALL and v is not None:
                out[k] = f"<{k}>"
            elif k == "usage" and isinstance(v, dict):
                out[k] = {uk: normalise_reply(uv) for uk, uv in v.items() if uk != "cost"}
            else:
                out[k] = normalise_reply(v)
        return out
    if isinstance(value, list):
        return [normalise_reply(v) for v in value]
    return value
