"""The arrears timer: frozen accounts move grace -> retention -> cleared when due.

Every gateway instance runs it. Safety does not depend on coordination: each step is one
conditional Lua script (`advance.lua`), so whoever runs it first makes the step and the others
find nothing to do; an instance that dies mid-sweep leaves nothing locked.
"""

from __future__ import annotations

import asyncio

from gateway.errors import LedgerUnavailable
from gateway.ledger import Ledger
from gateway.ledger.keys import LIFECYCLE_DUE
from gateway.observability.logging import get_logger
from gateway.state import ConfigHolder
from gateway.timefmt import now_ms

__all__ = ["LifecycleSweeper"]

log = get_logger("gateway.lifecycle")

BATCH = 200


class LifecycleSweeper:
    """Advances due accounts every `billing.sweep_interval`."""

    def __init__(self, ledger: Ledger, config: ConfigHolder) -> None:
        self.ledger = ledger
        self.config = config

    async def sweep_once(self) -> int:
        """Advance every account whose step is due; return how many steps were taken."""
        billing = self.config.snapshot.settings.billing
        grace_ms = int(billing.grace_period * 1000)
        retention_ms = int(billing.retention_period * 1000)
        steps = 0
        now = now_ms()
        for account_id, score in await self.ledger.due(LIFECYCLE_DUE, now, BATCH):
            result = await self.ledger.advance(account_id, now, grace_ms, retention_ms)
            steps += result.events
            if result.code == "frozen":
                await self.ledger.mark_due(LIFECYCLE_DUE, account_id, result.next_due_ms)
            else:
                await self.ledger.unmark(LIFECYCLE_DUE, account_id, score)
        return steps

    async def run(self) -> None:
        """Sweep forever (a background task of the app)."""
        while True:
            try:
                steps = await self.sweep_once()
                if steps:
                    log.info("arrears steps taken", steps=steps)
            except LedgerUnavailable as exc:
                log.warning("lifecycle sweep skipped: store unavailable", error=str(exc))
            except Exception:
                log.exception("lifecycle sweep failed")
            await asyncio.sleep(self.config.snapshot.settings.billing.sweep_interval)
