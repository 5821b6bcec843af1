"""An account's own notification channels and chosen events.

Set with PUT /admin/accounts/{id}/notifications; validated here so a bad body is a clear 400.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from gateway.config.types import Micros
from gateway.money import format_micros

__all__ = ["EVENT_TYPES", "AccountWebhook", "NotificationPreferences"]

EventType = Literal[
    "account.frozen",
    "account.retention_started",
    "account.cleared",
    "account.unfrozen",
    "balance.low",
    "topup.succeeded",
]
EVENT_TYPES: tuple[str, ...] = (
    "account.frozen",
    "account.retention_started",
    "account.cleared",
    "account.unfrozen",
    "balance.low",
    "topup.succeeded",
)
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
_PHONE = re.compile(r"^\+[1-9][0-9]{6,14}$")


class _Strict(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AccountWebhook(_Strict):
    url: str
    secret: str = Field(min_length=8, max_length=256)  # signs each body (X-Signature)

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not re.match(r"^https?://[^\s/]+", value):
            raise ValueError("expected an http:// or https:// URL")
        return value


class NotificationPreferences(_Strict):
    """Channels are billed per delivery at the configured prices ("billed only when enabled")."""

    events: tuple[EventType, ...] = EVENT_TYPES  # type: ignore[assignment]
    webhooks: tuple[AccountWebhook, ...] = Field(default=(), max_length=10)
    emails: tuple[str, ...] = Field(default=(), max_length=10)
    sms: tuple[str, ...] = Field(default=(), max_length=10)
    low_balance_threshold: Micros | None = None

    @field_serializer("low_balance_threshold")
    def _threshold_text(self, value: int | None) -> str | None:
        # Stored as the decimal string it was given in, so the stored form validates again.
        return None if value is None else format_micros(value)

    @field_validator("emails")
    @classmethod
    def _emails(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for address in value:
            if not _EMAIL.match(address):
                raise ValueError(f"{address!r} is not an email address")
        return value

    @field_validator("sms")
    @classmethod
    def _phones(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for number in value:
            if not _PHONE.match(number):
                raise ValueError(f"{number!r} is not a phone number in E.164 form (+15551234567)")
        return value

    def public(self) -> dict[str, Any]:
        """The settings as the API shows them: webhook secrets masked, amounts as decimals."""
        threshold = self.low_balance_threshold
        return {
            "events": list(self.events),
            "webhooks": [{"url": w.url, "secret": "********"} for w in self.webhooks],
            "emails": list(self.emails),
            "sms": list(self.sms),
            "low_balance_threshold": None if threshold is None else format_micros(threshold),
        }
