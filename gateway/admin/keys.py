"""Admin handlers of an account's API keys: made, listed with their spend, changed, rotated,
revoked.

A key's settings (accounts.key_settings) are kept twice in the store, written together by one
script: as public metadata, which these handlers show, and as the limits admission enforces.
Its spend in the current budget period and its open holds are read by the same rule admission
applies (ledger.Ledger.key_spend), so what is shown is what the next call is checked against.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.accounts.apikeys import KEY_PREFIX, new_api_key
from gateway.accounts.key_settings import KeyBudget, KeySettings, rotation_grace_ms
from gateway.admin.common import (
    account_id_param,
    existing_account,
    invalid_body,
    json_body,
    json_response,
)
from gateway.errors import AccountNotFound, InvalidRequest, KeyRevoked, NotFound
from gateway.keys import CONFIG, LEDGER
from gateway.ledger import KeySpend, Ledger
from gateway.money import format_micros
from gateway.timefmt import iso_ms, now_ms

__all__ = ["key_routes", "keys_of", "new_key", "parse_settings", "revoke"]

# The metadata fields that are not settings: set by the gateway, never by a request.
_OWN_FIELDS = ("id", "prefix", "created_at", "revoked_at", "rotated_at", "previous_valid_until")


def parse_settings(request: web.Request, data: dict[str, Any]) -> KeySettings:
    """A body's key settings, checked against the configured models; 400 naming a bad one."""
    try:
        settings = KeySettings.parse(data)
    except ValidationError as exc:
        raise invalid_body(exc) from None
    config = request.config_dict[CONFIG].snapshot.settings
    for model in settings.models or ():
        if config.model(model) is None:
            raise InvalidRequest(f"models: no model '{model}' is configured", param="models")
    return settings


def _view(meta: dict[str, Any], spend: KeySpend | None) -> dict[str, Any]:
    """A key as the admin API shows it: its metadata and where its budget stands."""
    if spend is None:
        return meta
    budget = meta.get("budget")
    remaining = None
    if budget is not None:
        left = KeyBudget.model_validate(budget).micros()
        remaining = format_micros(max(0, left - spend.spent - spend.held))
    return {
        **meta,
        "spend": {
            "spent": format_micros(spend.spent),
            "held": format_micros(spend.held),
            "remaining": remaining,
            "period_start": iso_ms(spend.period_start_ms) if spend.period_start_ms else None,
            "period_end": None if spend.period_end_ms is None else iso_ms(spend.period_end_ms),
            "spent_total": format_micros(spend.total),
        },
    }


async def _meta(ledger: Ledger, account_id: str, key_id: str) -> dict[str, Any]:
    metas = await ledger.list_api_keys(account_id)
    if key_id not in metas:
        raise NotFound(f"no key '{key_id}' on account '{account_id}'", param="key_id")
    meta: dict[str, Any] = orjson.loads(metas[key_id])
    return meta


def _written(outcome: str, account_id: str, key_id: str) -> None:
    if outcome == "account_not_found":
        raise AccountNotFound(f"no account '{account_id}'")
    if outcome == "key_not_found":
        raise NotFound(f"no key '{key_id}' on account '{account_id}'", param="key_id")
    if outcome == "key_revoked":
        raise KeyRevoked(f"key '{key_id}' is revoked; create a new one")


async def new_key(
    ledger: Ledger, account_id: str, settings: KeySettings
) -> tuple[dict[str, Any], str]:
    """Make a key with `settings`: its metadata and its secret (to be shown once)."""
    key = new_api_key(account_id)
    meta = {
        "id": key.key_id,
        "prefix": f"{KEY_PREFIX}{account_id}.{key.key_id}",
        **settings.public(),
        "created_at": iso_ms(now_ms()),
        "revoked_at": None,
    }
    outcome = await ledger.write_key(
        account_id, key.key_id, orjson.dumps(meta), settings.limits(), key.key_hash
    )
    _written(outcome, account_id, key.key_id)
    return meta, key.secret


async def create_key(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/keys {name?, budget?, expires_at?, models?, rate_limits?}
    -> 201 with the secret, shown this once."""
    account_id = account_id_param(request)
    settings = parse_settings(request, await json_body(request, optional=True))
    meta, secret = await new_key(request.config_dict[LEDGER], account_id, settings)
    return json_response({**meta, "key": secret}, 201)


async def keys_of(ledger: Ledger, account_id: str) -> list[dict[str, Any]]:
    """The account's keys as the admin API shows them, oldest first."""
    metas = [orjson.loads(meta) for meta in (await ledger.list_api_keys(account_id)).values()]
    metas.sort(key=lambda k: (k["created_at"], k["id"]))
    spends = await ledger.key_spend(account_id, [m["id"] for m in metas], now_ms())
    return [_view(m, spends.get(m["id"])) for m in metas]


async def list_keys(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/keys: each key's metadata and spend, never a secret."""
    account_id = account_id_param(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    return json_response({"data": await keys_of(ledger, account_id)})


async def get_key(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/keys/{key_id}"""
    account_id = account_id_param(request)
    key_id = request.match_info["key_id"]
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    meta = await _meta(ledger, account_id, key_id)
    spends = await ledger.key_spend(account_id, [key_id], now_ms())
    return json_response(_view(meta, spends[key_id]))


async def update_key(request: web.Request) -> web.Response:
    """PATCH /admin/accounts/{id}/keys/{key_id}: the settings given replace the key's (null
    clears one); enforced from the next admission on, on every instance."""
    account_id = account_id_param(request)
    key_id = request.match_info["key_id"]
    patch = await json_body(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    meta = await _meta(ledger, account_id, key_id)
    own = {name: meta.get(name) for name in _OWN_FIELDS}
    current = KeySettings.parse({k: v for k, v in meta.items() if k not in _OWN_FIELDS})
    settings = parse_settings(request, {**current.public(), **patch})
    meta = {**own, **settings.public()}
    _written(
        await ledger.write_key(account_id, key_id, orjson.dumps(meta), settings.limits()),
        account_id,
        key_id,
    )
    spends = await ledger.key_spend(account_id, [key_id], now_ms())
    return json_response(_view(meta, spends[key_id]))


async def rotate_key(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/keys/{key_id}/rotate {grace?: "1h"} -> a new secret for the
    key (shown this once); the previous one keeps working for `grace`, then is refused on
    every instance. Budget, spend and usage stay with the key."""
    account_id = account_id_param(request)
    key_id = request.match_info["key_id"]
    data = await json_body(request, optional=True)
    unknown = sorted(set(data) - {"grace"})
    if unknown:
        raise InvalidRequest(f"{unknown[0]}: Extra inputs are not permitted", param=unknown[0])
    try:
        grace_ms = rotation_grace_ms(data.get("grace"))
    except (TypeError, ValueError) as exc:
        raise InvalidRequest(f"grace: {exc}", param="grace") from None
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    meta = await _meta(ledger, account_id, key_id)
    now = now_ms()
    until = now + grace_ms if grace_ms > 0 else None
    meta = {
        **meta,
        "rotated_at": iso_ms(now),
        "previous_valid_until": None if until is None else iso_ms(until),
    }
    key = new_api_key(account_id, key_id)
    outcome = await ledger.write_key(
        account_id, key_id, orjson.dumps(meta), None, key.key_hash, until
    )
    _written(outcome, account_id, key_id)
    return json_response({**meta, "key": key.secret})


async def revoke_key(request: web.Request) -> web.Response:
    """DELETE /admin/accounts/{id}/keys/{key_id} -> 204; refused everywhere from then on (the
    previous secret of a rotation too)."""
    account_id = account_id_param(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    await revoke(ledger, account_id, request.match_info["key_id"])
    return web.Response(status=204)


async def revoke(ledger: Ledger, account_id: str, key_id: str) -> None:
    """Revoke the key (404 if the account has none of that id)."""
    meta = await _meta(ledger, account_id, key_id)
    if meta.get("revoked_at") is None:
        meta["revoked_at"] = iso_ms(now_ms())
    await ledger.revoke_api_key(account_id, key_id, orjson.dumps(meta))


key_routes = [
    web.post("/accounts/{account_id}/keys", create_key),
    web.get("/accounts/{account_id}/keys", list_keys),
    web.get("/accounts/{account_id}/keys/{key_id}", get_key),
    web.patch("/accounts/{account_id}/keys/{key_id}", update_key),
    web.post("/accounts/{account_id}/keys/{key_id}/rotate", rotate_key),
    web.delete("/accounts/{account_id}/keys/{key_id}", revoke_key),
]
