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


# -- issue 14 (token classes, price sheets, cost reporting, cost cap) ---------------------


def exact_micros(*terms: tuple[int, str]) -> Fraction:
    """sum(tokens x price per million) as an exact fraction of micro-units, from the decimal
    price strings of the config (tokens x currency per million tokens = micro-units)."""
    return sum((Fraction(tokens) * Fraction(price) for tokens, price in terms), Fraction(0))


def ceil_micros(exact: Fraction) -> int:
    """An exact amount rounded up to the micro-unit (SPEC section 2: once per call)."""
    return -(-exact.numerator // exact.denominator)


def records_by_request(
    admin: Admin, account_id: str, request_ids: list[str], timeout: float = 10.0
) -> dict[str, dict[str, Any]]:
    """The account's usage records by request id, once every one of `request_ids` has its
    record; fails when a request has more than one, or the account has a record of another."""
    deadline = time.monotonic() + timeout
    while True:
        records = admin.usage(account_id)
        seen = [r["request_id"] for r in records]
        if set(request_ids) <= set(seen) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for request_id in request_ids:
        assert seen.count(request_id) == 1, (request_id, seen)
    assert sorted(seen) == sorted(request_ids), (seen, request_ids)
    return {r["request_id"]: r for r in records}


def sse_events(raw: bytes) -> list[bytes]:
    """The events of an SSE body (`data: ...` lines), in order, without their separators."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    return [event for event in raw.split(b"\n\n") if event]


def metric_values(base_url: str, name: str) -> dict[frozenset[tuple[str, str]], float]:
    """Every sample of the metric `name` on a gateway's /metrics, by its label set."""
    text = Admin(base_url, token=None).call("GET", "/metrics").body.decode()
    found: dict[frozenset[tuple[str, str]], float] = {}
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        labels, value = line[len(name) + 1 :].rsplit("} ", 1)
        pairs = (part.split("=", 1) for part in labels.split(",") if part)
        found[frozenset((k, v.strip('"')) for k, v in pairs)] = float(value)
    return found


def model_prices(admin: Admin, model: str) -> dict[str, Any]:
    """The `GET /admin/prices` entry of one model."""
    listing = admin.ok("GET", "/admin/prices")
    assert listing["object"] == "list", listing
    (entry,) = [m for m in listing["data"] if m["model"] == model]
    return dict(entry)
