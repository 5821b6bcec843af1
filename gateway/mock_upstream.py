"""A small, deterministic model server speaking OpenAI's and Anthropic's APIs.

It exists so the gateway can be demonstrated, tested and benchmarked against a real HTTP
upstream without a GPU or a network: answers are cheap to produce, identical bytes for the
same request, and their `usage` numbers are true (re-tokenizing the text gives the same
counts). It serves OpenAI's `POST /v1/chat/completions`, `/v1/completions`, `/v1/embeddings`
and `/v1/responses` (the Responses API), Anthropic's `POST /v1/messages` and
`/v1/messages/count_tokens` (the key as `x-api-key` or a bearer token, `anthropic-version`
required, errors in Anthropic's shape), `GET /v1/models`, `/v1/models/{id}`, a stored
response's `GET` / `DELETE` `/v1/responses/{id}`, `GET .../input_items` and `POST
.../cancel` (400: none is a background response), `/healthz`, and
`GET /debug/last-request`, which shows the last POST as the gateway forwarded it (method,
path, query, every header as sent, e.g. `anthropic-version` / `anthropic-beta`, raw body).
Wire details of the two newer APIs (event sequences, usage shapes) are in
`gateway.mock_apis`.

Answers are words from a fixed vocabulary, one token each, seeded by the request. Chat and
legacy completions are as long as the request's limit (finish_reason "length"), else
`default_max_tokens` ("stop"). A Responses or Messages answer is `default_max_tokens` long
unless `max_output_tokens` / `max_tokens` is smaller and cuts it (status "incomplete" and a
final `response.incomplete` event; stop_reason "max_tokens" rather than "end_turn"). Input
is counted over the visible text: chat by OpenAI's cookbook rule, Responses over
`instructions` and the input's texts, Messages over `system` and the messages' texts.

Request headers inject failures (`x-mock-status`, an error in the route's API's shape;
`x-mock-disconnect-after`), latency (`x-mock-ttft`, `x-mock-token-delay`) and untrue usage
(`x-mock-usage-prompt-tokens`, `x-mock-usage-completion-tokens`: the prompt and output
numbers usage reports, the text unchanged; token classes `x-mock-usage-cached-tokens`,
`x-mock-usage-cache-write-tokens`, `x-mock-usage-reasoning-tokens`, in OpenAI's details or,
with `x-mock-usage-style: litellm`, in LiteLLM's top-level cache fields; on /v1/responses in
`input_tokens_details.cached_tokens` / `cache_write_tokens` and
`output_tokens_details.reasoning_tokens`; on /v1/messages as `cache_read_input_tokens` /
`cache_creation_input_tokens`, Anthropic's `input_tokens` being the prompt less both, never
below 0), no usage at all (`x-mock-omit-usage: true`, even when a stream asks for it;
Responses say `usage: null`, Messages drop their `usage` objects) and several choices
(`x-mock-allow-n: true` lets a chat or completion request's `n` of 1-16 through: each choice
has words of its own and ends with a "." token, so the choices' texts joined tokenize
differently from each on its own, as real answers do; a stream interleaves them as OpenAI
does; without the header `n` must be 1).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import itertools
import math
import random
import struct
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import orjson
import tiktoken
from aiohttp import web

from gateway.metering.tokenizers import get_encoding
from gateway.mock_apis import (
    InvalidRequest,
    MessageAnswer,
    ResponseAnswer,
    anthropic_error_body,
    message_events,
    message_object,
    messages_input_tokens,
    messages_usage,
    response_events,
    response_object,
    responses_input_tokens,
    responses_usage,
)

__all__ = [
    "CREATED",
    "MOCK_MODEL_ID",
    "WORDS",
    "MockOptions",
    "create_mock_app",
    "run_mock_upstream",
]

CREATED: Final = 1700000000
"""The fixed `created` timestamp of every answer, so equal requests give equal bytes."""

MOCK_MODEL_ID: Final = "mock-model"
SYSTEM_FINGERPRINT: Final = "fp_mock"
DEFAULT_EMBEDDING_DIMENSIONS: Final = 8
MAX_EMBEDDING_DIMENSIONS: Final = 4096
MAX_BODY_BYTES: Final = 64 * 1024 * 1024
STORED_RESPONSES: Final = 10_000

# Every `" " + word` and `word.capitalize()` is exactly one token in both cl100k_base and
# o200k_base, and both encodings split text at spaces before merging, so a text made of
# these words has exactly as many tokens as it has words. `create_mock_app` re-checks this
# for the encoding it uses; the tests check both encodings.
WORDS: Final[tuple[str, ...]] = (
    "the", "of", "and", "to", "in", "is", "it", "you", "that", "was", "for", "on", "are",
    "with", "as", "they", "be", "at", "one", "have", "this", "from", "by", "word", "but",
    "not", "what", "all", "we", "when", "your", "can", "there", "each", "which", "do", "how",
    "will", "up", "other", "about", "out", "many", "then", "some", "would", "make", "like",
    "time", "look", "two", "more", "write", "see", "number", "way", "could", "people",
    "first", "water", "long", "day", "new", "work",
)  # fmt: skip

_TOKENS_PER_MESSAGE: Final = 3
_TOKENS_PER_NAME: Final = 1
_REPLY_PRIMING_TOKENS: Final = 3
_EXCLUDED_FROM_SEED: Final = frozenset({"stream", "stream_options"})
_SSE_DONE: Final = b"data: [DONE]\n\n"
_PLACEHOLDER: Final = "\x00"
_PLACEHOLDER_JSON: Final = orjson.dumps(_PLACEHOLDER)
_JSON: Final = "application/json"


@dataclass(frozen=True)
class MockOptions:
    """How the mock upstream counts tokens, paces streams and authenticates callers."""

    tokenizer: str = "o200k_base"
    """Encoding used to count prompt tokens (and to verify the word list)."""
    ttft: float = 0.0
    """Seconds before the first streamed chunk, and before a non-streamed answer."""
    token_delay: float = 0.0
    """Seconds between streamed token chunks."""
    default_max_tokens: int = 16
    """Completion length when the request names no limit; the natural length of a Responses
    or Messages answer, which a smaller limit cuts short."""
    api_key: str | None = None
    """If set, requests to /v1 must carry `Authorization: Bearer <api_key>` (on Anthropic's
    routes `x-api-key: <api_key>` will do too)."""


class _Reject(Exception):
    """Abort handling a request with an error, rendered in the route's API's own shape."""

    def __init__(
        self,
        status: int,
        message: str,
        err_type: str = "invalid_request_error",
        code: str = "invalid_request",
        param: str | None = None,
    ) -> None:
        super().__init__(status, message)
        self.status = status
        self.message = message
        self.err_type = err_type
        self.code = code
        self.param = param


def _error_body(message: str, err_type: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    )


def _json_response(payload: bytes, status: int = 200) -> web.Response:
    return web.Response(body=payload, status=status, content_type=_JSON)


def _openai_error(rejected: _Reject) -> web.Response:
    body = _error_body(rejected.message, rejected.err_type, rejected.code, rejected.param)
    return _json_response(body, rejected.status)


def _anthropic_error(rejected: _Reject) -> web.Response:
    return _json_response(anthropic_error_body(rejected.status, rejected.message), rejected.status)


def _bad_request(message: str, param: str | None = None) -> _Reject:
    return _Reject(400, message, param=param)


def _check_vocabulary(encoding: tiktoken.Encoding) -> None:
    """Refuse to start if any word is not a single token in `encoding`."""
    for word in WORDS:
        for form in (" " + word, word.capitalize()):
            if len(encoding.encode(form, disallowed_special=())) != 1:
                raise RuntimeError(f"{form!r} is not one token in {encoding.name}")
    sample = WORDS[0].capitalize() + "".join(" " + word for word in WORDS)
    if len(encoding.encode(sample + ".", disallowed_special=())) != len(WORDS) + 2:
        raise RuntimeError(f"the word list does not tokenize word by word in {encoding.name}")


# JSON string literals of each word in both forms, so a token chunk is three concatenations.
_CAPITALIZED: Final = tuple(word.capitalize() for word in WORDS)
_SPACED: Final = tuple(" " + word for word in WORDS)
_CAPITALIZED_JSON: Final = tuple(orjson.dumps(w) for w in _CAPITALIZED)
_SPACED_JSON: Final = tuple(orjson.dumps(w) for w in _SPACED)
_WORD_INDICES: Final = range(len(WORDS))


def _completion_words(digest: bytes, count: int) -> list[int]:
    """Indices into WORDS for a completion of `count` tokens, seeded by the request digest."""
    if count <= 0:
        return []
    # Pseudo-randomness here only picks filler words; it must be reproducible, not secure.
    rng = random.Random(int.from_bytes(digest, "big"))  # noqa: S311
    return rng.choices(_WORD_INDICES, k=count)


def _completion_text(indices: list[int], period: bool = False) -> str:
    """The text of a completion's words; with `period`, its last token is "." instead."""
    if not indices:
        return ""
    if period:
        return _completion_text(indices[:-1]) + "."
    return _CAPITALIZED[indices[0]] + "".join([_SPACED[i] for i in indices[1:]])


_PERIOD_JSON: Final = orjson.dumps(".")


def _pieces(indices: list[int]) -> Iterator[bytes]:
    """The JSON strings of a one-choice completion's tokens, in order."""
    return (_piece_json(indices, position, False) for position in range(len(indices)))


def _piece_json(indices: list[int], position: int, period: bool) -> bytes:
    """The JSON string of a completion's token at `position` (see `_completion_text`)."""
    if period and position == len(indices) - 1:
        return _PERIOD_JSON
    return _SPACED_JSON[indices[position]] if position else _CAPITALIZED_JSON[indices[position]]


def _header_float(request: web.Request, name: str, default: float) -> float:
    raw = request.headers.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad_request(f"header {name} must be a number of seconds") from None
    if not math.isfinite(value) or value < 0:
        raise _bad_request(f"header {name} must be a non-negative number of seconds")
    return value


def _header_int(request: web.Request, name: str) -> int | None:
    raw = request.headers.get(name)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise _bad_request(f"header {name} must be an integer") from None
    if value < 0:
        raise _bad_request(f"header {name} must not be negative")
    return value


def _completion_limit(
    body: dict[str, Any], keys: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
) -> int | None:
    """The request's own completion limit: the first of `keys` it sets (for chat,
    max_completion_tokens, else max_tokens)."""
    for key in keys:
        value = body.get(key)
        if value is None:
            continue
        if type(value) is not int or value < 0:
            raise _bad_request(f"{key} must be a non-negative integer", key)
        return value
    return None


MAX_CHOICES: Final = 16


def _choices_of(body: dict[str, Any], allow_n: bool) -> int:
    """How many choices to answer with: `n` where `x-mock-allow-n` lets it through, else 1."""
    n = body.get("n")
    if n is None or n == 1:
        return 1
    if not allow_n:
        raise _bad_request("the mock upstream only supports n=1", "n")
    if type(n) is not int or not 1 <= n <= MAX_CHOICES:
        raise _bad_request(f"n must be an integer in 1-{MAX_CHOICES}", "n")
    return n


def _header_flag(request: web.Request, name: str) -> bool:
    return request.headers.get(name, "").strip().lower() in ("1", "true", "yes")


def _stream_flags(body: dict[str, Any]) -> tuple[bool, bool]:
    """(stream, include_usage) of a request."""
    stream = body.get("stream") is True
    options = body.get("stream_options")
    include_usage = stream and isinstance(options, dict) and options.get("include_usage") is True
    return stream, include_usage


def _request_digest(body: dict[str, Any]) -> bytes:
    """sha256 of the canonical request, ignoring how the answer is delivered."""
    canonical = {k: v for k, v in body.items() if k not in _EXCLUDED_FROM_SEED}
    try:
        encoded = orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)
    except orjson.JSONEncodeError as exc:
        raise _bad_request(f"request body cannot be canonicalized: {exc}") from None
    return hashlib.sha256(encoded).digest()


@dataclass(frozen=True)
class _UsageHeaders:
    """What a request's `x-mock-usage-*` headers ask the answer's usage to say."""

    prompt: int | None  # the prompt (input) tokens to report instead of the true count
    completion: int | None  # the completion (output) tokens to report instead
    cached: int | None
    written: int | None
    reasoning: int | None

    def reported(self, prompt_tokens: int, completion_tokens: int) -> tuple[int, int]:
        """(prompt, completion) tokens to report for these true counts."""
        return (
            prompt_tokens if self.prompt is None else self.prompt,
            completion_tokens if self.completion is None else self.completion,
        )


def _usage_headers(request: web.Request) -> _UsageHeaders:
    return _UsageHeaders(
        prompt=_header_int(request, "x-mock-usage-prompt-tokens"),
        completion=_header_int(request, "x-mock-usage-completion-tokens"),
        cached=_header_int(request, "x-mock-usage-cached-tokens"),
        written=_header_int(request, "x-mock-usage-cache-write-tokens"),
        reasoning=_header_int(request, "x-mock-usage-reasoning-tokens"),
    )


def _reported_usage(
    request: web.Request, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    """The answer's `usage`: the true counts, unless a header says what to report instead;
    token classes as the headers give them (OpenAI's details, or with
    `x-mock-usage-style: litellm` the top-level fields LiteLLM's proxy passes on from
    Anthropic: `cache_read_input_tokens`, `cache_creation_input_tokens`)."""
    asked = _usage_headers(request)
    usage: dict[str, Any] = _usage(*asked.reported(prompt_tokens, completion_tokens))
    cached, written, reasoning = asked.cached, asked.written, asked.reasoning
    if request.headers.get("x-mock-usage-style") == "litellm":
        if cached is not None:
            usage["cache_read_input_tokens"] = cached
        if written is not None:
            usage["cache_creation_input_tokens"] = written
    else:
        details: dict[str, int] = {}
        if cached is not None:
            details["cached_tokens"] = cached
        if written is not None:
            details["cache_creation_tokens"] = written
        if details:
            usage["prompt_tokens_details"] = details
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return usage


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _split_template(payload: dict[str, Any]) -> tuple[bytes, bytes]:
    """Cut a serialized chunk at its placeholder string into (prefix, suffix)."""
    prefix, _, suffix = _sse(payload).rpartition(_PLACEHOLDER_JSON)
    return prefix, suffix


def _drop_connection(request: web.Request) -> web.Response:
    """Close the connection without an answer; aiohttp then finds the transport closed."""
    transport = request.transport
    if transport is not None:
        transport.close()
    return web.Response(status=500)


@dataclass(frozen=True)
class _Pacing:
    """When a request's answer goes out: `x-mock-ttft`, `x-mock-token-delay`,
    `x-mock-disconnect-after` (or the options' defaults)."""

    ttft: float
    delay: float
    disconnect_after: int | None


async def _whole_answer_dropped(request: web.Request, pacing: _Pacing) -> bool:
    """Wait out the first-token time of a non-streamed answer; True if it must be dropped."""
    if pacing.ttft > 0:
        await asyncio.sleep(pacing.ttft)
    return pacing.disconnect_after is not None


async def _send_stream(
    request: web.Request,
    pacing: _Pacing,
    head: bytes,
    positions: Iterable[bytes],
    tail: bytes,
) -> web.StreamResponse:
    """Send an event stream: `head` after the first-token time, then the bytes of each token
    position `pacing.delay` apart, then `tail`; with `disconnect_after` N, only N positions
    and then the connection is dropped."""
    if pacing.disconnect_after is not None:
        positions = itertools.islice(positions, pacing.disconnect_after)
    resp = web.StreamResponse(headers={"Cache-Control": "no-cache"})
    resp.content_type = "text/event-stream"
    if pacing.ttft > 0:
        await asyncio.sleep(pacing.ttft)
    try:
        await resp.prepare(request)
        if head:
            await resp.write(head)
        for position, piece in enumerate(positions):
            if position and pacing.delay > 0:
                await asyncio.sleep(pacing.delay)
            await resp.write(piece)
        if pacing.disconnect_after is not None:
            _drop_connection(request)
            return resp
        await resp.write(tail)
    except ConnectionError:
        # The client went away; aiohttp notices the closed transport on its own.
        return resp
    return resp


def _chat_stream(
    gen: _Generation, chat: bool, usage: dict[str, Any]
) -> tuple[bytes, Iterator[bytes], bytes]:
    """A chat or legacy completion stream: (the opening chunks, each token position's chunks
    (one per choice, interleaved as OpenAI does), the finish and usage chunks and [DONE])."""
    object_name = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "id": gen.response_id,
            "object": object_name,
            "created": CREATED,
            "model": gen.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }
        if gen.include_usage:
            payload["usage"] = usage
        return payload

    def choice(content: str | None, finish_reason: str | None, index: int) -> dict[str, Any]:
        if chat:
            delta = {} if content is None else {"content": content}
            return {
                "index": index,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        return {
            "index": index,
            "text": content or "",
            "logprobs": None,
            "finish_reason": finish_reason,
        }

    indexed = list(enumerate(gen.choices))
    templates = [
        _split_template(chunk([choice(_PLACEHOLDER, None, index)], None)) for index, _ in indexed
    ]
    head: list[bytes] = []
    if chat:
        for index, _ in indexed:
            opening = choice("", None, index)
            opening["delta"] = {"role": "assistant", "content": ""}
            head.append(_sse(chunk([opening], None)))
    tail = [_sse(chunk([choice(None, gen.finish_reason, index)], None)) for index, _ in indexed]
    if gen.include_usage:
        tail.append(_sse(chunk([], usage)))
    tail.append(_SSE_DONE)

    def positions() -> Iterator[bytes]:
        for position in range(len(gen.choices[0])):  # every choice has as many words
            parts: list[bytes] = []
            for index, words in indexed:
                prefix, suffix = templates[index]
                parts.append(prefix + _piece_json(words, position, gen.period) + suffix)
            yield b"".join(parts)

    return b"".join(head), positions(), b"".join(tail)


@dataclass(frozen=True)
class _Generation:
    """A validated completion request, ready to be answered."""

    model: str
    response_id: str
    choices: list[list[int]]  # each choice's words, as indices into WORDS
    period: bool  # each choice's last token is "." (n > 1)
    finish_reason: str
    prompt_tokens: int
    stream: bool
    include_usage: bool
    omit_usage: bool


class _MockServer:
    """Request handlers sharing one encoding and the last-request record."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.encoding = get_encoding(options.tokenizer)
        _check_vocabulary(self.encoding)
        self._expected_auth = (
            None if options.api_key is None else f"Bearer {options.api_key}".encode()
        )
        self._last_request: bytes = orjson.dumps(None)
        # Responses kept for GET / DELETE / cancel by id (`store`, the default), the oldest
        # dropped past STORED_RESPONSES.
        self._stored: dict[str, dict[str, Any]] = {}
        self._models_body = orjson.dumps({"object": "list", "data": [self._model(MOCK_MODEL_ID)]})

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _model(model_id: str) -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": CREATED, "owned_by": "mock"}

    def _count(self, text: str) -> int:
        # encode_ordinary == encode(text, disallowed_special=()): special-token text is
        # counted as ordinary text instead of raising.
        return len(self.encoding.encode_ordinary(text)) if text else 0

    def _count_json(self, value: Any) -> int:
        return self._count(orjson.dumps(value).decode())

    def _record(self, request: web.Request, raw_body: bytes) -> None:
        headers: dict[str, str] = {}
        for raw_name, raw_value in request.raw_headers:
            name = raw_name.decode("utf-8", "replace")
            value = raw_value.decode("utf-8", "replace")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self._last_request = orjson.dumps(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query_string,
                "headers": headers,
                "body": raw_body.decode("utf-8", "replace"),
            }
        )

    def _check_access(self, request: web.Request, anthropic: bool = False) -> None:
        """Enforce the API key (for Anthropic's API as `x-api-key` or a bearer token) and
        Anthropic's `anthropic-version` header, then honour `x-mock-status`."""
        if self._expected_auth is not None:
            offered = [request.headers.get("Authorization", "").encode()]
            if anthropic and "x-api-key" in request.headers:
                offered.append(f"Bearer {request.headers['x-api-key']}".encode())
            if not any(hmac.compare_digest(key, self._expected_auth) for key in offered):
                given = any(offered)
                if anthropic:
                    message = "invalid x-api-key" if given else "x-api-key header is required"
                    raise _Reject(401, message, "authentication_error")
                message = "Incorrect API key provided." if given else "No API key provided."
                raise _Reject(401, message, code="invalid_api_key")
        if anthropic and "anthropic-version" not in request.headers:
            raise _bad_request("anthropic-version: header is required")
        forced = request.headers.get("x-mock-status")
        if forced is not None:
            try:
                status = int(forced)
            except ValueError:
                status = 0
            if not 400 <= status <= 599:
                raise _bad_request("header x-mock-status must be an HTTP status in 400-599")
            raise _Reject(status, "mock failure", "server_error", "mock_failure")

    async def _read_body(self, request: web.Request, anthropic: bool = False) -> dict[str, Any]:
        raw = await request.read()
        self._record(request, raw)
        self._check_access(request, anthropic)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _bad_request("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _bad_request("request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _bad_request("you must provide a model parameter", "model")
        return body

    def _chat_prompt_tokens(self, body: dict[str, Any]) -> int:
        """OpenAI's published count for gpt-4o / gpt-4 chat prompts (tiktoken cookbook).

        Each message costs 3 tokens plus its string values (+1 for a `name`); a list
        `content` counts the text of its `{"type": "text"}` parts; the reply is primed with
        3 more. Non-string values such as `tool_calls`, and the request's `tools`, are
        approximated by the token count of their compact JSON.
        """
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad_request("messages must be a non-empty array", "messages")
        total = _REPLY_PRIMING_TOKENS
        for message in messages:
            if not isinstance(message, dict):
                raise _bad_request("each message must be an object", "messages")
            total += _TOKENS_PER_MESSAGE
            for key, value in message.items():
                if isinstance(value, str):
                    total += self._count(value)
                    if key == "name":
                        total += _TOKENS_PER_NAME
                elif key == "content" and isinstance(value, list):
                    for part in value:
                        if isinstance(part, dict) and part.get("type") == "text":
                            text = part.get("text")
                            if isinstance(text, str):
                                total += self._count(text)
                elif value is not None:
                    total += self._count_json(value)
        tools = body.get("tools")
        if tools:
            total += self._count_json(tools)
        return total

    def _input_tokens(self, value: Any, param: str) -> int:
        """Tokens of a prompt / embedding input: str, [str], [int] or [[int]]."""
        if isinstance(value, str):
            return self._count(value)
        if isinstance(value, list) and value:
            if all(isinstance(item, str) for item in value):
                return sum(self._count(item) for item in value)
            if all(type(item) is int for item in value):
                return len(value)
            if all(
                isinstance(item, list) and item and all(type(t) is int for t in item)
                for item in value
            ):
                return sum(len(item) for item in value)
        raise _bad_request(
            f"{param} must be a string, an array of strings, an array of token ids "
            "or an array of token id arrays",
            param,
        )

    def _generation(
        self, request: web.Request, body: dict[str, Any], id_prefix: str, prompt_tokens: int
    ) -> _Generation:
        n = _choices_of(body, _header_flag(request, "x-mock-allow-n"))
        limit = _completion_limit(body)
        count = self.options.default_max_tokens if limit is None else limit
        digest = _request_digest(body)
        stream, include_usage = _stream_flags(body)
        # Choice 0 has the words a request without `n` gets; each other its own.
        seeds = [digest] + [hashlib.sha256(digest + bytes([k])).digest() for k in range(1, n)]
        omit_usage = _header_flag(request, "x-mock-omit-usage")
        return _Generation(
            model=body["model"],
            response_id=id_prefix + digest.hex()[:24],
            choices=[_completion_words(seed, count) for seed in seeds],
            period=n > 1,
            finish_reason="stop" if limit is None else "length",
            prompt_tokens=prompt_tokens,
            stream=stream,
            include_usage=include_usage and not omit_usage,
            omit_usage=omit_usage,
        )

    async def _dispatch(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        render: Callable[[_Reject], web.Response] = _openai_error,
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidRequest as invalid:
            return render(_bad_request(invalid.message, invalid.param))
        except _Reject as rejected:
            return render(rejected)

    # -- generation ----------------------------------------------------------------------

    async def _answer(
        self, request: web.Request, gen: _Generation, chat: bool
    ) -> web.StreamResponse:
        pacing = self._pacing(request)
        completion_tokens = sum(len(words) for words in gen.choices)
        usage = _reported_usage(request, gen.prompt_tokens, completion_tokens)
        if gen.stream:
            head, positions, tail = _chat_stream(gen, chat, usage)
            return await _send_stream(request, pacing, head, positions, tail)
        if await _whole_answer_dropped(request, pacing):
            return _drop_connection(request)
        choices: list[dict[str, Any]] = []
        for index, words in enumerate(gen.choices):
            text = _completion_text(words, gen.period)
            if chat:
                choices.append(
                    {
                        "index": index,
                        "message": {"role": "assistant", "content": text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": gen.finish_reason,
                    }
                )
            else:
                choices.append(
                    {
                        "index": index,
                        "text": text,
                        "logprobs": None,
                        "finish_reason": gen.finish_reason,
                    }
                )
        payload: dict[str, Any] = {
            "id": gen.response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": CREATED,
            "model": gen.model,
            "choices": choices,
            "usage": usage,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if gen.omit_usage:
            del payload["usage"]
        return _json_response(orjson.dumps(payload))

    def _pacing(self, request: web.Request) -> _Pacing:
        return _Pacing(
            ttft=_header_float(request, "x-mock-ttft", self.options.ttft),
            delay=_header_float(request, "x-mock-token-delay", self.options.token_delay),
            disconnect_after=_header_int(request, "x-mock-disconnect-after"),
        )

    # -- handlers ------------------------------------------------------------------------

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        prompt_tokens = self._chat_prompt_tokens(body)
        generation = self._generation(request, body, "chatcmpl-", prompt_tokens)
        return await self._answer(request, generation, True)

    async def _completion(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        prompt_tokens = self._input_tokens(body.get("prompt"), "prompt")
        generation = self._generation(request, body, "cmpl-", prompt_tokens)
        return await self._answer(request, generation, False)

    def _cut_answer(self, body: dict[str, Any], limit: int | None) -> tuple[str, list[int], bool]:
        """(hex digest, words, complete) of a Responses or Messages answer: its natural length
        is `default_max_tokens`, and a smaller limit cuts it short (incomplete)."""
        natural = self.options.default_max_tokens
        count = natural if limit is None else min(limit, natural)
        digest = _request_digest(body)
        return digest.hex(), _completion_words(digest, count), limit is None or limit >= natural

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        prompt_tokens = responses_input_tokens(body, self._count)
        limit = _completion_limit(body, ("max_output_tokens",))
        pacing = self._pacing(request)
        asked = _usage_headers(request)
        hexdigest, words, complete = self._cut_answer(body, limit)
        usage = None
        if not _header_flag(request, "x-mock-omit-usage"):
            reported = asked.reported(prompt_tokens, len(words))
            usage = responses_usage(
                *reported, asked.cached or 0, asked.written or 0, asked.reasoning or 0
            )
        answer = ResponseAnswer(
            response_id="resp_" + hexdigest[:48],
            item_id="msg_" + hexdigest[16:64],
            created_at=CREATED,
            model=body["model"],
            body=body,
            text=_completion_text(words),
            complete=complete,
            usage=usage,
        )
        if body.get("store", True) is not False:
            self._store_response(answer, body)
        if body.get("stream") is True:
            head, deltas, tail = response_events(answer, _pieces(words), len(words))
            return await _send_stream(request, pacing, head, deltas, tail)
        if await _whole_answer_dropped(request, pacing):
            return _drop_connection(request)
        return _json_response(orjson.dumps(response_object(answer)))

    def _store_response(self, answer: ResponseAnswer, body: dict[str, Any]) -> None:
        stored = self._stored
        stored.pop(answer.response_id, None)
        while len(stored) >= STORED_RESPONSES:
            del stored[next(iter(stored))]
        given = body.get("input")
        items: list[Any] = (
            [{"type": "message", "role": "user", "content": given}]
            if isinstance(given, str)
            else list(given or ())
        )
        stored[answer.response_id] = {"response": response_object(answer), "input": items}

    def _stored_response(self, request: web.Request) -> dict[str, Any]:
        self._record(request, b"")
        self._check_access(request)
        found = self._stored.get(request.match_info["response_id"])
        if found is None:
            raise _Reject(
                404,
                f"Response with id '{request.match_info['response_id']}' not found.",
                "invalid_request_error",
                "not_found",
                None,
            )
        return found

    async def _get_response(self, request: web.Request) -> web.StreamResponse:
        return _json_response(orjson.dumps(self._stored_response(request)["response"]))

    async def _delete_response(self, request: web.Request) -> web.StreamResponse:
        response_id = self._stored_response(request)["response"]["id"]
        del self._stored[response_id]
        return _json_response(
            orjson.dumps({"id": response_id, "object": "response", "deleted": True})
        )

    async def _input_items(self, request: web.Request) -> web.StreamResponse:
        items = self._stored_response(request)["input"]
        return _json_response(orjson.dumps({"object": "list", "data": items, "has_more": False}))

    async def _cancel_response(self, request: web.Request) -> web.StreamResponse:
        self._stored_response(request)
        raise _bad_request("Only responses created with background=true can be cancelled.")

    async def stored(self, request: web.Request) -> web.StreamResponse:
        """GET / DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel."""
        if request.path.endswith("/cancel"):
            handler = self._cancel_response
        elif request.path.endswith("/input_items"):
            handler = self._input_items
        elif request.method == "DELETE":
            handler = self._delete_response
        else:
            handler = self._get_response
        return await self._dispatch(request, handler)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, anthropic=True)
        prompt_tokens = messages_input_tokens(body, self._count)
        max_tokens = body.get("max_tokens")
        if max_tokens is None:
            raise _bad_request("max_tokens: Field required", "max_tokens")
        if type(max_tokens) is not int or max_tokens < 1:
            raise _bad_request(
                "max_tokens: Input should be an integer greater than or equal to 1", "max_tokens"
            )
        pacing = self._pacing(request)
        asked = _usage_headers(request)
        hexdigest, words, complete = self._cut_answer(body, max_tokens)
        usage = None
        if not _header_flag(request, "x-mock-omit-usage"):
            reported = asked.reported(prompt_tokens, len(words))
            usage = messages_usage(*reported, asked.cached or 0, asked.written or 0)
        answer = MessageAnswer(
            message_id="msg_" + hexdigest[:24],
            model=body["model"],
            text=_completion_text(words),
            complete=complete,
            usage=usage,
        )
        if body.get("stream") is True:
            head, deltas, tail = message_events(answer, _pieces(words))
            return await _send_stream(request, pacing, head, deltas, tail)
        if await _whole_answer_dropped(request, pacing):
            return _drop_connection(request)
        return _json_response(orjson.dumps(message_object(answer)))

    async def _count_tokens(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request, anthropic=True)
        input_tokens = messages_input_tokens(body, self._count)
        if await _whole_answer_dropped(request, self._pacing(request)):
            return _drop_connection(request)
        return _json_response(orjson.dumps({"input_tokens": input_tokens}))

    async def _embeddings(self, request: web.Request) -> web.StreamResponse:
        body = await self._read_body(request)
        raw_input = body.get("input")
        prompt_tokens = self._input_tokens(raw_input, "input")
        dimensions = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
        if type(dimensions) is not int or not 1 <= dimensions <= MAX_EMBEDDING_DIMENSIONS:
            raise _bad_request(
                f"dimensions must be an integer in 1-{MAX_EMBEDDING_DIMENSIONS}", "dimensions"
            )
        encoding_format = body.get("encoding_format", "float")
        if encoding_format not in ("float", "base64"):
            raise _bad_request("encoding_format must be 'float' or 'base64'", "encoding_format")
        items: list[Any] = [raw_input]  # one string or one token array
        if isinstance(raw_input, list) and not all(type(t) is int for t in raw_input):
            items = raw_input
        data = [
            {
                "object": "embedding",
                "index": index,
                "embedding": _embedding(item, dimensions, encoding_format == "base64"),
            }
            for index, item in enumerate(items)
        ]
        prompt_tokens = _reported_usage(request, prompt_tokens, 0)["prompt_tokens"]
        payload = {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
        return _json_response(orjson.dumps(payload))

    async def _moderations(self, request: web.Request) -> web.StreamResponse:
        """Nothing is ever flagged; the id is the request's digest (same request, same
        bytes). A route the gateway meters by a flat price (proxy.passthrough), not tokens."""
        body = await self._read_body(request)
        if await _whole_answer_dropped(request, self._pacing(request)):  # x-mock-ttft etc.
            return _drop_connection(request)
        payload = {
            "id": "modr-" + _request_digest(body).hex()[:24],
            "model": body["model"],
            "results": [{"flagged": False, "categories": {}, "category_scores": {}}],
        }
        return _json_response(orjson.dumps(payload))

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._check_access(request)
        return _json_response(self._models_body)

    async def _one_model(self, request: web.Request) -> web.StreamResponse:
        self._check_access(request)
        return _json_response(orjson.dumps(self._model(request.match_info["model_id"])))

    # -- routes (each converts a _Reject into its response) --------------------------------

    async def chat(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        return await self._dispatch(request, self._chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        return await self._dispatch(request, self._completion)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/embeddings."""
        return await self._dispatch(request, self._embeddings)

    async def responses(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/responses (OpenAI's Responses API)."""
        return await self._dispatch(request, self._responses)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages (Anthropic's Messages API; errors in Anthropic's shape)."""
        return await self._dispatch(request, self._messages, _anthropic_error)

    async def count_tokens(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/messages/count_tokens (Anthropic's token count of a Messages request)."""
        return await self._dispatch(request, self._count_tokens, _anthropic_error)

    async def moderations(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/moderations."""
        return await self._dispatch(request, self._moderations)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models."""
        return await self._dispatch(request, self._models)

    async def one_model(self, request: web.Request) -> web.StreamResponse:
        """GET /v1/models/{model_id}."""
        return await self._dispatch(request, self._one_model)

    async def last_request(self, request: web.Request) -> web.StreamResponse:
        """GET /debug/last-request: the most recent POST as received (null before any)."""
        return _json_response(self._last_request)

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        """GET /healthz."""
        return _json_response(b'{"status":"ok"}')


def _embedding(item: Any, dimensions: int, as_base64: bool) -> list[float] | str:
    """A unit-length float32 vector derived from a hash of one input."""
    key = item.encode() if isinstance(item, str) else orjson.dumps(item)
    digest = hashlib.sha256(b"mock-embedding\x00" + key).digest()
    rng = random.Random(int.from_bytes(digest, "big"))  # noqa: S311 - reproducible, not secure
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    if as_base64:
        return base64.b64encode(packed).decode("ascii")
    return list(struct.unpack(f"<{dimensions}f", packed))


def create_mock_app(options: MockOptions | None = None) -> web.Application:
    """Build the mock upstream application; the tokenizer is loaded and checked here."""
    opts = options if options is not None else MockOptions()
    if opts.ttft < 0 or opts.token_delay < 0:
        raise ValueError("ttft and token_delay must not be negative")
    if opts.default_max_tokens < 0:
        raise ValueError("default_max_tokens must not be negative")
    server = _MockServer(opts)
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app.add_routes(
        [
            web.post("/v1/chat/completions", server.chat),
            web.post("/v1/completions", server.completions),
            web.post("/v1/embeddings", server.embeddings),
            web.post("/v1/responses", server.responses),
            web.get("/v1/responses/{response_id}", server.stored),
            web.delete("/v1/responses/{response_id}", server.stored),
            web.get("/v1/responses/{response_id}/input_items", server.stored),
            web.post("/v1/responses/{response_id}/cancel", server.stored),
            web.post("/v1/messages", server.messages),
            web.post("/v1/messages/count_tokens", server.count_tokens),
            web.post("/v1/moderations", server.moderations),
            web.get("/v1/models", server.models),
            web.get("/v1/models/{model_id:.+}", server.one_model),
            web.get("/debug/last-request", server.last_request),
            web.get("/healthz", server.healthz),
        ]
    )
    return app


def _event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is absent on Windows
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_mock_upstream(host: str, port: int, options: MockOptions) -> None:
    """Serve the mock upstream until SIGINT/SIGTERM (blocking)."""
    app = create_mock_app(options)

    def announce(*_: object) -> None:
        print(f"mock upstream listening on http://{host}:{port}/v1", flush=True)

    web.run_app(
        app,
        host=host,
        port=port,
        access_log=None,
        print=announce,
        handle_signals=True,
        shutdown_timeout=1.0,
        loop=_event_loop(),
    )
