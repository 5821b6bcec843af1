"""GET /v1/models and /v1/models/{model}: the configured models, in OpenAI's shape."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.errors import ModelNotFound
from gateway.keys import CONFIG
from gateway.state import Snapshot

__all__ = ["routes"]


def _model_object(name: str, snapshot: Snapshot) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": snapshot.loaded_at, "owned_by": "gateway"}


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models"""
    snapshot = request.app[CONFIG].snapshot
    data = [_model_object(m.name, snapshot) for m in snapshot.settings.models]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}"""
    snapshot = request.app[CONFIG].snapshot
    name = request.match_info["model"]
    if snapshot.settings.model(name) is None:
        raise ModelNotFound(f"the model '{name}' does not exist", param="model")
    return _json(_model_object(name, snapshot))


routes = [
    web.get("/v1/models", list_models),
    web.get("/v1/models/{model:.+}", get_model),
]
