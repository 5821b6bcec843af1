"""Keeps a live call's hold alive, with a checkpoint of the completion tokens seen so far.

The lease is renewed every third of `billing.hold_lease`, and a stream also checkpoints every
`billing.checkpoint_tokens` content pieces, so a gateway killed mid-stream loses at most about
that many tokens of billing: the orphan sweeper settles the hold from its last checkpoint.
Checkpoints are written off the relay's path, one at a time; a failed one is simply retried by
the next.
"""

from __future__ import annotations

import asyncio
import contextlib

import tiktoken

from gateway.errors import GatewayError
from gateway.ledger import Ledger
from gateway.metering.completion import CompletionMeter
from gateway.timefmt import now_ms

__all__ = ["LeaseKeeper"]


class LeaseKeeper:
    """Renews one call's lease and checkpoints its progress until stopped."""

    __slots__ = (
        "_every",
        "_lease_ms",
        "_seen",
        "_task",
        "_timer",
        "account_id",
        "encoding",
        "ledger",
        "meter",
        "request_id",
        "tokens",
    )

    def __init__(
        self,
        ledger: Ledger,
        account_id: str,
        request_id: str,
        meter: CompletionMeter,
        encoding: tiktoken.Encoding,
        lease_s: float,
        every_tokens: int,
    ) -> None:
        self.ledger = ledger
        self.account_id = account_id
        self.request_id = request_id
        self.meter = meter
        self.encoding = encoding
        self._lease_ms = int(lease_s * 1000)
        self._every = every_tokens
        self._seen = 0  # how many of the meter's text pieces are counted in `tokens`
        self.tokens = 0  # completion tokens checkpointed so far
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._arm()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._lease_ms / 3000, self._on_timer)

    def _on_timer(self) -> None:
        self.checkpoint()
        self._arm()

    def on_chunk(self) -> None:
        """After each relayed chunk: checkpoint when enough new pieces have passed."""
        if len(self.meter.texts) - self._seen >= self._every:
            self.checkpoint()

    def checkpoint(self) -> None:
        """Write the progress so far (unless a write is already in flight)."""
        if self._task is not None and not self._task.done():
            return
        texts = self.meter.texts
        if len(texts) > self._seen:
            self.tokens += len(self.encoding.encode_ordinary("".join(texts[self._seen :])))
            self._seen = len(texts)
        self._task = asyncio.ensure_future(self._write(self.tokens, now_ms() + self._lease_ms))

    async def _write(self, tokens: int, lease_until: int) -> None:
        with contextlib.suppress(GatewayError):  # unavailable or refused: the next one retries
            await self.ledger.checkpoint(self.account_id, self.request_id, tokens, lease_until)

    def stop(self) -> None:
        """The call is over: no more renewals (an in-flight write finds the hold gone)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
