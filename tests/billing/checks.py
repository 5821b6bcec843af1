"""Money assertions shared by the billing tests: the SPEC section 2 invariant, exactly."""

from __future__ import annotations

import asyncio
import time
from decimal import Decimal
from fractions import Fraction
from typing import Any

import redis

from gateway.ledger.keys import account_keys
from gateway.pricing import Prices, TokenUsage
from tests.admin_client import Admin


def micros(text: str) -> int:
    """A decimal string from the API -> integer micro-units (no float on the way)."""
    value = Decimal(text) * 1_000_000
    assert value == value.to_integral_value(), text
    return int(value)


def expected_cost(prompt: int, completion: int, input_price: str, output_price: str) -> int:
    """SPEC section 2, computed independently with exact fractions."""
    # tokens x (currency per million tokens) = millionths of the currency = micro-units
    exact = Fraction(prompt) * Fraction(input_price) + Fraction(completion) * Fraction(output_price)
    whole = exact.numerator // exact.denominator
    return whole + (1 if exact.numerator % exact.denominator else 0)


def wait_no_holds(store: redis.Redis, account_id: str, timeout: float = 10.0) -> None:
    """Wait until every hold of the account is settled or released."""
    deadline = time.monotonic() + timeout
    holds_key = account_keys(account_id).holds
    while time.monotonic() < deadline:
        if store.hlen(holds_key) == 0:
            return
        time.sleep(0.05)
    raise AssertionError(f"holds still open: {store.hgetall(holds_key)}")


def assert_invariant(admin: Admin, store: redis.Redis, account_id: str, topped_up: int) -> Any:
    """balance == top-ups - sum(usage record costs), to the micro-unit, no hold open."""
    wait_no_holds(store, account_id)
    account = admin.account(account_id)
    records = admin.usage(account_id)
    spent = sum(micros(r["cost"]) for r in records)
    assert micros(account["balance"]) == topped_up - spent, (account, spent)
    assert account["held"] == "0.000000"
    assert account["available"] == account["balance"]
    return account, records


async def one_usage_record(admin: Admin, account_id: str) -> Any:
    """The account's single usage record, once its settlement (a task of its own, run just
    after the answer) has written it."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        records = admin.usage(account_id)
        if records:
            (record,) = records
            return record
        await asyncio.sleep(0.05)
    raise AssertionError("no usage record")


def gateway_cost(prompt: int, completion: int, input_micros: int, output_micros: int) -> int:
    """The gateway's own cost of plain input and output tokens (gateway/pricing.py), for tests
    of its arithmetic (compare with `expected_cost`, computed independently)."""
    return Prices.plain("test", input_micros, output_micros).cost(TokenUsage(prompt, completion))
