"""`inference-gateway audit`: prove the ledger adds up, account by account.

For every account: balance == top-ups - usage costs (the costs of records deleted at clearing,
or trimmed from the store once the history database had them, included), the running totals
agree with the streams they summarize, the amount held equals the open holds, and no hold has
outlived its lease (a sweeper should have settled it). It also
reports, per model, the drift between upstream-reported and locally counted tokens.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from gateway.ledger.keys import (
    ACCOUNT_KEY_PATTERN,
    AccountField,
    account_id_of,
    account_keys,
    stream_id_after,
)
from gateway.ledger.transport import text
from gateway.money import format_micros
from gateway.timefmt import now_ms
from gateway.usage_record import UsageRecord

__all__ = ["AuditReport", "audit_store"]

# A hold may outlive its lease by this much before it counts as stuck (sweep delay).
LEASE_SLACK_MS = 30_000


@dataclass
class AuditReport:
    accounts: int = 0
    failures: dict[str, list[str]] = field(default_factory=dict)
    # model -> [upstream prompt, local prompt, upstream completion, local completion, cached,
    # cache write, reasoning] (the classes: tokens the upstream reported within its counts)
    drift: dict[str, list[int]] = field(
        default_factory=lambda: defaultdict(lambda: [0, 0, 0, 0, 0, 0, 0])
    )

    @property
    def ok(self) -> bool:
        return not self.failures

    def render(self) -> str:
        lines = [f"audited {self.accounts} accounts: {len(self.failures)} failing"]
        for account_id, problems in sorted(self.failures.items()):
            for problem in problems:
                lines.append(f"FAIL {account_id}: {problem}")
        if self.drift:
            lines.append("")
            lines.append("token drift (upstream-reported minus counted locally), per model:")
            lines.append(
                "model | prompt upstream | prompt local | drift | completion upstream | "
                "completion local | drift | cached | cache write | reasoning"
            )
            for model, (pu, pl, cu, cl, cached, written, reasoning) in sorted(self.drift.items()):
                lines.append(
                    f"{model} | {pu} | {pl} | {pu - pl:+d} | {cu} | {cl} | {cu - cl:+d} | "
                    f"{cached} | {written} | {reasoning}"
                )
        return "\n".join(lines)


async def _sum_stream(
    client: aioredis.Redis, key: str, field_name: str
) -> tuple[int, list[dict[str, str]]]:
    total = 0
    rows: list[dict[str, str]] = []
    start = "-"
    while True:
        batch: Any = await client.xrange(key, min=start, max="+", count=1000)
        if not batch:
            return total, rows
        for _entry_id, fields in batch:
            decoded = {text(k): text(v) for k, v in fields.items()}
            total += int(decoded.get(field_name, "0") or 0)
            rows.append(decoded)
        after = stream_id_after(text(batch[-1][0]))
        if after is None:
            return total, rows
        start = after


async def audit_account(client: aioredis.Redis, account_id: str, report: AuditReport) -> None:
    k = account_keys(account_id)
    raw: Any = await client.hgetall(k.account)
    acct = {text(a): text(b) for a, b in raw.items()}
    if not acct:
        return
    report.accounts += 1
    problems: list[str] = []
    balance = int(acct[AccountField.BALANCE])
    topups, _ = await _sum_stream(client, k.topups, "amount")
    spent_records, records = await _sum_stream(client, k.usage, "cost")
    cleared = int(acct.get(AccountField.CLEARED_SPENT) or 0)
    expected = topups - spent_records - cleared
    if balance != expected:
        problems.append(
            f"balance {format_micros(balance)} != top-ups {format_micros(topups)} - usage "
            f"{format_micros(spent_records + cleared)} = {format_micros(expected)}"
        )
    if int(acct.get(AccountField.TOPPED_UP) or 0) != topups:
        problems.append("topped_up total disagrees with the top-ups stream")
    if int(acct.get(AccountField.SPENT) or 0) != spent_records + cleared:
        problems.append("spent total disagrees with the usage records")
    holds: Any = await client.hgetall(k.holds)
    held = sum(int(v) for v in holds.values())
    if int(acct.get(AccountField.HELD) or 0) != held:
        problems.append(f"held {acct.get(AccountField.HELD)} != open holds {held}")
    stale: Any = await client.zrangebyscore(k.hold_leases, "-inf", now_ms() - LEASE_SLACK_MS)
    if stale:
        problems.append(
            f"{len(stale)} hold(s) older than their lease: {[text(s) for s in stale][:5]}"
        )
    for fields in records:
        record = UsageRecord.from_fields(fields)
        if record.usage_source == "upstream" and record.gateway_prompt_tokens:
            drift = report.drift[record.model or "?"]
            drift[0] += record.prompt_tokens
            drift[1] += record.gateway_prompt_tokens
            drift[2] += record.completion_tokens
            drift[3] += record.gateway_completion_tokens or 0
            drift[4] += record.cached_tokens
            drift[5] += record.cache_write_tokens
            drift[6] += record.reasoning_tokens
    if problems:
        report.failures[account_id] = problems


async def audit_store(client: aioredis.Redis) -> AuditReport:
    """Audit every account in the store."""
    report = AuditReport()
    async for key in client.scan_iter(match=ACCOUNT_KEY_PATTERN, count=500):
        await audit_account(client, account_id_of(text(key)), report)
    return report
