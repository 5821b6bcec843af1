"""GET /v1/models and /v1/models/{model}: the models the key's account may call."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway.api.inference import known_key, require_key
from gateway.errors import ModelNotAllowedForKey, ModelNotFound, ModelNotSubscribed
from gateway.keys import CONFIG, LEDGER
from gateway.state import Snapshot

__all__ = ["routes"]


def _model_object(name: str, snapshot: Snapshot) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": snapshot.loaded_at, "owned_by": "gateway"}


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def _subscriptions(
    request: web.Request,
) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
    """The account's subscriptions, and the models the key may call (None: all of them)."""
    settings = request.app[CONFIG].snapshot.settings
    if not settings.billing.metering:
        return tuple(m.name for m in settings.models), None  # a pure proxy serves every model
    _, subscriptions, allowed = await known_key(request.app[LEDGER], require_key(request))
    return subscriptions, allowed


async def list_models(request: web.Request) -> web.Response:
    """GET /v1/models: configured models the account is subscribed to."""
    subscriptions, allowed = await _subscriptions(request)
    # A key with its own model list sees only those of the account's models.
    shown = set(subscriptions if allowed is None else set(subscriptions) & set(allowed))
    snapshot = request.app[CONFIG].snapshot
    data = [_model_object(m.name, snapshot) for m in snapshot.settings.models if m.name in shown]
    return _json({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    """GET /v1/models/{model}"""
    subscribed, allowed = await _subscriptions(request)
    snapshot = request.app[CONFIG].snapshot
    name = request.match_info["model"]
    if snapshot.settings.model(name) is None:
        raise ModelNotFound(f"the model '{name}' does not exist", param="model")
    if allowed is not None and name not in allowed:
        raise ModelNotAllowedForKey(f"this API key may not call model '{name}'")
    if name not in subscribed:
        raise ModelNotSubscribed(f"the account is not subscribed to model '{name}'")
    return _json(_model_object(name, snapshot))


routes = [
    web.get("/v1/models", list_models),
    web.get("/v1/models/{model:.+}", get_model),
]
