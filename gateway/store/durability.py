"""When a write the store answered is on its disk: a group commit over Valkey's `WAITAOF`.

An `appendfsync always` store fsyncs before every reply, so each admission waits for the disk
too, and one slow fsync stalls every call at once (the p99 of benchmarks/README.md). Most
writes need no such wait: a hold the store loses in a crash costs nothing (its settlement
charges without one) and a rate-limit count is a minute's estimate. Money must not be lost:
settlements, releases and top-ups. So the store runs `everysec` and those writes are
confirmed instead: `confirm()` returns once every write the store answered before it was
called is in the append-only file on disk.

One round at a time serves every caller that arrived before it: a write to a marker key on the
round's own connection (WAITAOF waits for that connection's last write, which Redis ran after
every write answered earlier) and `WAITAOF 1 0 <timeout>`. A round waits for the store's
next fsync (at most about a second under `everysec`; 14 to 100 ms in a manual check on the
development machine), so one round trip confirms every settlement answered meanwhile.

Single-node stores only (embedded, `redis://`, `rediss://`, `unix://`): on a Redis Cluster
the marker and WAITAOF would reach one node, not the one holding an account's keys, so there
the nodes' own `appendfsync` holds (README, Store faults).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.observability.logging import get_logger

__all__ = ["MARK_KEY", "FsyncConfirmer", "confirmer_for"]

log = get_logger("gateway.store")

MARK_KEY = "gw:durability:mark"  # the ACL of README's store config allows gw:* keys
WAIT_MS = 1500  # under the client's 2 s socket timeout; everysec fsyncs at least every second


def _consume(future: asyncio.Future[None]) -> None:
    if not future.cancelled():
        future.exception()


class FsyncConfirmer:
    """Waits, in rounds shared by every caller, for the store's fsync of what it answered."""

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client
        self.rounds = 0  # completed rounds (a measure of the batching, for tests)
        self.unsupported = False  # the store keeps no append-only file: nothing to wait for
        self._next: asyncio.Future[None] | None = None  # the round new callers join
        self._runner: asyncio.Task[None] | None = None

    async def confirm(self) -> None:
        """Return when every write answered before this call is on the store's disk; raise
        the store client's error when that cannot be learnt (the store is away, or its fsync
        took longer than WAIT_MS)."""
        if self.unsupported:
            return
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
            self._next.add_done_callback(_consume)
        round_ = self._next
        if self._runner is None or self._runner.done():
            self._runner = asyncio.ensure_future(self._run())
        await asyncio.shield(round_)

    async def _run(self) -> None:
        while self._next is not None:
            round_, self._next = self._next, None
            try:
                await self._wait_fsync()
            except asyncio.CancelledError:  # closing: nobody is left waiting for nothing
                closed = RedisTimeoutError("the store connection is closing")
                for waiting in (round_, self._next):
                    if waiting is not None and not waiting.done():
                        waiting.set_exception(closed)
                self._next = None
                raise
            except Exception as exc:  # handed to the round's callers, who map it
                round_.set_exception(exc)
            else:
                self.rounds += 0 if self.unsupported else 1
                round_.set_result(None)

    async def _wait_fsync(self) -> None:
        if self.unsupported:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(MARK_KEY)
        pipe.execute_command("WAITAOF", 1, 0, WAIT_MS)
        try:
            replies: list[Any] = await pipe.execute(raise_on_error=True)
        except ResponseError as exc:
            # No append-only file, a Redis before 7.2 (no WAITAOF), or an ACL refusing it:
            # nothing to wait for, said once.
            self.unsupported = True
            log.warning(
                "the store cannot confirm its fsync: settlements and top-ups are acknowledged "
                "when it answers, and a crash of the store may lose what it had not written "
                "to disk",
                error=str(exc),
            )
            return
        local = int(replies[1][0])
        if local < 1:
            raise RedisTimeoutError(f"the store did not fsync within {WAIT_MS} ms")

    async def aclose(self) -> None:
        if self._runner is not None and not self._runner.done():
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner


def confirmer_for(client: aioredis.Redis) -> FsyncConfirmer | None:
    """The confirmer of a single-node store; None for a Redis Cluster (module docstring)."""
    store: object = client  # connect_store's cluster client is typed as a Redis
    return None if isinstance(store, RedisCluster) else FsyncConfirmer(client)
