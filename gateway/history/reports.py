"""An account's usage summed (by day, model or key) and its monthly statements.

Both read the history database and, for what it does not have yet, the store: the records
and top-ups after the export's cursors (with history off, the store alone). Each record is
counted once: those up to a cursor are in the database (or were trimmed from the store once
they were), those after it only in the store.

A statement is made of the monthly totals the export keeps (`usage_monthly`, kept when an
account is cleared and its per-call records deleted) and the top-ups: opening balance (every
top-up before the month less every charge before it), the month's top-ups, its usage by model,
its notification charges, and the closing balance. It reconciles to the ledger: what the
history adds up to over all time equals the account's balance, to the micro-unit.
"""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

from gateway.history.reader import HistoryReader
from gateway.ledger import Ledger
from gateway.ledger.history_feed import BACKLOG_MAX, HistoryFeed
from gateway.money import format_micros
from gateway.timefmt import iso_ms
from gateway.usage_record import UsageRecord

__all__ = ["GroupBy", "Totals", "month_bounds", "statement", "summary"]

GroupBy = Literal["day", "model", "key"]
_SQL_GROUP = {
    "day": "to_char(at AT TIME ZONE 'UTC', 'YYYY-MM-DD')",
    "model": "model",
    "key": "key_id",
}
_CLASSES = ("prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens")
_COLUMNS = (*_CLASSES, "reasoning_tokens")


@dataclass(slots=True)
class Totals:
    calls: int = 0
    tokens: dict[str, int] = field(default_factory=lambda: dict.fromkeys(_COLUMNS, 0))
    cost: int = 0

    def add_record(self, record: UsageRecord) -> None:
        self.calls += 1
        for name in _COLUMNS:
            self.tokens[name] += getattr(record, name)
        self.cost += record.cost

    def add_row(self, row: Any) -> None:
        self.calls += row["calls"]
        for name in _COLUMNS:
            self.tokens[name] += row[name]
        self.cost += row["cost"]

    def view(self) -> dict[str, Any]:
        return {"calls": self.calls, **self.tokens, "cost": format_micros(self.cost)}


def month_bounds(month: str) -> tuple[int, int]:
    """`2026-11` -> (its first ms, the next month's first ms), UTC; ValueError if not one."""
    year, number = (int(part) for part in month.split("-"))
    start = dt.datetime(year, number, 1, tzinfo=dt.UTC)
    end = dt.datetime(year + number // 12, number % 12 + 1, 1, tzinfo=dt.UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


async def _cursor(reader: HistoryReader, account_id: str, stream: str) -> str | None:
    async with reader.connection() as conn:
        value: str | None = await conn.fetchval(
            "SELECT last_id FROM export_cursors WHERE account_id = $1 AND stream = $2",
            account_id,
            stream,
        )
        return value


async def _store_after(
    ledger: Ledger, reader: HistoryReader, account_id: str, stream: str
) -> list[dict[str, str]]:
    """The store's entries of one stream the database does not have."""
    last = await _cursor(reader, account_id, stream) if reader.enabled else None
    (entries,) = await HistoryFeed(ledger).new_entries([(account_id, stream, last)], BACKLOG_MAX)
    return [fields for _, fields in entries]


def _group_of(record: UsageRecord, group_by: GroupBy) -> str:
    if group_by == "day":
        return (iso_ms(record.time) or "")[:10]
    return record.model if group_by == "model" else record.key_id


async def summary(
    ledger: Ledger,
    reader: HistoryReader,
    account_id: str,
    group_by: GroupBy,
    since: int,
    until: int,
) -> dict[str, Any]:
    """Tokens by class, calls and cost, per day, model or key, of the records in the time
    range."""
    groups: dict[str, Totals] = defaultdict(Totals)
    if reader.enabled:
        group = _SQL_GROUP[group_by]
        sums = ", ".join(f"sum({name})::bigint AS {name}" for name in _COLUMNS)
        async with reader.connection() as conn:
            rows = await conn.fetch(
                f"SELECT {group} AS grp, count(*) AS calls, {sums}, sum(cost)::bigint AS cost"  # noqa: S608
                " FROM usage_records WHERE account_id = $1 AND time_ms >= $2 AND time_ms < $3"
                " GROUP BY grp",
                account_id,
                since,
                until,
            )
        for row in rows:
            groups[row["grp"]].add_row(row)
    for fields in await _store_after(ledger, reader, account_id, "usage"):
        record = UsageRecord.from_fields(fields)
        if since <= record.time < until:
            groups[_group_of(record, group_by)].add_record(record)
    total = Totals()
    data = []
    for key in sorted(groups):
        totals = groups[key]
        total.calls += totals.calls
        total.cost += totals.cost
        for name in _COLUMNS:
            total.tokens[name] += totals.tokens[name]
        data.append({group_by: key, **totals.view()})
    return {"group_by": group_by, "data": data, "total": total.view()}


async def statement(
    ledger: Ledger, reader: HistoryReader, account_id: str, month: str, balance: int
) -> dict[str, Any]:
    """The month's statement of the account whose ledger balance is `balance` now."""
    start, end = month_bounds(month)
    first_day = _date(start)
    topups_before = charged_before = charged_after = topups_after = 0
    topups: list[dict[str, Any]] = []
    lines: dict[tuple[str, str], Totals] = defaultdict(Totals)
    if reader.enabled:
        async with reader.connection() as conn:
            for row in await conn.fetch(
                "SELECT topup_id, time_ms, amount FROM topups WHERE account_id = $1"
                " ORDER BY time_ms, stream_id",
                account_id,
            ):
                topups_before, topups_after = _place(
                    row["time_ms"], row["amount"], start, end, topups_before, topups_after
                )
                if start <= row["time_ms"] < end:
                    topups.append(_topup_view(row["topup_id"], row["time_ms"], row["amount"]))
            for row in await conn.fetch(
                "SELECT * FROM usage_monthly WHERE account_id = $1", account_id
            ):
                if row["month"] < first_day:
                    charged_before += row["cost"]
                elif row["month"] == first_day:
                    lines[(row["model"], row["kind"])].add_row(row)
                else:
                    charged_after += row["cost"]
    for fields in await _store_after(ledger, reader, account_id, "topups"):
        at, amount = int(fields.get("time") or 0), int(fields.get("amount") or 0)
        topups_before, topups_after = _place(at, amount, start, end, topups_before, topups_after)
        if start <= at < end:
            topups.append(_topup_view(fields.get("id", ""), at, amount))
    for fields in await _store_after(ledger, reader, account_id, "usage"):
        record = UsageRecord.from_fields(fields)
        if record.time < start:
            charged_before += record.cost
        elif record.time < end:
            lines[(record.model, record.kind)].add_record(record)
        else:
            charged_after += record.cost
    topped_up = sum(t["micros"] for t in topups)
    usage = {key: totals for key, totals in lines.items() if key[1] != "notification"}
    notifications = Totals()
    for key, totals in lines.items():
        if key[1] == "notification":
            notifications.calls += totals.calls
            notifications.cost += totals.cost
    used = sum(totals.cost for totals in usage.values())
    opening = topups_before - charged_before
    closing = opening + topped_up - used - notifications.cost
    now = closing + topups_after - charged_after
    return {
        "account_id": account_id,
        "month": month,
        "from": iso_ms(start),
        "until": iso_ms(end),
        "opening_balance": format_micros(opening),
        "topups": [{k: v for k, v in t.items() if k != "micros"} for t in topups],
        "topups_total": format_micros(topped_up),
        "usage": [
            {"model": model, "kind": kind, **totals.view()}
            for (model, kind), totals in sorted(usage.items())
        ],
        "usage_total": format_micros(used),
        "notifications": {"count": notifications.calls, "cost": format_micros(notifications.cost)},
        "closing_balance": format_micros(closing),
        "reconciliation": {
            "history_balance_now": format_micros(now),
            "ledger_balance_now": format_micros(balance),
            "reconciles": now == balance,
        },
    }


def _date(ms: int) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).date()


def _place(at: int, amount: int, start: int, end: int, before: int, after: int) -> tuple[int, int]:
    """Add a top-up to the totals before the month or after it (the month's are listed)."""
    if at < start:
        return before + amount, after
    if at >= end:
        return before, after + amount
    return before, after


def _topup_view(topup_id: str, at: int, amount: int) -> dict[str, Any]:
    return {"id": topup_id, "time": iso_ms(at), "amount": format_micros(amount), "micros": amount}
