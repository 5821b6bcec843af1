"""JSON shapes the admin API answers with: amounts as decimal strings, times as ISO 8601."""

from __future__ import annotations

from typing import Any

from gateway.config.schema import Settings
from gateway.ledger import AccountRecord
from gateway.money import format_micros
from gateway.pricing import Prices, prices_at, sheet_prices
from gateway.timefmt import iso_ms
from gateway.usage_record import USAGE_FIELDS

__all__ = ["USAGE_FIELDS", "account_view", "csv_row", "prices_view"]


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


def _sheet_view(prices: Prices) -> dict[str, Any]:
    return {
        "version": prices.version,
        "effective_from": iso_ms(prices.effective_from_ms),
        "input_per_million": format_micros(prices.input),
        "output_per_million": format_micros(prices.output),
        "cached_input_per_million": format_micros(prices.cached_input),
        "cache_write_per_million": format_micros(prices.cache_write),
        "reasoning_per_million": format_micros(prices.reasoning),
    }


def prices_view(settings: Settings, now_ms: int) -> dict[str, Any]:
    """`GET /admin/prices`: per model, the sheet in force now, the ones scheduled after it
    (by start) and the ones it replaced; every price resolved (a class left out shows its
    parent's price) and named by the version its usage records cite."""
    models = []
    for model in settings.models:
        current = prices_at(model, now_ms)
        sheets = [sheet_prices(sheet) for sheet in model.price_sheets]
        later = [p for p in sheets if (p.effective_from_ms or 0) > now_ms]
        earlier = [p for p in sheets if p not in later and p != current]
        models.append(
            {
                "model": model.name,
                "billing": model.billing,
                "currency": settings.billing.currency,
                "current": _sheet_view(current) if current is not None else None,
                "scheduled": [_sheet_view(p) for p in later],
                "replaced": [_sheet_view(p) for p in earlier],
            }
        )
    return {"object": "list", "data": models}


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
