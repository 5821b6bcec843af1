"""The OpenAI-compatible model calls: find the model, forward, relay the answer."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.api.body import parse_call_body, read_body
from gateway.errors import ModelNotFound
from gateway.keys import CONFIG, HTTP, REQUEST_ID
from gateway.proxy.forward import open_upstream, relay
from gateway.proxy.routing import Upstream

__all__ = ["routes"]


def _body_for(body: bytes, payload: dict[str, Any], public_name: str) -> Any:
    """Bytes to send each upstream: the client's own, unless the upstream names the model
    differently (then the one field changes and the rest is re-encoded as it was)."""
    renamed: dict[str, bytes] = {}

    def for_upstream(upstream: Upstream) -> bytes:
        if upstream.model == public_name:
            return body
        cached = renamed.get(upstream.model)
        if cached is None:
            cached = renamed[upstream.model] = orjson.dumps({**payload, "model": upstream.model})
        return cached

    return for_upstream


async def _forward(request: web.Request, path: str) -> web.StreamResponse:
    snapshot = request.app[CONFIG].snapshot
    settings = snapshot.settings
    body = await read_body(request, settings.server.max_body_bytes)
    payload = parse_call_body(body)
    name = payload["model"]
    route = snapshot.routing.get(name)
    if route is None:
        raise ModelNotFound(f"the model '{name}' does not exist", param="model")
    timeouts = settings.proxy.timeouts
    call = await open_upstream(
        request.app[HTTP],
        route.candidates(),
        path,
        _body_for(body, payload, name),
        request.headers,
        request[REQUEST_ID],
        timeouts,
    )
    response, _outcome = await relay(request, call, timeouts)
    return response


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    return await _forward(request, "/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    return await _forward(request, "/completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings"""
    return await _forward(request, "/embeddings")


routes = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.post("/v1/embeddings", embeddings),
]
