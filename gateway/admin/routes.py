"""Admin handlers (SPEC section 6): accounts, top-ups, API keys, subscriptions, usage."""

from __future__ import annotations

import csv
import io
import re
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from gateway.accounts.notifier import load_preferences
from gateway.accounts.preferences import NotificationPreferences
from gateway.admin.actions import subscribe_to, top_up
from gateway.admin.common import (
    account_id_param,
    existing_account,
    invalid_body,
    json_body,
    json_response,
)
from gateway.admin.keys import key_routes
from gateway.admin.views import USAGE_FIELDS, account_view, csv_row, prices_view
from gateway.config.types import check_rate_limit
from gateway.errors import (
    AccountExists,
    InvalidRequest,
)
from gateway.history.reader import usage_page
from gateway.history.reports import statement, summary
from gateway.keys import CONFIG, HISTORY, LEDGER, RELOADER
from gateway.ledger.keys import ACCOUNT_CURSOR, ID_RULE, valid_id
from gateway.money import format_micros
from gateway.ratelimit import rule_spec
from gateway.timefmt import iso_ms, now_ms, parse_iso_ms

__all__ = ["routes"]

MAX_USAGE_PAGE = 1000
ACCOUNT_STATES = ("active", "frozen", "cleared")
MAX_STREAM_PART = 2**64 - 1  # each half of a Redis stream id is an unsigned 64-bit number


async def create_account(request: web.Request) -> web.Response:
    """POST /admin/accounts {"id", "name"?} -> 201, or 409 when the id is taken."""
    data = await json_body(request)
    account_id, name = data.get("id"), data.get("name", "")
    if not valid_id(account_id):
        raise InvalidRequest(f"id must be {ID_RULE}", param="id")
    if not isinstance(name, str) or len(name) > 200 or not name.isprintable():
        raise InvalidRequest(
            "name must be a string of at most 200 printable characters", param="name"
        )
    ledger = request.config_dict[LEDGER]
    if not await ledger.create_account(account_id, name, now_ms()):
        raise AccountExists(f"account '{account_id}' already exists")
    account = await existing_account(ledger, account_id)
    return json_response(account_view(account, request.config_dict[CONFIG].snapshot.settings), 201)


async def get_account(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}"""
    ledger = request.config_dict[LEDGER]
    account = await existing_account(ledger, account_id_param(request))
    return json_response(account_view(account, request.config_dict[CONFIG].snapshot.settings))


async def list_accounts(request: web.Request) -> web.Response:
    """GET /admin/accounts?limit=&after=&state= -> {"data": [accounts], "next"}: every account,
    oldest first (by creation time, then id), each as GET /admin/accounts/{id} shows it."""
    limit = _limit(request)
    after = request.query.get("after")
    if after is not None and ACCOUNT_CURSOR.fullmatch(after) is None:
        raise InvalidRequest("after must be the 'next' cursor of a previous page", param="after")
    state = request.query.get("state")
    if state is not None and state not in ACCOUNT_STATES:
        raise InvalidRequest(f"state must be one of {', '.join(ACCOUNT_STATES)}", param="state")
    accounts, cursor = await request.config_dict[LEDGER].list_accounts(limit, after, state)
    settings = request.config_dict[CONFIG].snapshot.settings
    return json_response({"data": [account_view(a, settings) for a in accounts], "next": cursor})


async def create_topup(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/topups {"amount"}: idempotent under `Idempotency-Key`."""
    account_id = account_id_param(request)
    data = await json_body(request)
    idem_key = request.headers.get("Idempotency-Key")
    result = await top_up(request.config_dict[LEDGER], account_id, data, idem_key)
    answer = {
        "id": result.id,
        "account": account_id,
        "amount": format_micros(result.amount),
        "balance": format_micros(result.balance),
        "created_at": iso_ms(result.created_at),
    }
    headers = {"Idempotent-Replayed": "true"} if result.code == "replay" else None
    return json_response(answer, 201, headers)


async def subscribe(request: web.Request) -> web.Response:
    """POST /admin/accounts/{id}/subscriptions {"model"} -> 201 (200 if already)."""
    account_id = account_id_param(request)
    data = await json_body(request)
    model = data.get("model")
    settings = request.config_dict[CONFIG].snapshot.settings
    outcome = await subscribe_to(request.config_dict[LEDGER], settings, account_id, model)
    return json_response(
        {"account": account_id, "model": model}, 201 if outcome == "created" else 200
    )


async def unsubscribe(request: web.Request) -> web.Response:
    """DELETE /admin/accounts/{id}/subscriptions/{model} -> 204."""
    account_id = account_id_param(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    await ledger.unsubscribe(account_id, request.match_info["model"])
    return web.Response(status=204)


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    if not re.fullmatch(r"[0-9]{1,4}", raw) or not 1 <= int(raw) <= MAX_USAGE_PAGE:
        raise InvalidRequest(f"limit must be an integer from 1 to {MAX_USAGE_PAGE}", param="limit")
    return int(raw)


def _after(request: web.Request) -> str | None:
    after = request.query.get("after")
    if after is None:
        return None
    match = re.fullmatch(r"([0-9]{1,20})-([0-9]{1,20})", after)
    if match is None or max(int(match.group(1)), int(match.group(2))) > MAX_STREAM_PART:
        raise InvalidRequest("after must be the 'next' cursor of a previous page", param="after")
    return after


def _time(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return parse_iso_ms(raw)
    except ValueError:
        raise InvalidRequest(
            f"{name} must be an ISO 8601 time such as 2026-12-01T00:00:00Z", param=name
        ) from None


async def usage(request: web.Request) -> web.StreamResponse:
    """GET /admin/accounts/{id}/usage?limit=&after=&since=&until= -> {"data", "next"}, across
    the store and the history database (gateway/history/reader.py); CSV on request."""
    account_id = account_id_param(request)
    limit, after = _limit(request), _after(request)
    since, until = _time(request, "since"), _time(request, "until")
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    records, cursor = await usage_page(
        ledger,
        request.config_dict[HISTORY],
        account_id,
        after,
        limit,
        0 if since is None else since,
        2**62 if until is None else until,
    )
    if "text/csv" in request.headers.get("Accept", ""):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=USAGE_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(csv_row(record) for record in records)
        headers = {"X-Next-Cursor": cursor} if cursor else None
        return web.Response(text=buffer.getvalue(), content_type="text/csv", headers=headers)
    return json_response({"data": records, "next": cursor})


async def usage_summary(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/usage/summary?group_by=day|model|key&since=&until="""
    account_id = account_id_param(request)
    group_by = request.query.get("group_by", "day")
    if group_by not in ("day", "model", "key"):
        raise InvalidRequest("group_by must be day, model or key", param="group_by")
    since, until = _time(request, "since"), _time(request, "until")
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    body = await summary(
        ledger,
        request.config_dict[HISTORY],
        account_id,
        group_by,  # type: ignore[arg-type]
        0 if since is None else since,
        2**62 if until is None else until,
    )
    body["since"], body["until"] = iso_ms(since), iso_ms(until)
    return json_response(body)


_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")
STATEMENT_FIELDS = (
    "line",
    "name",
    "kind",
    "time",
    "calls",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "amount",
)


async def account_statement(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/statements/{YYYY-MM}: JSON, or CSV with Accept: text/csv."""
    account_id = account_id_param(request)
    month = request.match_info["month"]
    if not _MONTH.fullmatch(month):
        raise InvalidRequest("the month must be written YYYY-MM, such as 2026-11", param="month")
    ledger = request.config_dict[LEDGER]
    record = await existing_account(ledger, account_id)
    body = await statement(ledger, request.config_dict[HISTORY], account_id, month, record.balance)
    if "text/csv" not in request.headers.get("Accept", ""):
        return json_response(body)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=STATEMENT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerow({"line": "opening_balance", "amount": body["opening_balance"]})
    for topup in body["topups"]:
        writer.writerow(
            {"line": "topup", "name": topup["id"], "time": topup["time"], "amount": topup["amount"]}
        )
    for line in body["usage"]:
        writer.writerow(
            {
                "line": "usage",
                "name": line["model"],
                "kind": line["kind"],
                **{k: line[k] for k in STATEMENT_FIELDS[4:10]},
                "amount": line["cost"],
            }
        )
    notes = body["notifications"]
    writer.writerow({"line": "notifications", "calls": notes["count"], "amount": notes["cost"]})
    writer.writerow({"line": "closing_balance", "amount": body["closing_balance"]})
    return web.Response(text=buffer.getvalue(), content_type="text/csv")


def _limit_value(data: dict[str, Any], kind: str) -> str:
    value = data.get(kind)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidRequest(
            f"{kind} must be a rate limit such as '600/minute', or null", param=kind
        )
    try:
        return check_rate_limit(value)  # the config loader's own rule
    except ValueError as exc:
        raise InvalidRequest(f"{kind}: {exc}", param=kind) from None


async def put_rate_limits(request: web.Request) -> web.Response:
    """PUT /admin/accounts/{id}/rate_limits {"requests", "tokens"}: this account's own limits;
    null returns a limit to the configured default."""
    account_id = account_id_param(request)
    data = await json_body(request)
    unknown = set(data) - {"requests", "tokens"}
    if unknown:
        raise InvalidRequest(f"unknown field(s): {', '.join(sorted(unknown))}")
    requests, tokens = _limit_value(data, "requests"), _limit_value(data, "tokens")
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    specs = (rule_spec(requests), rule_spec(tokens))
    await ledger.set_rate_limits(account_id, requests, tokens, specs)
    return await get_rate_limits(request)


async def get_rate_limits(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/rate_limits: the account's own limits and those in force."""
    account_id = account_id_param(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    requests, tokens = await ledger.get_rate_limits(account_id)
    defaults = request.config_dict[CONFIG].snapshot.settings.rate_limits
    return json_response(
        {
            "account": {"requests": requests or None, "tokens": tokens or None},
            "effective": {
                "requests": requests or defaults.requests,
                "tokens": tokens or defaults.tokens,
            },
        }
    )


async def put_notifications(request: web.Request) -> web.Response:
    """PUT /admin/accounts/{id}/notifications: the account's channels and chosen events."""
    account_id = account_id_param(request)
    data = await json_body(request)
    try:
        prefs = NotificationPreferences.model_validate(data)
    except ValidationError as exc:
        raise invalid_body(exc) from None
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    await ledger.set_notifications(
        account_id, prefs.model_dump_json().encode(), prefs.low_balance_threshold
    )
    return json_response(prefs.public())


async def get_notifications(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/notifications"""
    account_id = account_id_param(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    prefs = await load_preferences(ledger, account_id)
    return json_response((prefs or NotificationPreferences()).public())


async def dead_letters(request: web.Request) -> web.Response:
    """GET /admin/accounts/{id}/dead-letters: deliveries that kept failing."""
    account_id = account_id_param(request)
    limit = _limit(request)
    ledger = request.config_dict[LEDGER]
    await existing_account(ledger, account_id)
    data = [
        {
            "id": entry_id,
            "event": orjson.loads(fields["event"]),
            "channel": fields.get("channel"),
            "target": fields.get("target"),
            "error": fields.get("error"),
            "attempts": int(fields.get("attempts", "0")),
            "time": iso_ms(int(fields["time"])) if fields.get("time") else None,
        }
        for entry_id, fields in await ledger.dead_letters(account_id, limit)
    ]
    return json_response({"data": data})


async def prices(request: web.Request) -> web.Response:
    """GET /admin/prices: every model's current, scheduled and replaced price sheets."""
    settings = request.config_dict[CONFIG].snapshot.settings
    return json_response(prices_view(settings, now_ms()))


async def reload_config(request: web.Request) -> web.Response:
    """POST /admin/reload: re-read the config file now; 400 with the problems if invalid,
    `reloaded: false` when the file says what the running config says."""
    outcome = await request.config_dict[RELOADER].reload_outcome("admin")
    if outcome.problems:
        raise InvalidRequest(
            "config refused; the old config keeps serving: " + "; ".join(outcome.problems)
        )
    settings = request.config_dict[CONFIG].snapshot.settings
    return json_response({"reloaded": outcome.changed, "models": [m.name for m in settings.models]})


routes = [
    web.post("/reload", reload_config),
    web.get("/prices", prices),
    web.post("/accounts", create_account),
    web.get("/accounts", list_accounts),
    web.get("/accounts/{account_id}", get_account),
    web.post("/accounts/{account_id}/topups", create_topup),
    *key_routes,
    web.post("/accounts/{account_id}/subscriptions", subscribe),
    web.delete("/accounts/{account_id}/subscriptions/{model:.+}", unsubscribe),
    web.get("/accounts/{account_id}/usage", usage),
    web.get("/accounts/{account_id}/usage/summary", usage_summary),
    web.get("/accounts/{account_id}/statements/{month}", account_statement),
    web.put("/accounts/{account_id}/notifications", put_notifications),
    web.get("/accounts/{account_id}/notifications", get_notifications),
    web.get("/accounts/{account_id}/dead-letters", dead_letters),
    web.put("/accounts/{account_id}/rate_limits", put_rate_limits),
    web.get("/accounts/{account_id}/rate_limits", get_rate_limits),
]
