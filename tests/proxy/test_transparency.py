"""Through the gateway, a client gets the very bytes the upstream sent, streamed or not."""

from __future__ import annotations

import re

import aiohttp
import orjson
import pytest

from tests.conftest import UPSTREAM_KEY
from tests.procs import Proc

CHAT = {
    "model": "mock-model",
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Say something about the sea.", "name": "ann"},
    ],
    "max_tokens": 12,
    "temperature": 0.2,
}


async def _post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, str, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=body, headers=headers) as resp,
    ):
        return resp.status, resp.headers.get("Content-Type", ""), await resp.read()


def _direct_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {UPSTREAM_KEY}", "Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/chat/completions", {**CHAT, "stream": True}),
        (
            "/v1/chat/completions",
            {**CHAT, "stream": True, "stream_options": {"include_usage": True}},
        ),
        ("/v1/completions", {"model": "mock-model", "prompt": "Once upon a time", "max_tokens": 9}),
        ("/v1/completions", {"model": "mock-model", "prompt": ["a", "b"], "stream": True}),
        ("/v1/embeddings", {"model": "mock-model", "input": ["alpha", "beta gamma"]}),
    ],
    ids=["chat", "chat-stream", "chat-stream-usage", "completions", "completions-stream", "embed"],
)
async def test_bytes_equal_direct_upstream(
    gateway: Proc, mock_a: Proc, auth: dict[str, str], path: str, payload: dict[str, object]
) -> None:
    """Status, content type and body bytes through the gateway equal a direct upstream call,
    but for the call's cost, added as the last member of a stream's usage object when the
    client asked for usage (README: "What each call cost, on the answer")."""
    body = orjson.dumps(payload)
    direct = await _post(mock_a.url + path, body, _direct_headers())
    via = await _post(gateway.url + path, body, {"Content-Type": "application/json", **auth})
    assert direct[0] == 200
    costs = re.findall(rb',"cost":"[0-9]+\.[0-9]{6}"}', via[2])
    options = payload.get("stream_options")
    assert len(costs) == (1 if isinstance(options, dict) and options["include_usage"] else 0)
    without = via[2].replace(costs[0], b"}", 1) if costs else via[2]
    assert (via[0], via[1], without) == direct
    if payload.get("stream"):
        assert via[2].endswith(b"data: [DONE]\n\n")


async def test_body_reaches_upstream_unchanged(
    gateway: Proc, mock_a: Proc, auth: dict[str, str]
) -> None:
    """The upstream receives the client's body byte for byte when the model names agree."""
    body = (
        b'{"model": "mock-model",   "messages": [{"role": "user", "content": "hi"}],'
        b' "max_tokens": 2}'
    )
    status, _, _ = await _post(gateway.url + "/v1/chat/completions", body, auth)
    assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.get(mock_a.url + "/debug/last-request") as r,
    ):
        seen = await r.json()
    assert seen["body"] == body.decode()
    assert seen["path"] == "/v1/chat/completions"


async def test_model_name_is_mapped_to_the_upstreams(
    gateway: Proc, mock_a: Proc, auth: dict[str, str]
) -> None:
    """A model whose upstream uses another name gets that name, and nothing else changes."""
    payload = {"model": "mapped", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    status, _, answer = await _post(
        gateway.url + "/v1/chat/completions", orjson.dumps(payload), auth
    )
    assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.get(mock_a.url + "/debug/last-request") as r,
    ):
        seen = await r.json()
    assert orjson.loads(seen["body"]) == {**payload, "model": "mock-model"}
    assert orjson.loads(answer)["model"] == "mock-model"


async def test_headers_crossing_the_proxy(gateway: Proc, mock_a: Proc, api_key: str) -> None:
    """Hop-by-hop headers are dropped, the client's key is replaced by the upstream's, the
    request id travels upstream, and custom headers pass."""
    headers = {
        "Authorization": f"Bearer {api_key}",
        "Connection": "keep-alive, X-Hop",
        "X-Hop": "per-connection",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "OpenAI-Beta": "assistants=v2",
        "X-Custom": "kept",
    }
    body = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "x"}]})
    async with aiohttp.ClientSession() as session:
        async with session.post(
            gateway.url + "/v1/chat/completions", data=body, headers=headers
        ) as r:
            assert r.status == 200
            request_id = r.headers["x-request-id"]
        async with session.get(mock_a.url + "/debug/last-request") as r:
            seen = {k.lower(): v for k, v in (await r.json())["headers"].items()}
    assert seen["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert api_key not in str(seen)
    for dropped in ("x-hop", "keep-alive", "proxy-authorization", "te"):
        assert dropped not in seen
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["x-custom"] == "kept"
    # The same id, as a UUID (what servers such as llama-cpp-python's accept).
    assert seen["x-request-id"].replace("-", "") == request_id.removeprefix("req_")


async def test_every_answer_carries_a_request_id(gateway: Proc, auth: dict[str, str]) -> None:
    """Success, error, stream, probe and unknown route answers all carry a fresh x-request-id."""
    ids = set()
    async with aiohttp.ClientSession() as session:
        for method, path, body in [
            ("GET", "/healthz", None),
            ("GET", "/v1/models", None),
            ("POST", "/v1/chat/completions", b"{"),
            ("GET", "/no/such/route", None),
            ("POST", "/v1/chat/completions", orjson.dumps({**CHAT, "stream": True})),
        ]:
            async with session.request(method, gateway.url + path, data=body, headers=auth) as r:
                await r.read()
                ids.add(r.headers["x-request-id"])
    assert len(ids) == 5
    assert all(i.startswith("req_") for i in ids)
