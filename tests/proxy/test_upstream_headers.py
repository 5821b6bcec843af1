"""What crosses the proxy besides the body, against an upstream that behaves as LiteLLM's
proxy and OpenAI's API do: response headers through an allowlist (the gateway's own replace
the upstream's), and requests labelled the way real servers insist on (a UUID request id,
`application/json`)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from gateway.config import ConfigError, parse_settings
from tests.admin_client import Admin
from tests.procs import Proc, free_port

# Headers LiteLLM's proxy and OpenAI's API put on answers; the first group must not reach a
# client of the gateway, the second must, the third are the gateway's own.
LEAKS = {
    "x-litellm-key-spend": "12.345",  # the operator's spend on its master key
    "x-litellm-model-api-base": "http://10.1.2.3:8000/v1",  # the backend's address
    "x-litellm-call-id": "abc",
    "openai-organization": "operator-org",
    "llm_provider-x-internal": "1",
}
PASSED = {
    "openai-processing-ms": "42",
    "openai-version": "2020-10-01",
    "cache-control": "no-cache, must-revalidate",
}
THEIRS = {
    "x-request-id": "upstream-request-id",
    "x-ratelimit-limit-requests": "99999",
    "x-ratelimit-remaining-requests": "99998",
    "x-ratelimit-limit-tokens": "123456789",
}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


class Upstream:
    """A small OpenAI-style upstream on loopback that answers with LiteLLM's headers and
    records what it was sent."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.port = free_port()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append({"headers": dict(request.headers), "body": body})
        payload = json.loads(body)
        headers = {**LEAKS, **PASSED, **THEIRS}
        if request.headers.get("x-test-status") == "429":
            error = {"error": {"message": "slow down", "type": "rate_limit", "code": None}}
            return web.json_response(
                error, status=429, headers={**headers, "retry-after": "7", "x-should-retry": "true"}
            )
        usage = {"prompt_tokens": 8, "completion_tokens": 2, "total_tokens": 10}
        if not payload.get("stream"):
            answer = {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "created": 1,
                "model": payload["model"],
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "hi there"},
                        "finish_reason": "stop",
                    }
                ],
                "usage": usage,
            }
            return web.json_response(answer, headers=headers)
        response = web.StreamResponse(headers={**headers, "Content-Type": "text/event-stream"})
        await response.prepare(request)
        for text in ("hi", " there"):
            chunk = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "created": 1,
                "model": payload["model"],
                "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
            }
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        final = {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": payload["model"],
            "choices": [],
            "usage": usage,
        }
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", server.port)
    await site.start()
    yield server
    await runner.cleanup()


def _model(upstream: Upstream) -> dict[str, Any]:
    return {
        "name": "m",
        "pricing": {"input_per_million": "1", "output_per_million": "2"},
        "upstreams": [{"url": upstream.url + "/v1"}],
    }


async def _call(
    gw: Proc, key: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def _check_headers(headers: dict[str, str]) -> None:
    for name in LEAKS:
        assert name not in headers, (name, headers)
    for name, value in PASSED.items():
        assert headers.get(name) == value, (name, headers)
    # The gateway's own replace the upstream's: its request id, its limits (600/minute).
    assert headers["x-request-id"].startswith("req_")
    assert headers["x-ratelimit-limit-requests"] == "600"
    assert headers["x-ratelimit-remaining-requests"] != "99998"
    assert headers["x-ratelimit-limit-tokens"] == "1000000"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_upstream_headers_pass_an_allowlist_and_ours_replace_theirs(
    make_gateway: Callable[..., Proc], upstream: Upstream, stream: bool
) -> None:
    gw = make_gateway([_model(upstream)])
    _, key = Admin(gw.url).funded(["m"])
    status, headers, _ = await _call(gw, key, {**CHAT, "stream": stream})
    assert status == 200
    _check_headers(headers)
    assert headers["content-type"].startswith("text/event-stream" if stream else "application/json")


async def test_an_upstream_error_keeps_its_retry_hints(
    make_gateway: Callable[..., Proc], upstream: Upstream
) -> None:
    """An upstream's 429 passes through with `retry-after` and `x-should-retry` (the OpenAI
    SDKs act on both), and without the upstream's spend or address."""
    gw = make_gateway([_model(upstream)])
    _, key = Admin(gw.url).funded(["m"])
    status, headers, body = await _call(gw, key, CHAT, {"x-test-status": "429"})
    assert status == 429, body
    assert headers["retry-after"] == "7"
    assert headers["x-should-retry"] == "true"
    _check_headers(headers)


async def test_the_allowlist_is_configurable(
    make_gateway: Callable[..., Proc], upstream: Upstream
) -> None:
    """`proxy.response_headers` replaces the list (a `*` suffix is a prefix); content-type
    always passes, the gateway's own headers never come from the upstream."""
    gw = make_gateway(
        [_model(upstream)], proxy={"response_headers": ["x-litellm-*", "X-Ratelimit-*"]}
    )
    _, key = Admin(gw.url).funded(["m"])
    status, headers, _ = await _call(gw, key, CHAT)
    assert status == 200
    assert headers["x-litellm-key-spend"] == "12.345"
    assert headers["x-litellm-call-id"] == "abc"
    assert "openai-processing-ms" not in headers
    assert "cache-control" not in headers
    assert headers["content-type"].startswith("application/json")
    assert headers["x-ratelimit-limit-requests"] == "600"
    assert headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    "content_type",
    [None, "application/x-www-form-urlencoded", "text/plain", "application/json; charset=utf-8"],
    ids=["none", "form", "text", "json-charset"],
)
async def test_requests_go_upstream_as_json_with_a_uuid_request_id(
    make_gateway: Callable[..., Proc], upstream: Upstream, content_type: str | None
) -> None:
    """Whatever the client labelled its JSON (curl without -H says form-urlencoded), the
    upstream is told `application/json` (LiteLLM's proxy answers 400 otherwise), and the
    request id it gets is a UUID (llama-cpp-python's server refuses anything else) with the
    same 32 digits as the id the client gets."""
    gw = make_gateway([_model(upstream)])
    _, key = Admin(gw.url).funded(["m"])
    headers = {"Content-Type": content_type} if content_type else {"Content-Type": ""}
    status, answer_headers, body = await _call(gw, key, CHAT, headers)
    assert status == 200, body
    sent = {k.lower(): v for k, v in upstream.seen[-1]["headers"].items()}
    assert sent["content-type"] == "application/json"
    upstream_id = uuid.UUID(sent["x-request-id"])
    assert str(upstream_id) == sent["x-request-id"]  # the canonical form
    assert upstream_id.version == 4
    assert upstream_id.hex == answer_headers["x-request-id"].removeprefix("req_")


@pytest.mark.parametrize("bad", ["x litellm", "x-ok*more", "", "é"])
def test_bad_header_names_are_refused_at_their_path(bad: str) -> None:
    with pytest.raises(ConfigError, match=r"proxy\.response_headers"):
        parse_settings({"proxy": {"response_headers": ["cache-control", bad]}}, "t")
