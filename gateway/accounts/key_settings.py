"""What an account's API key may do: its name, budget, expiry, models and rate limits.

Set with POST /admin/accounts/{id}/keys and changed with PATCH; validated here so a bad body is
a clear 400. `KeySettings.limits` is what admission enforces (ledger.KeyLimits, written with the
key's metadata in one script), `KeySettings.public` what the admin API shows: the one is made
from the other, so what is shown is what is enforced.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from gateway.config.types import check_rate_limit, parse_duration
from gateway.ledger import KeyLimits
from gateway.money import MAX_BALANCE_MICROS, format_micros, parse_micros
from gateway.ratelimit import rule_spec
from gateway.timefmt import iso_ms, parse_iso_ms

__all__ = ["CALENDAR_PERIODS", "KeyBudget", "KeyRateLimits", "KeySettings", "rotation_grace_ms"]

# Budget periods that roll over on UTC calendar boundaries (a week starts on Monday).
CALENDAR_PERIODS = ("day", "week", "month")
# A period may also be a length ("2s", "6h"): from one second to a year, counted from the epoch.
_MIN_PERIOD_MS, _MAX_PERIOD_MS = 1000, 366 * 86400 * 1000
_MAX_GRACE_S = 30 * 86400
_MODEL_NAME = re.compile(r"[^\s]{1,200}")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class KeyBudget(_Strict):
    """At most `amount` spent (plus held by calls in flight) per `period`; None: over the
    key's life."""

    amount: str
    period: str | None = None

    @field_validator("amount")
    @classmethod
    def _amount(cls, value: str) -> str:
        return format_micros(parse_micros(value, maximum=MAX_BALANCE_MICROS))

    @field_validator("period")
    @classmethod
    def _period(cls, value: str | None) -> str | None:
        if value is None or value in CALENDAR_PERIODS:
            return value
        try:
            length_ms = round(parse_duration(value) * 1000)
        except (TypeError, ValueError):
            length_ms = 0
        if not _MIN_PERIOD_MS <= length_ms <= _MAX_PERIOD_MS:
            raise ValueError(
                "expected day, week, month, null (the key's life) or a length from 1s to 366d "
                'such as "6h"'
            )
        return value

    def micros(self) -> int:
        return parse_micros(self.amount, maximum=MAX_BALANCE_MICROS)

    def period_spec(self) -> str:
        """The period as the admission script reads it (see key_period in _prelude.lua)."""
        if self.period is None:
            return ""
        if self.period in CALENDAR_PERIODS:
            return self.period
        return str(round(parse_duration(self.period) * 1000))


class KeyRateLimits(_Strict):
    """The key's own limits, in the config's rate-limit strings ("60/minute"): checked with
    the account's and the model's, every one enforced."""

    requests: str | None = None
    tokens: str | None = None

    @field_validator("requests", "tokens")
    @classmethod
    def _rule(cls, value: str | None) -> str | None:
        return None if value is None else check_rate_limit(value)


class KeySettings(_Strict):
    name: str = Field(default="", max_length=200)
    budget: KeyBudget | None = None
    expires_at: str | None = None
    models: tuple[str, ...] | None = Field(default=None, min_length=1, max_length=200)
    rate_limits: KeyRateLimits | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value.isprintable():
            raise ValueError("expected printable characters")
        return value

    @field_validator("expires_at")
    @classmethod
    def _expires(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return iso_ms(parse_iso_ms(value))
        except ValueError:
            raise ValueError("expected an ISO 8601 time such as 2026-12-31T00:00:00Z") from None

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        for name in value:
            if _MODEL_NAME.fullmatch(name) is None:
                raise ValueError("expected model names (no whitespace, at most 200 characters)")
        return tuple(dict.fromkeys(value))

    @classmethod
    def parse(cls, data: dict[str, Any]) -> KeySettings:
        """The settings of a request body (pydantic's ValidationError for a bad one)."""
        return cls.model_validate(data)

    def changed(self, patch: dict[str, Any]) -> KeySettings:
        """These settings with a PATCH body's fields replaced (null clears one)."""
        return KeySettings.parse({**self.public(), **patch})

    def limits(self) -> KeyLimits:
        budget, rates = self.budget, self.rate_limits or KeyRateLimits()
        return KeyLimits(
            budget=None if budget is None else budget.micros(),
            period="" if budget is None else budget.period_spec(),
            expires_ms=None if self.expires_at is None else parse_iso_ms(self.expires_at),
            models=self.models,
            requests_spec=rule_spec(rates.requests),
            tokens_spec=rule_spec(rates.tokens),
        )

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "budget": None if self.budget is None else self.budget.model_dump(),
            "expires_at": self.expires_at,
            "models": None if self.models is None else list(self.models),
            "rate_limits": None if self.rate_limits is None else self.rate_limits.model_dump(),
        }


def rotation_grace_ms(value: object) -> int:
    """How long a rotated key's previous secret stays valid ("1h" when not given); ValueError
    past 30 days."""
    seconds = parse_duration("1h" if value is None else value)
    if seconds > _MAX_GRACE_S:
        raise ValueError("must be at most 30d")
    return round(seconds * 1000)
