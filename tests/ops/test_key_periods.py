"""A key's budget periods roll over on UTC calendar boundaries (the Lua `key_period`).

Every period `Ledger.key_spend` reports is checked against Python's `datetime`/`calendar`
at many instants, and spend against the rollover, on the session's real store at chosen
times (as tests/ops/test_rate_limit_rules.py drives admission).
"""

from __future__ import annotations

import calendar
import random
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from gateway.ledger import Admission, KeyLimits, KeySpend, Ledger, Reservation
from gateway.store.embedded import EmbeddedStore

MODEL = "m"
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MS = timedelta(milliseconds=1)
NO_RULE = ("", "", "", "")


def at(
    year: int, month: int, day: int, h: int = 0, m: int = 0, s: int = 0, ms: int = 0
) -> datetime:
    """A UTC instant, to the ms."""
    return datetime(year, month, day, h, m, s, tzinfo=UTC) + ms * MS


def ms_of(instant: datetime) -> int:
    return (instant - EPOCH) // MS


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def oracle(period: str, instant: datetime) -> tuple[int, int]:
    """The period holding `instant`, from datetime alone: (start ms, end ms)."""
    day = instant.date()
    if period == "day":
        start = midnight(day)
        return ms_of(start), ms_of(start + timedelta(days=1))
    if period == "week":
        start = midnight(day - timedelta(days=day.isocalendar().weekday - 1))
        return ms_of(start), ms_of(start + timedelta(days=7))
    assert period == "month"
    start = midnight(day.replace(day=1))
    return ms_of(start), ms_of(start + timedelta(days=calendar.monthrange(day.year, day.month)[1]))


def edge_instants() -> list[datetime]:
    """The last ms before each boundary and the first ms after it."""
    boundaries = [
        at(1970, 1, 1),
        at(1970, 1, 2),
        at(1970, 1, 5),  # the first Monday after the epoch
        at(1970, 2, 1),
        at(1971, 1, 1),
        at(2000, 2, 29),
        at(2000, 3, 1),
        at(2024, 2, 29),
        at(2024, 3, 1),
        at(2100, 3, 1),  # 2100 is not leap: Feb 28 is its last day of February
        at(2026, 3, 2),  # a Monday
        at(2026, 5, 1),
        at(2026, 12, 1),
        at(2027, 1, 1),
        at(2199, 12, 31),
        at(2200, 1, 1),
    ]
    out = [b + d for b in boundaries for d in (-MS, timedelta(0))]
    return [i for i in out if i >= EPOCH]


def random_instants(count: int) -> list[datetime]:
    rng = random.Random(20260131)
    end = ms_of(at(2200, 1, 1))
    return [EPOCH + rng.randrange(end) * MS for _ in range(count)]


@pytest.fixture
async def ledger(valkey: EmbeddedStore) -> AsyncIterator[Ledger]:
    client = aioredis.Redis.from_url(valkey.url)
    yield Ledger(client)
    await client.aclose()


class Account:
    """A funded account of its own, subscribed to MODEL, with keys named after their
    periods; its open holds are released at the end."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.account_id = "acct-" + uuid.uuid4().hex[:12]
        self.open: list[str] = []

    async def setup(self) -> Account:
        await self.ledger.create_account(self.account_id, "", 0)
        await self.ledger.topup(self.account_id, 10**12, "", "", 0, uuid.uuid4().hex)
        assert await self.ledger.subscribe(self.account_id, MODEL) == "created"
        return self

    async def key(self, key_id: str, period: str, budget: int | None = 10**9) -> str:
        limits = KeyLimits(budget=budget, period=period)
        assert await self.ledger.write_key(self.account_id, key_id, b"{}", limits, key_id) == "ok"
        return key_id

    async def spend(self, key_id: str, now: datetime | int) -> KeySpend:
        now_ms = now if isinstance(now, int) else ms_of(now)
        return (await self.ledger.key_spend(self.account_id, [key_id], now_ms))[key_id]

    async def reserve(self, key_id: str, hold: int, now_ms: int) -> tuple[str, Admission]:
        request_id = "req_" + uuid.uuid4().hex
        lease = int(time.time() * 1000) + 600_000
        admission = await self.ledger.reserve(
            Reservation(
                self.account_id, key_id, key_id, MODEL, hold, request_id, lease, False, "",
                now_ms, 0, NO_RULE,
            )
        )  # fmt: skip
        if admission.code == "ok":
            self.open.append(request_id)
        return request_id, admission

    async def settle(self, key_id: str, request_id: str, cost: int, now_ms: int) -> None:
        record = {"request_id": request_id, "kind": "inference", "cost": cost, "key_id": key_id}
        result = await self.ledger.settle(self.account_id, request_id, cost, now_ms, record)
        assert result.code == "ok"
        self.open.remove(request_id)

    async def call(self, key_id: str, cost: int, now_ms: int) -> None:
        request_id, admission = await self.reserve(key_id, cost, now_ms)
        assert admission.code == "ok", admission
        await self.settle(key_id, request_id, cost, now_ms)

    async def close(self) -> None:
        for request_id in self.open:
            await self.ledger.release(self.account_id, request_id)


@pytest.fixture
async def account(ledger: Ledger) -> AsyncIterator[Account]:
    one = await Account(ledger).setup()
    yield one
    await one.close()


async def test_calendar_periods_match_datetime(account: Account) -> None:
    """At 400 random instants over 1970-2200 and at every edge (a day's, week's, month's,
    year's last ms and the next one's first, leap and non-leap Februaries), 'day', 'week'
    (ISO, from Monday) and 'month' start and end where datetime says."""
    periods = ("day", "week", "month")
    for period in periods:
        await account.key(period, period)
    instants = edge_instants() + random_instants(400)
    mismatches = []
    for instant in instants:
        spends = await account.ledger.key_spend(account.account_id, periods, ms_of(instant))
        for period in periods:
            got = (spends[period].period_start_ms, spends[period].period_end_ms)
            if got != oracle(period, instant):
                mismatches.append((period, instant.isoformat(), got, oracle(period, instant)))
    assert mismatches == []


def test_the_edges_are_the_boundaries_they_claim() -> None:
    """The oracle's edges: Feb 29 exists in 2000 and 2024, not 2100; 2026-03-01 is a Sunday."""
    assert [calendar.isleap(y) for y in (2000, 2024, 2100)] == [True, True, False]
    assert at(2026, 3, 1).isoweekday() == 7
    assert oracle("week", at(2026, 3, 1, 23, 59, 59, 999))[1] == ms_of(at(2026, 3, 2))
    assert oracle("month", at(2100, 2, 28))[1] == ms_of(at(2100, 3, 1))


async def test_a_month_rollover_resets_spend_and_keeps_holds(account: Account) -> None:
    """A cost settled in January's last ms is January's spend; at February's first it counts
    0 (the life's total keeps it), so a call the January spend refused is admitted. A hold
    still open across the rollover counts in February."""
    key = await account.key("k-month", "month", budget=1_000)
    last = ms_of(at(2026, 1, 31, 23, 59, 59, 999))
    first = ms_of(at(2026, 2, 1))
    await account.call(key, 700, last)
    held_id, held = await account.reserve(key, 200, last)
    assert held.code == "ok"
    january = await account.spend(key, last)
    assert (january.spent, january.held, january.total) == (700, 200, 700)
    assert (january.period_start_ms, january.period_end_ms) == oracle("month", at(2026, 1, 31))
    _, refused = await account.reserve(key, 200, last)
    assert refused.code == "key_budget_exceeded"
    assert refused.budget is not None
    assert refused.budget.period_end_ms == first

    february = await account.spend(key, first)
    assert (february.spent, february.held, february.total) == (0, 200, 700)
    assert (february.period_start_ms, february.period_end_ms) == oracle("month", at(2026, 2, 1))
    _, admitted = await account.reserve(key, 200, first)
    assert admitted.code == "ok"
    await account.settle(key, held_id, 150, first)
    after = await account.spend(key, first)
    assert (after.spent, after.held, after.total) == (150, 200, 850)


async def test_a_length_period_is_aligned_on_the_epoch(account: Account) -> None:
    """A '2000' ms period holding `now` starts at floor(now / 2000) * 2000 and lasts 2 s;
    spend of the previous one counts 0 in the next."""
    key = await account.key("k-2s", "2000")
    t0 = ms_of(at(2026, 6, 1, 12))
    for now in [t0 + d for d in (0, 1, 1_999, 2_000, 3_999, 4_001)] + [1, 1_999, 2_000]:
        spend = await account.spend(key, now)
        start = now - now % 2000
        assert (spend.period_start_ms, spend.period_end_ms) == (start, start + 2000), now
    await account.call(key, 40, t0 + 1_999)
    assert (await account.spend(key, t0 + 1_999)).spent == 40
    assert (await account.spend(key, t0 + 2_000)).spent == 0


async def test_a_budget_over_the_keys_life_never_resets(account: Account) -> None:
    """With no period the budget's one period starts at 0 and never ends: spend settled
    decades apart adds up, at every instant."""
    key = await account.key("k-life", "")
    spent = 0
    for instant in (at(1970, 1, 1), at(2026, 1, 31, 23, 59, 59, 999), at(2199, 12, 31)):
        await account.call(key, 25, ms_of(instant))
        spent += 25
        for later in (instant, instant + MS, at(2200, 1, 1)):
            spend = await account.spend(key, later)
            assert (spend.spent, spend.total) == (spent, spent), later
            assert (spend.period_start_ms, spend.period_end_ms) == (0, None)
