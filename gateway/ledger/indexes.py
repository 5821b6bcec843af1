"""The store-wide indexes and the locks: how the ledger finds accounts without scanning.

The money scripts work inside one account's slot; what spans accounts lives here, each in its
own slot: the account index (for the admin listing, with its backfill), the due indexes (the
arrears lifecycle, the outbox, the hold leases) and the locks of the instances that work them.
Their writes are placed around the scripts so a crash in between leaves an entry nobody
needs (which a reader skips or drops), never an account or hold nobody can find.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any

from gateway.errors import GatewayError
from gateway.ledger.keys import (
    ACCOUNT_IDS,
    ACCOUNT_IDS_BACKFILLED,
    ACCOUNT_KEY_PATTERN,
    ACCOUNTS,
    ACCOUNTS_BACKFILLED,
    HOLDS_DUE,
    AccountField,
    account_id_of,
    account_index_member,
    account_keys,
    valid_account_id,
)
from gateway.ledger.records import AccountRecord
from gateway.ledger.transport import ScriptRunner, guard, text
from gateway.observability.logging import get_logger

__all__ = ["BACKFILL_BATCH", "INDEX_BATCH_SECONDS", "LIST_EXAMINE_MAX", "Indexes"]

log = get_logger("gateway.ledger")

# How long hold-index entries wait to go out together (see Indexes.index_hold).
INDEX_BATCH_SECONDS = 0.05
# The most account-index members one listing page reads (Indexes.list_accounts): a page with a
# state filter stops there, short, and its cursor goes on from where it stopped.
LIST_EXAMINE_MAX = 5000
# Accounts per round trip of the account-index backfill.
BACKFILL_BATCH = 1000


class Indexes:
    """The indexes and locks of one store, written and read through one ScriptRunner."""

    def __init__(self, scripts: ScriptRunner) -> None:
        self.scripts = scripts
        self.client = scripts.client
        self._background: set[asyncio.Task[None]] = set()
        self._index_pending: dict[str, int] = {}  # account -> earliest lease end to index
        self._index_timer: asyncio.TimerHandle | None = None
        self._backfill: asyncio.Task[None] | None = None  # the account-index backfill running

    # the account index ------------------------------------------------------------------

    async def add_account(self, account_id: str, created_ms: int) -> str:
        """Write the account-index member of an account about to be created at `created_ms`
        (before its creation: see keys.ACCOUNTS); the member, for `tidy_account`."""
        member = account_index_member(account_id, created_ms)
        async with guard("index accounts"):
            await self.client.zadd(ACCOUNTS, {member: 0})
            await self.client.zadd(ACCOUNT_IDS, {account_id: 0})
        return member

    async def ids_by_prefix(
        self, prefix: str, limit: int, after: str | None = None
    ) -> tuple[list[str], str | None]:
        """Up to `limit` account ids that start with `prefix` (a valid id's characters), in
        id order, after id `after`; and the id to continue after (None: no more). An id whose
        creation was refused may be listed: its account does not exist."""
        await self._ensure_ids_backfilled()
        low = f"({after}" if after else f"[{prefix}"
        async with guard("search accounts"):
            found: Any = await self.client.zrangebylex(
                ACCOUNT_IDS, low, f"[{prefix}\xff", start=0, num=limit + 1
            )
        ids = [text(x) for x in found]
        return ids[:limit], (ids[limit - 1] if len(ids) > limit else None)

    async def _ensure_ids_backfilled(self) -> None:
        """Fill ACCOUNT_IDS from the account index once (a store from a version without it):
        idempotent, so instances racing to do it do no harm."""
        async with guard("backfill the account-id index"):
            if await self.client.exists(ACCOUNT_IDS_BACKFILLED):
                return
            await self.ensure_accounts_backfilled()
            start = 0
            while True:
                members: Any = await self.client.zrange(ACCOUNTS, start, start + BACKFILL_BATCH - 1)
                if not members:
                    break
                ids = {text(m).split(":", 1)[1]: 0 for m in members}
                await self.client.zadd(ACCOUNT_IDS, ids)
                start += len(members)
            await self.client.set(ACCOUNT_IDS_BACKFILLED, "1")

    async def tidy_account(self, account_id: str, member: str) -> None:
        """After a refused creation: drop the member it wrote unless it is the account's own
        (a resent script refuses the creation its first run made), and make sure the account
        that holds the id has its member (one made before the index existed may not yet).
        Tidying only: the listing skips such a member anyway, so a store error is logged."""
        try:
            async with guard("index accounts"):
                created: Any = await self.client.hget(
                    account_keys(account_id).account, AccountField.CREATED_AT
                )
                if created is None or not text(created).isdigit():
                    return
                own = account_index_member(account_id, int(created))
                if own != member:
                    await self.client.zadd(ACCOUNTS, {own: 0})
                    await self.client.zrem(ACCOUNTS, member)
        except GatewayError as exc:
            log.warning("account index not tidied", account=account_id, error=str(exc))

    async def list_accounts(
        self, limit: int, after: str | None, state: str | None = None
    ) -> tuple[list[AccountRecord], str | None]:
        """Up to `limit` accounts after cursor `after` (an account-index member) in creation
        order, then id order, only those in `state` when it is given, and the cursor of the
        next page (None when there is no more). A walk that follows the cursors sees every
        account that existed when it started exactly once, whatever is created meanwhile. A
        page reads at most LIST_EXAMINE_MAX index members: with a state filter it may hold
        fewer than `limit` accounts, none even, and still have a next page."""
        await self.ensure_accounts_backfilled()
        found: list[AccountRecord] = []
        cursor, examined = after, 0
        while True:
            want = limit - len(found)
            chunk = min(max(want, 100) if state else want, LIST_EXAMINE_MAX - examined)
            async with guard():
                raw: Any = await self.client.zrangebylex(
                    ACCOUNTS, f"({cursor}" if cursor else "-", "+", start=0, num=chunk
                )
            members = [text(m) for m in raw]
            records = await self._indexed_accounts(members)
            taken = 0
            for member, record in zip(members, records, strict=True):
                taken, cursor = taken + 1, member
                if record is not None and (state is None or record.state == state):
                    found.append(record)
                    if len(found) == limit:
                        break
            examined += taken
            if taken == len(members) and len(members) < chunk:
                return found, None  # the index has no more
            if len(found) == limit or examined >= LIST_EXAMINE_MAX:
                if taken < len(members):
                    return found, cursor
                async with guard():
                    more: Any = await self.client.zrangebylex(
                        ACCOUNTS, f"({cursor}", "+", start=0, num=1
                    )
                return found, cursor if more else None

    async def _indexed_accounts(self, members: Sequence[str]) -> list[AccountRecord | None]:
        """The account behind each index member; None for a member no account stands behind
        (its creation never ran, or another creation of the id won: created_at differs)."""
        ids = [member.partition(":")[2] for member in members]
        wanted = [account_id for account_id in ids if valid_account_id(account_id)]
        replies: list[Any] = []
        if wanted:
            async with guard(), self.client.pipeline(transaction=False) as pipe:
                for account_id in wanted:
                    k = account_keys(account_id)
                    pipe.hgetall(k.account)
                    pipe.smembers(k.subscriptions)
                replies = await pipe.execute()
        found = {
            account_id: AccountRecord.from_hash(data, subs)
            for account_id, data, subs in zip(wanted, replies[::2], replies[1::2], strict=True)
            if data
        }
        out: list[AccountRecord | None] = []
        for member, account_id in zip(members, ids, strict=True):
            record = found.get(account_id)
            if record is not None and account_index_member(record.id, record.created_at) != member:
                record = None
            out.append(record)
        return out

    async def ensure_accounts_backfilled(self) -> None:
        """Run the account-index backfill unless a run has finished (ACCOUNTS_BACKFILLED is
        set). One run per instance at a time, shielded: a listing that gives up waiting does
        not stop it."""
        async with guard():
            if await self.client.exists(ACCOUNTS_BACKFILLED):
                return
        if self._backfill is None or self._backfill.done():
            self._backfill = asyncio.ensure_future(self._run_backfill())
            # Its failure reaches the listings waiting; if none still is, it is dropped here.
            self._backfill.add_done_callback(lambda task: task.cancelled() or task.exception())
        await asyncio.shield(self._backfill)

    async def _run_backfill(self) -> None:
        started = time.perf_counter()
        added = await self.backfill_accounts_index()
        async with guard():
            await self.client.set(ACCOUNTS_BACKFILLED, int(time.time() * 1000))
        log.info(
            "account index backfilled",
            added=added,
            seconds=round(time.perf_counter() - started, 3),
        )

    async def backfill_accounts_index(self) -> int:
        """Put every account of the store in the account index (a SCAN of every primary on a
        cluster); the number of members it added. Idempotent, and safe while accounts are
        created (their members go in before them)."""
        added = 0
        batch: list[str] = []
        async with guard("backfill the account index"):
            async for key in self.client.scan_iter(match=ACCOUNT_KEY_PATTERN, count=1000):
                account_id = account_id_of(text(key))
                # The pattern's `*` matches more than an id: keep only an account's own hash.
                if valid_account_id(account_id) and account_keys(account_id).account == text(key):
                    batch.append(account_id)
                if len(batch) >= BACKFILL_BATCH:
                    added += await self._index_accounts(batch)
                    batch = []
            if batch:
                added += await self._index_accounts(batch)
        return added

    async def _index_accounts(self, ids: Sequence[str]) -> int:
        async with self.client.pipeline(transaction=False) as pipe:
            for account_id in ids:
                pipe.hget(account_keys(account_id).account, AccountField.CREATED_AT)
            times: list[Any] = await pipe.execute()
        members = {
            account_index_member(account_id, int(text(created))): 0
            for account_id, created in zip(ids, times, strict=True)
            if created is not None and text(created).isdigit()
        }
        if not members:
            return 0
        added: Any = await self.client.zadd(ACCOUNTS, members)
        await self.client.zadd(ACCOUNT_IDS, {member.split(":", 1)[1]: 0 for member in members})
        return int(added)

    # the due indexes --------------------------------------------------------------------

    async def mark_due(self, index: str, account_id: str, at_ms: int) -> None:
        """Put the account in `index` (lifecycle or outbox), due at `at_ms`."""
        async with guard():
            await self.client.zadd(index, {account_id: at_ms})

    async def due(self, index: str, now_ms: int, limit: int) -> list[tuple[str, float]]:
        """Accounts of `index` due by `now_ms`, with the score they were read at."""
        async with guard():
            rows: Any = await self.client.zrangebyscore(
                index, "-inf", now_ms, start=0, num=limit, withscores=True
            )
        return [(text(member), float(score)) for member, score in rows]

    async def unmark(self, index: str, account_id: str, score: float) -> None:
        """Remove the account from `index` unless it was re-marked since `score` was read."""
        await self.scripts.run_upkeep("remove_if_score", [index], [account_id, repr(score)])

    # the hold index ---------------------------------------------------------------------

    async def index_before(self, account_id: str, lease_until_ms: int) -> None:
        """Put the account in the hold index before the script that may place its hold, so a
        gateway that dies in between leaves an index entry (harmless: a sweeper finds no
        expired hold and drops it), never a hold nobody will look for. On the channel the ZADD
        is queued without a wait and leaves in the same write as the script (Redis runs one
        connection's pipelined commands in order, and no other client's between them: no
        extra round trip); on a cluster it is its own command to the index's node, first."""
        command = ("ZADD", HOLDS_DUE, "LT", lease_until_ms, account_id)
        channel = self.scripts.channel
        if channel is not None and channel.send_nowait(*command) is not None:
            return
        async with guard("index holds"):
            await self.scripts.send(*command)

    def index_hold(self, account_id: str, lease_until_ms: int) -> None:
        """Note (without waiting) when a renewed lease ends. Batched: every account noted
        within INDEX_BATCH_SECONDS goes out in one ZADD. A crash before a batch lands loses
        nothing: the entry written at admission is still there, and the sweeper that visits it
        finds the hold's renewed lease and re-marks it."""
        pending = self._index_pending
        earlier = pending.get(account_id)
        if earlier is None or lease_until_ms < earlier:
            pending[account_id] = lease_until_ms
        if self._index_timer is None:
            loop = asyncio.get_running_loop()
            self._index_timer = loop.call_later(INDEX_BATCH_SECONDS, self._flush_index)

    def _flush_index(self) -> None:
        self._index_timer = None
        batch, self._index_pending = self._index_pending, {}
        task = asyncio.ensure_future(self._mark_earliest(HOLDS_DUE, batch))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _mark_earliest(self, index: str, scores: Mapping[str, int]) -> None:
        try:
            async with guard("index holds"):
                await self.client.zadd(index, dict(scores), lt=True)
        except GatewayError:
            return  # the periodic scan re-indexes them

    # locks ------------------------------------------------------------------------------

    async def lock(self, key: str, owner: str, ttl_ms: int) -> bool:
        """Take lock `key` for `owner` for `ttl_ms` unless someone holds it; True if taken."""
        async with guard():
            return bool(await self.client.set(key, owner, nx=True, px=ttl_ms))

    async def unlock(self, key: str, owner: str) -> None:
        """Release lock `key` if `owner` still holds it (its TTL may have given it away)."""
        await self.scripts.run_upkeep("unlock", [key], [owner])
