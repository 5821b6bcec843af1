"""GET /v1/models and /v1/models/{model}: the models the key's account may call."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.api.inference import require_key
from gateway.errors import InvalidApiKey, ModelNotFound, ModelNotSubscribed
from gateway.keys import CONFIG, LEDGER
from gateway.state import Snapshot

__all__ = ["routes"]


def _model_object(name: str, snapshot: Snapshot) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": snapshot.loaded_at, "owned_by": "gateway"}


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def _subscriptions(request: web.Request) -> tuple[str, ...]:
    settings = request.app[CONFIG].snapshot.settings
    if not settings.billing.metering:
        return tuple(m.name for m in settings.models)  # a pure proxy serves every model
    key = require_key(request)
    found = await request.app[LEDGER].authenticate(key.account_id, key.key_id, key.key_hash)
    if found is None:
        raise InvalidApiKey("Incorrect API key provided")
    return found[1]


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: configured models the account is subscribed to."""
    subscribed = set(await _subscriptions(request))
    snapshot = request.app[CONFIG].snapshot
    data = [
        _model_object(m.name, snapshot) for m in snapshot.settings.models if m.name in subscribed
    ]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}"""
    subscribed = await _subscriptions(request)
    snapshot = request.app[CONFIG].snapshot
    name = request.match_info["model"]
    if snapshot.settings.model(name) is None:
        raise ModelNotFound(f"the model '{name}' does not exist", param="model")
    if name not in subscribed:
        raise ModelNotSubscribed(f"the account is not subscribed to model '{name}'")
    return _json(_model_object(name, snapshot))


routes = [
    web.get("/v1/models", list_models),
    web.get("/v1/models/{model:.+}", get_model),
]
