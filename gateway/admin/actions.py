"""The admin actions that both the admin API and the console take, in one place each: a page's
form runs the very code a JSON call does."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import orjson

from gateway.errors import AccountNotFound, IdempotencyConflict, InvalidRequest
from gateway.ledger import Ledger
from gateway.ledger.keys import ID_RULE, valid_id
from gateway.ledger.records import TopupResult
from gateway.money import MAX_BALANCE_MICROS, format_micros, parse_amount
from gateway.timefmt import now_ms

__all__ = ["BalanceLimitExceeded", "top_up"]


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
