"""The orphan sweeper: holds whose gateway died are settled from their last checkpoint.

A live call renews its hold's lease (with a checkpoint of the completion tokens seen so far)
more often than the lease lasts. A hold whose lease has ended therefore belongs to a call whose
gateway is gone: it is settled as an `orphaned` usage record for the prompt plus the
checkpointed tokens (the prompt alone when there is no checkpoint: the same rule as a client
that leaves before the first byte), at the price the call started with. The settle script
re-checks the lease, so a call that is alive after all is left alone, and each hold is settled
once whoever sweeps.

A lease also ends while the store is away, for calls whose gateway is alive and has their
settlement in its journal. So the sweeper bills nothing until the store has answered it for
`ORPHAN_GRACE_S` (every gateway's journal replays within about a second of the store's
return) and its own journal, dead gateways' segments included, owes nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from gateway.errors import LedgerUnavailable
from gateway.ledger import Ledger
from gateway.ledger.journal import SettlementJournal
from gateway.ledger.keys import HOLDS_DUE
from gateway.observability.logging import get_logger
from gateway.pricing import Prices, TokenUsage
from gateway.state import ConfigHolder
from gateway.timefmt import now_ms
from gateway.usage_record import UsageRecord

__all__ = ["HoldInfo", "OrphanSweeper"]

log = get_logger("gateway.holds")

BATCH = 200
# How long the store must have answered before an ended lease is taken for a dead gateway.
ORPHAN_GRACE_S = 3.0


@dataclass(slots=True)  # not frozen: slower to make, and one is made per call
class HoldInfo:
    """What the sweeper needs to bill a call without its gateway, kept beside its hold."""

    model: str
    prompt_tokens: int
    input_price: int  # micro-units per million tokens, of the sheet the call was admitted under
    output_price: int
    key_id: str
    stream: bool
    price_version: str = ""
    flat: int | None = None  # a passthrough call's price: what it is billed, whatever it did
    cap: int | None = None  # the client's cost cap: what the call is charged at most

    def encode(self) -> str:
        return "\t".join(
            (
                self.model,
                str(self.prompt_tokens),
                str(self.input_price),
                str(self.output_price),
                self.key_id,
                "1" if self.stream else "0",
                self.price_version,
                "" if self.flat is None else str(self.flat),
                "" if self.cap is None else str(self.cap),
            )
        )

    @classmethod
    def decode(cls, text: str) -> HoldInfo | None:
        """The info as written; None when there is none (settled meanwhile). Earlier versions
        wrote six fields (no price version) or seven (no flat price, no cap)."""
        parts = text.split("\t")
        if len(parts) not in (6, 7, 9):
            return None
        model, prompt, input_price, output_price, key_id, stream = parts[:6]
        version = parts[6] if len(parts) > 6 else ""
        flat, cap = (parts[7], parts[8]) if len(parts) == 9 else ("", "")
        return cls(
            model,
            int(prompt),
            int(input_price),
            int(output_price),
            key_id,
            stream == "1",
            version,
            int(flat) if flat else None,
            int(cap) if cap else None,
        )

    def cost(self, completion_tokens: int) -> int:
        """What the call is charged without its gateway: a passthrough call its price; any
        other its prompt and `completion_tokens` as uncached input and plain output at the
        prices it was admitted under; either no more than the client's cap."""
        if self.flat is not None:
            cost = self.flat
        else:
            prices = Prices.plain(self.price_version, self.input_price, self.output_price)
            cost = prices.cost(TokenUsage(self.prompt_tokens, completion_tokens))
        return cost if self.cap is None else min(cost, self.cap)


class OrphanSweeper:
    """Settles or releases holds whose lease has ended; safe with any number of instances."""

    def __init__(self, ledger: Ledger, config: ConfigHolder, journal: SettlementJournal) -> None:
        self.ledger = ledger
        self.config = config
        self.journal = journal
        self.reachable_since: float | None = None  # monotonic; None after a failed sweep

    async def sweep_once(self) -> int:
        """Handle every expired hold of the accounts due now; returns how many were settled."""
        settled = 0
        now = now_ms()
        due = await self.ledger.due(HOLDS_DUE, now, BATCH)
        if self.reachable_since is None:
            self.reachable_since = time.monotonic()
        if not due or time.monotonic() - self.reachable_since < ORPHAN_GRACE_S:
            return 0
        if not await self.journal.settled_up():
            return 0
        for account_id, score in due:
            for request_id, info, tokens in await self.ledger.expired_holds(account_id, now):
                settled += await self._orphan(account_id, request_id, info, tokens, now)
            next_end = await self.ledger.next_lease_end(account_id)
            if next_end is None:
                await self.ledger.reindex(account_id, now)
                await self.ledger.unmark(HOLDS_DUE, account_id, score)
                # A hold placed between the look and the unmark found the entry still there
                # (its ZADD LT kept the older score): look once more.
                next_end = await self.ledger.next_lease_end(account_id)
            if next_end is not None:
                await self.ledger.mark_due(HOLDS_DUE, account_id, max(next_end, now + 1))
        return settled

    async def _orphan(
        self, account_id: str, request_id: str, info: str, tokens: int, now: int
    ) -> int:
        held = HoldInfo.decode(info)
        if held is None:  # no hold info (settled meanwhile, or written by an old version)
            if await self.ledger.release(account_id, request_id, only_if_lease_ended_by=now):
                log.warning("orphaned hold released", account=account_id, request_id=request_id)
            return 0
        # Billed as the gateway would have billed it (HoldInfo.cost), from the checkpoint.
        tokens = 0 if held.flat is not None else tokens
        cost = held.cost(tokens)
        record = UsageRecord(
            request_id=request_id,
            time=now,
            kind="inference" if held.flat is None else "passthrough",
            model=held.model,
            prompt_tokens=held.prompt_tokens,
            completion_tokens=tokens,
            cost=cost,
            usage_source="gateway",
            status="orphaned",
            stream=held.stream,
            gateway_prompt_tokens=held.prompt_tokens,
            gateway_completion_tokens=tokens,
            key_id=held.key_id,
            price_version=held.price_version,
        ).fields()
        result = await self.ledger.settle(
            account_id, request_id, cost, now, record, only_if_lease_ended=True
        )
        if result.code == "ok":
            log.warning(
                "orphaned call settled from its checkpoint",
                account=account_id,
                request_id=request_id,
                completion_tokens=tokens,
            )
            return 1
        return 0

    async def run(self) -> None:
        """Sweep forever (a background task of the app)."""
        while True:
            try:
                await self.sweep_once()
            except LedgerUnavailable as exc:
                self.reachable_since = None
                log.warning("hold sweep skipped: store unavailable", error=str(exc))
            except Exception:
                log.exception("hold sweep failed")
            await asyncio.sleep(self.config.snapshot.settings.billing.sweep_interval)
