"""JSON shapes the admin API answers with: amounts as decimal strings, times as ISO 8601."""

from __future__ import annotations

from typing import Any

from gateway.config.schema import Settings
from gateway.ledger import AccountRecord
from gateway.money import format_micros
from gateway.timefmt import iso_ms

__all__ = ["USAGE_FIELDS", "account_view", "csv_row", "usage_view"]

USAGE_FIELDS = (
    "id",
    "request_id",
    "time",
    "kind",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "usage_source",
    "status",
    "stream",
    "gateway_prompt_tokens",
    "gateway_completion_tokens",
    "key_id",
    "channel",
    "event",
)
_INT_FIELDS = (
    "prompt_tokens",
    "completion_tokens",
    "gateway_prompt_tokens",
    "gateway_completion_tokens",
)


def account_view(account: AccountRecord, settings: Settings) -> dict[str, Any]:
    """SPEC section 6's account answer."""
    grace_ends = retention_ends = None
    if account.arrears_since is not None:
        grace_ends = account.arrears_since + int(settings.billing.grace_period * 1000)
        retention_ends = grace_ends + int(settings.billing.retention_period * 1000)
    return {
        "id": account.id,
        "name": account.name,
        "balance": format_micros(account.balance),
        "held": format_micros(account.held),
        "available": format_micros(account.balance - account.held),
        "currency": settings.billing.currency,
        "state": account.state,
        "period": account.period or None,
        "arrears_since": iso_ms(account.arrears_since),
        "grace_ends_at": iso_ms(grace_ends),
        "retention_ends_at": iso_ms(retention_ends),
        "subscriptions": list(account.subscriptions),
        "created_at": iso_ms(account.created_at),
    }


def usage_view(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """One usage record as the API shows it."""
    out: dict[str, Any] = {"id": entry_id}
    out["request_id"] = fields.get("request_id")
    out["time"] = iso_ms(int(fields["time"])) if fields.get("time") else None
    out["kind"] = fields.get("kind")
    out["model"] = fields.get("model")
    for name in _INT_FIELDS:
        value = fields.get(name)
        out[name] = int(value) if value not in (None, "") else None
    out["cost"] = format_micros(int(fields.get("cost", "0")))
    out["usage_source"] = fields.get("usage_source")
    out["status"] = fields.get("status")
    out["stream"] = fields.get("stream") == "1"
    out["key_id"] = fields.get("key_id") or None
    out["channel"] = fields.get("channel") or None
    out["event"] = fields.get("event") or None
    return {name: out.get(name) for name in USAGE_FIELDS}


def csv_row(record: dict[str, Any]) -> dict[str, str]:
    """A JSON view's values as CSV cells, written as JSON writes them: `true` / `false`,
    integers in digits, strings as they are, and null as an empty cell (Python's `str()` would
    print `False` and `None`)."""
    return {name: _csv_cell(value) for name, value in record.items()}


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
