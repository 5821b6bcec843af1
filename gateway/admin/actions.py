"""The admin actions that both the admin API and the console take, in one place each: a page's
form runs the very code a JSON call does."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import orjson

from gateway.config.schema import Settings
from gateway.errors import (
    AccountInArrears,
    AccountNotFound,
    IdempotencyConflict,
    InvalidRequest,
    ModelNotFound,
)
from gateway.ledger import Ledger
from gateway.ledger.keys import ID_RULE, valid_id
from gateway.ledger.records import TopupResult
from gateway.money import MAX_BALANCE_MICROS, format_micros, parse_amount
from gateway.timefmt import now_ms

__all__ = ["BalanceLimitExceeded", "subscribe_to", "top_up"]


class BalanceLimitExceeded(InvalidRequest):
    """A top-up that would take the balance above MAX_BALANCE_MICROS (refused by topup.lua,
    which credits nothing)."""

    code = "balance_limit_exceeded"


async def top_up(
    ledger: Ledger, account_id: str, data: dict[str, Any], idem_key: str | None
) -> TopupResult:
    """Credit `data["amount"]`, at most once per Idempotency-Key (`idem_key`) and body;
    400 for a bad amount or key, 404 for no account, 409 for a key reused with another body."""
    try:
        amount = parse_amount(data.get("amount"))
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="amount") from None
    if idem_key is not None and not valid_id(idem_key):
        raise InvalidRequest(
            f"the Idempotency-Key header must be {ID_RULE}", param="Idempotency-Key"
        )
    fingerprint = hashlib.sha256(orjson.dumps(data, option=orjson.OPT_SORT_KEYS)).hexdigest()
    topup_id = "topup_" + os.urandom(12).hex()
    result = await ledger.topup(account_id, amount, fingerprint, idem_key or "", now_ms(), topup_id)
    if result.code == "account_not_found":
        raise AccountNotFound(f"no account '{account_id}'")
    if result.code == "idempotency_conflict":
        raise IdempotencyConflict("this Idempotency-Key was used with another request body")
    if result.code == "balance_limit_exceeded":
        raise BalanceLimitExceeded(
            f"a top-up of {format_micros(amount)} would take the balance above the maximum "
            f"balance of {format_micros(MAX_BALANCE_MICROS)}; nothing was credited",
            param="amount",
        )
    return result


async def subscribe_to(ledger: Ledger, settings: Settings, account_id: str, model: object) -> str:
    """Subscribe the account to a configured model: `created` or `exists`; 403 for a new model
    while in arrears, 404 for no such account or model."""
    if not isinstance(model, str) or not model:
        raise InvalidRequest("model must be a model name", param="model")
    if settings.model(model) is None:
        raise ModelNotFound(f"the model '{model}' does not exist", param="model")
    outcome = await ledger.subscribe(account_id, model)
    if outcome == "account_not_found":
        raise AccountNotFound(f"no account '{account_id}'")
    if outcome == "account_in_arrears":
        raise AccountInArrears("an account in arrears cannot subscribe to new models; top up first")
    return outcome
