"""What every admin handler uses: JSON in and out, the account named in the path, and the
one way a body that fails validation is answered (400, naming the field)."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.api.body import read_body
from gateway.errors import AccountNotFound, InvalidRequest
from gateway.keys import CONFIG
from gateway.ledger import AccountRecord, Ledger
from gateway.ledger.keys import valid_account_id

__all__ = [
    "account_id_param",
    "existing_account",
    "invalid_body",
    "json_body",
    "json_response",
]


def json_response(
    data: Any, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        status=status, body=orjson.dumps(data), content_type="application/json", headers=headers
    )


async def json_body(request: web.Request, optional: bool = False) -> dict[str, Any]:
    """The request's JSON object; with `optional`, an empty body reads as `{}`."""
    server = request.config_dict[CONFIG].snapshot.settings.server
    # Bounded in size and in time as the data plane's are: a slow sender holds no handler.
    raw = await read_body(request, server.max_body_bytes, server.read_timeout)
    if optional and not raw.strip():
        return {}
    try:
        data = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidRequest("request body must be a JSON object")
    return data


def invalid_body(exc: ValidationError) -> InvalidRequest:
    """A body pydantic refused, as a 400 naming its first bad field."""
    first = exc.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or None
    message = str(first["msg"]).removeprefix("Value error, ")
    return InvalidRequest(f"{path}: {message}", param=path)


def account_id_param(request: web.Request) -> str:
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id):
        raise AccountNotFound(f"no account '{account_id}'")
    return account_id


async def existing_account(ledger: Ledger, account_id: str) -> AccountRecord:
    account = await ledger.get_account(account_id)
    if account is None:
        raise AccountNotFound(f"no account '{account_id}'")
    return account
