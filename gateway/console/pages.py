"""The console's pages: log in and out, the accounts, an account and its top-up form.

Handlers read through the same ledger calls as the admin API and act through the same code
(gateway/admin/actions.py), so a form does exactly what the JSON route does.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
import secrets
from typing import Any

import aiohttp_jinja2
from aiohttp import web

from gateway.accounts.apikeys import ParsedKey, parse_api_key
from gateway.accounts.notifier import load_preferences
from gateway.accounts.preferences import NotificationPreferences
from gateway.admin.actions import subscribe_to, top_up
from gateway.admin.keys import keys_of, new_key, parse_settings, revoke
from gateway.admin.views import account_view, prices_view
from gateway.api.inference import known_key
from gateway.console.overview import SAMPLER
from gateway.console.sessions import COOKIE, Session, Sessions
from gateway.errors import (
    AccountNotFound,
    GatewayError,
    InvalidApiKey,
    InvalidRequest,
    KeyExpired,
)
from gateway.history.reports import statement, summary
from gateway.keys import CONFIG, HISTORY, LEDGER, STORE
from gateway.ledger.keys import ACCOUNT_CURSOR, valid_account_id, valid_id
from gateway.timefmt import iso_ms, now_ms
from gateway.usage_record import UsageRecord

__all__ = ["OPEN_POSTS", "SESSION", "check_csrf", "error_page", "routes", "still_valid"]

SESSION = web.RequestKey("console_session", Session)
PRE_COOKIE = "gw_console_login"  # the login form's CSRF token, before there is a session
OPEN_POSTS = frozenset({"/console/login"})
PAGE_SIZE = 50
SCAN_PAGES = 20  # a state-filtered search reads at most this many pages of ids
CHART_DAYS = 30  # the account page's usage: the last 30 days
RECENT_CALLS = 20
MONTH = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


def _session(request: web.Request) -> Session | None:
    return request.get(SESSION)


def _needs(request: web.Request, operator: bool = False) -> Session:
    """The login, or a redirect to the login page; an owner asking for an operator page is
    refused."""
    session = _session(request)
    if session is None:
        raise web.HTTPSeeOther("/console/login")
    if operator and session.role != "operator":
        raise Forbidden("This page is for operators; you are logged in with an account's key.")
    return session


async def still_valid(request: web.Request, session: Session) -> bool:
    """An owner's login lasts only while the key it was made with works: a revoked or expired
    key ends it at the next page."""
    if session.role != "owner":
        return True
    return await _key_works(
        request, ParsedKey(session.account_id, session.key_id, session.key_hash)
    )


async def _key_works(request: web.Request, key: ParsedKey) -> bool:
    """False for a key the ledger refuses (unknown, revoked, expired); a store that does not
    answer is its own error (503), not a refusal."""
    try:
        await known_key(request.config_dict[LEDGER], key)
    except (InvalidApiKey, KeyExpired):
        return False
    return True


async def check_csrf(request: web.Request) -> None:
    session = _session(request)
    form = await request.post()
    if session is None or not session.csrf_ok(form.get("csrf")):
        raise Forbidden(
            "This form was not sent from a page of this console (its CSRF token is missing or "
            "stale); reload the page and try again."
        )


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return aiohttp_jinja2.render_template(
        "error.html", request, _context(request, message=message), status=status
    )


def _context(request: web.Request, **values: Any) -> dict[str, Any]:
    session = _session(request)
    return {"session": session, "csrf": session.csrf if session else "", **values}


def _cookie(response: web.StreamResponse, request: web.Request, name: str, value: str) -> None:
    ttl = int(request.config_dict[CONFIG].snapshot.settings.console.session_ttl)
    response.set_cookie(
        name,
        value,
        max_age=ttl,
        path="/console",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


async def index(request: web.Request) -> web.StreamResponse:
    session = _needs(request)
    if session.role == "owner":
        raise web.HTTPSeeOther(f"/console/accounts/{session.account_id}")
    raise web.HTTPSeeOther("/console/accounts")


async def login_form(request: web.Request, message: str = "", status: int = 200) -> web.Response:
    token = secrets.token_urlsafe(24)
    response = aiohttp_jinja2.render_template(
        "login.html", request, {"session": None, "csrf": token, "message": message}, status=status
    )
    _cookie(response, request, PRE_COOKIE, token)
    return response


async def login(request: web.Request) -> web.StreamResponse:
    """An admin token logs in an operator; one of an account's API keys, its owner."""
    form = await request.post()
    pre = request.cookies.get(PRE_COOKIE, "")
    given = form.get("csrf")
    if not pre or not isinstance(given, str) or not hmac.compare_digest(given, pre):
        raise Forbidden("This login form was not sent from this console; reload and try again.")
    token = str(form.get("token", "")).strip()
    settings = request.config_dict[CONFIG].snapshot.settings
    admin_token = os.environ.get(settings.server.admin_token_env, "")
    ttl = int(settings.console.session_ttl)
    sessions = Sessions(request.config_dict[STORE])
    if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
        cookie, _ = await sessions.open("operator", "", ttl)
    else:
        key = parse_api_key(f"Bearer {token}")
        if key is None or not await _key_works(request, key):
            return await login_form(
                request, "That is neither the admin token nor an API key this gateway knows.", 401
            )
        cookie, _ = await sessions.open("owner", key.account_id, ttl, key.key_id, key.key_hash)
    response = web.HTTPSeeOther("/console/")
    _cookie(response, request, COOKIE, cookie)
    response.del_cookie(PRE_COOKIE, path="/console")
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    await Sessions(request.config_dict[STORE]).close(request.cookies.get(COOKIE))
    response = web.HTTPSeeOther("/console/login")
    response.del_cookie(COOKIE, path="/console")
    raise response


@aiohttp_jinja2.template("accounts.html")
async def accounts(request: web.Request) -> dict[str, Any]:
    """Accounts whose id starts with `prefix` (in id order), or all (oldest first), in
    `state`, a page at a time."""
    _needs(request, operator=True)
    prefix = request.query.get("prefix", "").strip()
    state = request.query.get("state") or None
    if state not in (None, "active", "frozen", "cleared"):
        state = None
    after = request.query.get("after") or None
    if after is not None and not prefix and ACCOUNT_CURSOR.fullmatch(after) is None:
        after = None
    ledger = request.config_dict[LEDGER]
    settings = request.config_dict[CONFIG].snapshot.settings
    found: list[dict[str, Any]] = []
    if prefix:  # by id, from the account-id index
        if not valid_id(prefix):
            raise InvalidRequest("An id has only letters, digits, '_' and '-'.", param="prefix")
        cursor = after if after and valid_id(after) else None
        for _ in range(SCAN_PAGES):
            ids, cursor = await ledger.ids_by_prefix(prefix, PAGE_SIZE - len(found), cursor)
            records = await asyncio.gather(*(ledger.get_account(i) for i in ids))
            found += [account_view(r, settings) for r in records if r and state in (None, r.state)]
            if cursor is None or len(found) >= PAGE_SIZE:
                break
    else:
        page, cursor = await ledger.list_accounts(PAGE_SIZE, after, state)
        found = [account_view(account, settings) for account in page]
    return _context(
        request, accounts=found, prefix=prefix, state=state or "", next=cursor, after=after
    )


async def account(request: web.Request) -> web.Response:
    return aiohttp_jinja2.render_template("account.html", request, await _account_page(request))


async def _account_page(request: web.Request) -> dict[str, Any]:
    session = _needs(request)
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id) or not session.may_see(account_id):
        raise AccountNotFound("There is no such account for this login.")
    ledger = request.config_dict[LEDGER]
    record = await ledger.get_account(account_id)
    if record is None:
        raise AccountNotFound(f"There is no account '{account_id}'.")
    settings = request.config_dict[CONFIG].snapshot.settings
    until = now_ms() + 1
    since = until - CHART_DAYS * 86_400_000
    reader = request.config_dict[HISTORY]
    by_day = await summary(ledger, reader, account_id, "day", since, until)
    by_model = await summary(ledger, reader, account_id, "model", since, until)
    owner_view = session.role == "owner"
    prefs = await load_preferences(ledger, account_id)
    return _context(
        request,
        account=account_view(record, settings),
        keys=await keys_of(ledger, account_id),
        calls=[
            UsageRecord.from_fields(fields).view(entry_id)
            for entry_id, fields in await ledger.recent_usage(account_id, RECENT_CALLS)
        ],
        notifications=(prefs or NotificationPreferences()).public(),
        dead_letters=[] if owner_view else await ledger.dead_letters(account_id, 20),
        models=[m.name for m in settings.models if m.name not in record.subscriptions],
        created_key=None,
        month=(iso_ms(now_ms()) or "")[:7],
        by_day=by_day,
        by_model=by_model,
        chart_days=CHART_DAYS,
        idempotency_key=secrets.token_hex(16),
        topped_up=request.query.get("topped_up", ""),
    )


async def topup(request: web.Request) -> web.StreamResponse:
    """The top-up form: the admin API's top-up, under the Idempotency-Key the page was given,
    so a second submit of the same page credits nothing more."""
    _needs(request, operator=True)
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id):
        raise AccountNotFound(f"There is no account '{account_id}'.")
    form = await request.post()
    idem = form.get("idempotency_key")
    result = await top_up(
        request.config_dict[LEDGER],
        account_id,
        {"amount": str(form.get("amount", "")).strip()},
        idem if isinstance(idem, str) and valid_id(idem) else None,
    )
    raise web.HTTPSeeOther(f"/console/accounts/{account_id}?topped_up={result.id}")


@aiohttp_jinja2.template("statement.html")
async def account_statement(request: web.Request) -> dict[str, Any]:
    """A month's statement (GET /admin/accounts/{id}/statements/{month}), for an operator or
    the account's owner."""
    session = _needs(request)
    account_id = request.match_info["account_id"]
    month = request.query.get("month") or request.match_info.get("month", "")
    if not valid_account_id(account_id) or not session.may_see(account_id):
        raise AccountNotFound("There is no such account for this login.")
    if not MONTH.fullmatch(month):
        raise InvalidRequest("A month is written YYYY-MM, such as 2026-11.", param="month")
    ledger = request.config_dict[LEDGER]
    record = await ledger.get_account(account_id)
    if record is None:
        raise AccountNotFound(f"There is no account '{account_id}'.")
    reader = request.config_dict[HISTORY]
    body = await statement(ledger, reader, account_id, month, record.balance)
    return _context(request, statement=body, account_id=account_id)


@aiohttp_jinja2.template("overview.html")
async def overview(request: web.Request) -> dict[str, Any]:
    """Calls per second, errors and amount billed per minute, from this instance's metrics."""
    _needs(request, operator=True)
    return _context(request, series=request.config_dict[SAMPLER].series())


@aiohttp_jinja2.template("prices.html")
async def prices(request: web.Request) -> dict[str, Any]:
    """Every model's current, scheduled and replaced price sheets (GET /admin/prices)."""
    _needs(request, operator=True)
    settings = request.config_dict[CONFIG].snapshot.settings
    return _context(request, models=prices_view(settings, now_ms())["data"])


def _operator_account(request: web.Request) -> str:
    _needs(request, operator=True)
    account_id = request.match_info["account_id"]
    if not valid_account_id(account_id):
        raise AccountNotFound(f"There is no account '{account_id}'.")
    return account_id


def _back(account_id: str, anchor: str) -> web.HTTPSeeOther:
    return web.HTTPSeeOther(f"/console/accounts/{account_id}#{anchor}")


async def subscribe(request: web.Request) -> web.StreamResponse:
    account_id = _operator_account(request)
    form = await request.post()
    settings = request.config_dict[CONFIG].snapshot.settings
    await subscribe_to(request.config_dict[LEDGER], settings, account_id, form.get("model"))
    raise _back(account_id, "subscriptions")


async def unsubscribe(request: web.Request) -> web.StreamResponse:
    account_id = _operator_account(request)
    form = await request.post()
    await request.config_dict[LEDGER].unsubscribe(account_id, str(form.get("model", "")))
    raise _back(account_id, "subscriptions")


async def create_key(request: web.Request) -> web.Response:
    """The new-key form: the admin API's key settings; the page that answers shows the secret
    this once."""
    account_id = _operator_account(request)
    form = await request.post()
    data: dict[str, Any] = {"name": str(form.get("name", "")).strip()}
    amount = str(form.get("budget_amount", "")).strip()
    if amount:
        period = str(form.get("budget_period", ""))
        data["budget"] = {"amount": amount, "period": period or None}
    expires = str(form.get("expires_at", "")).strip()
    if expires:
        data["expires_at"] = expires
    models = [str(m) for m in form.getall("models", []) if m]
    if models:
        data["models"] = models
    settings = parse_settings(request, data)
    meta, secret = await new_key(request.config_dict[LEDGER], account_id, settings)
    page = await _account_page(request)
    page["created_key"] = {**meta, "key": secret}
    return aiohttp_jinja2.render_template("account.html", request, page, status=201)


async def revoke_key(request: web.Request) -> web.StreamResponse:
    account_id = _operator_account(request)
    await revoke(request.config_dict[LEDGER], account_id, request.match_info["key_id"])
    raise _back(account_id, "keys")


routes = [
    web.get("/", index),
    web.get("/login", login_form),
    web.post("/login", login),
    web.post("/logout", logout),
    web.get("/accounts", accounts),
    web.get("/overview", overview),
    web.get("/prices", prices),
    web.get("/accounts/{account_id}", account),
    web.get("/accounts/{account_id}/statement", account_statement),
    web.post("/accounts/{account_id}/topups", topup),
    web.post("/accounts/{account_id}/subscriptions", subscribe),
    web.post("/accounts/{account_id}/subscriptions/remove", unsubscribe),
    web.post("/accounts/{account_id}/keys", create_key),
    web.post("/accounts/{account_id}/keys/{key_id}/revoke", revoke_key),
]
