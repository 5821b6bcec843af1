"""`audit` with history on: the database's journal and the ledger agree, account by account.

For every account of the store: the top-ups in the database plus those the store has after
the export's cursor add up to the account's `topped_up`, and the usage costs of its monthly
totals (kept through clearing) plus the store's records after the cursor add up to its
`spent`. A record the store lost before it was exported, one exported twice, or a total
moved by anything but the scripts shows here as a difference, in micro-units.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from gateway.audit import AuditReport
from gateway.ledger.history_feed import BACKLOG_MAX, HistoryFeed
from gateway.ledger.keys import ACCOUNT_KEY_PATTERN, AccountField, account_id_of, account_keys
from gateway.ledger.ledger import Ledger
from gateway.ledger.transport import text
from gateway.money import format_micros

__all__ = ["audit_history"]


async def audit_history(client: aioredis.Redis, conn: Any, report: AuditReport) -> int:
    """Add each account whose history disagrees with its ledger to `report`; the accounts
    checked."""
    topups = dict(await conn.fetch("SELECT account_id, sum(amount)::bigint FROM topups GROUP BY 1"))
    spent = dict(
        await conn.fetch("SELECT account_id, sum(cost)::bigint FROM usage_monthly GROUP BY 1")
    )
    cursors = {
        (row[0], row[1]): row[2]
        for row in await conn.fetch("SELECT account_id, stream, last_id FROM export_cursors")
    }
    feed = HistoryFeed(Ledger(client))
    checked = 0
    async for key in client.scan_iter(match=ACCOUNT_KEY_PATTERN, count=500):
        account_id = account_id_of(text(key))
        raw: Any = await client.hmget(
            account_keys(account_id).account, AccountField.TOPPED_UP, AccountField.SPENT
        )
        topped_up, charged = (int(text(v)) if v is not None else 0 for v in raw)
        new_topups, new_usage = await feed.new_entries(
            [
                (account_id, "topups", cursors.get((account_id, "topups"))),
                (account_id, "usage", cursors.get((account_id, "usage"))),
            ],
            BACKLOG_MAX,
        )
        history_topups = (topups.get(account_id) or 0) + sum(
            int(f.get("amount") or 0) for _, f in new_topups
        )
        history_spent = (spent.get(account_id) or 0) + sum(
            int(f.get("cost") or 0) for _, f in new_usage
        )
        problems = []
        if history_topups != topped_up:
            problems.append(
                f"history's top-ups {format_micros(history_topups)} != ledger's topped_up "
                f"{format_micros(topped_up)}"
            )
        if history_spent != charged:
            problems.append(
                f"history's usage {format_micros(history_spent)} != ledger's spent "
                f"{format_micros(charged)}"
            )
        if problems:
            report.failures.setdefault(account_id, []).extend(problems)
        checked += 1
    return checked
