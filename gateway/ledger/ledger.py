"""The Ledger: typed Python calls onto the Lua scripts, and Redis errors made one error.

Each operation is one script (called by SHA; after a `NOSCRIPT` one EVAL runs and caches it
again), so each money change is atomic. Handlers never import redis: a store that does
not answer surfaces here as `LedgerUnavailable` (503, fail closed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import GatewayError
from gateway.ledger.keys import (
    ACCOUNT_KEY_PATTERN,
    ACCOUNTS,
    ACCOUNTS_BACKFILLED,
    HOLDS_DUE,
    IDEMPOTENCY_TTL_SECONDS,
    LIFECYCLE_DUE,
    OUTBOX_DUE,
    SETTLED_TTL_SECONDS,
    AccountField,
    account_id_of,
    account_index_member,
    account_keys,
    stream_id_after,
    valid_account_id,
)
from gateway.ledger.records import (
    AccountRecord,
    Admission,
    AdvanceResult,
    SettleResult,
    TokenCharge,
    TopupResult,
)
from gateway.ledger.transport import ScriptRunner, guard, text
from gateway.money import MAX_BALANCE_MICROS
from gateway.observability.logging import get_logger
from gateway.store.channel import ScriptChannel

__all__ = ["Ledger"]

log = get_logger("gateway.ledger")

# How long hold-index entries wait to go out together (see Ledger._index_hold).
INDEX_BATCH_SECONDS = 0.05
# The most account-index members one listing page reads (Ledger.list_accounts): a page with a
# state filter stops there, short, and its cursor goes on from where it stopped.
LIST_EXAMINE_MAX = 5000
# Accounts per round trip of the account-index backfill.
BACKFILL_BATCH = 1000


class Ledger:
    """Money operations on one Redis (or Redis Cluster) store."""

    def __init__(self, client: aioredis.Redis, channel: ScriptChannel | None = None) -> None:
        self.client = client
        self.channel = channel  # the scripts' pipelined connection (single-node stores)
        self.scripts = ScriptRunner(client, channel)
        self._background: set[asyncio.Task[None]] = set()
        self._index_pending: dict[str, int] = {}  # account -> earliest lease end to index
        self._index_timer: asyncio.TimerHandle | None = None
        self._backfill: asyncio.Task[None] | None = None  # the account-index backfill running

    @property
    def observe(self) -> Callable[[str, float], None] | None:
        """Called with (script name, seconds) after every script: the Redis latency metric."""
        return self.scripts.observe

    @observe.setter
    def observe(self, hook: Callable[[str, float], None] | None) -> None:
        self.scripts.observe = hook

    # accounts ---------------------------------------------------------------------------

    async def create_account(self, account_id: str, name: str, now_ms: int) -> bool:
        """Create an account; False if the id is taken. Its account-index member goes in first
        (keys.ACCOUNTS): a crash before the script leaves a member the listing skips, never an
        account the listing cannot find."""
        k = account_keys(account_id)
        member = account_index_member(account_id, now_ms)
        async with guard("index accounts"):
            await self.client.zadd(ACCOUNTS, {member: 0})
        if await self.scripts.run("create_account", [k.account], [account_id, name, now_ms]):
            return True
        await self._tidy_account_member(account_id, member)
        return False

    async def _tidy_account_member(self, account_id: str, member: str) -> None:
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
        return int(added)

    async def get_account(self, account_id: str) -> AccountRecord | None:
        k = account_keys(account_id)
        # Two plain reads (a cluster client runs no MULTI): a view, not a money decision.
        async with guard():
            reads: Any = await asyncio.gather(
                self.client.hgetall(k.account),
                self.client.smembers(k.subscriptions),
            )
        data, subs = reads
        if not data:
            return None
        return AccountRecord.from_hash(data, subs)

    async def topup(
        self,
        account_id: str,
        amount: int,
        fingerprint: str,
        idem_key: str,
        now_ms: int,
        topup_id: str,
    ) -> TopupResult:
        """Credit `amount`; with an idempotency key, at most once per key. Without one, the
        top-up's own id is the key: a client library that resends the script after a lost
        reply (redis-py retries once on a fresh connection) cannot credit it twice."""
        if not idem_key:
            idem_key, fingerprint = f"auto:{topup_id}", topup_id
        k = account_keys(account_id)
        keys = [k.account, k.idempotency(idem_key or "-"), k.topups, k.outbox]
        args = [
            amount,
            fingerprint,
            now_ms,
            IDEMPOTENCY_TTL_SECONDS,
            topup_id,
            account_id,
            MAX_BALANCE_MICROS,
        ]
        out = [text(x) for x in await self.scripts.run("topup", keys, args)]
        if out[0] not in ("ok", "replay"):
            return TopupResult(out[0])
        result = TopupResult(out[0], out[1], int(out[2]), int(out[3]), int(out[4]), int(out[5]))
        if result.events:
            await self.mark_due(OUTBOX_DUE, account_id, now_ms)
        return result

    # subscriptions ----------------------------------------------------------------------

    async def subscribe(self, account_id: str, model: str) -> str:
        """`created`, `exists`, `account_in_arrears` or `account_not_found`."""
        k = account_keys(account_id)
        return text(await self.scripts.run("subscribe", [k.account, k.subscriptions], [model]))

    async def unsubscribe(self, account_id: str, model: str) -> bool:
        k = account_keys(account_id)
        async with guard():
            return bool(await self.client.srem(k.subscriptions, model))

    # API keys ---------------------------------------------------------------------------

    async def add_api_key(self, account_id: str, key_id: str, key_hash: str, meta: bytes) -> None:
        k = account_keys(account_id)
        async with guard():  # metadata first: a key works only once both are written
            await self.client.hset(k.api_key_meta, key_id, meta)
            await self.client.hset(k.api_keys, key_id, key_hash)

    async def list_api_keys(self, account_id: str) -> dict[str, str]:
        """Key id -> its metadata JSON."""
        k = account_keys(account_id)
        async with guard():
            raw = await self.client.hgetall(k.api_key_meta)
        return {text(key): text(value) for key, value in raw.items()}

    async def revoke_api_key(self, account_id: str, key_id: str, meta: bytes) -> None:
        """The key stops working at once, on every instance: its hash is gone."""
        k = account_keys(account_id)
        async with guard():  # the hash first: the key stops working before anything else
            await self.client.hdel(k.api_keys, key_id)
            await self.client.hset(k.api_key_meta, key_id, meta)

    async def authenticate(
        self, account_id: str, key_id: str, key_hash: str
    ) -> tuple[str, tuple[str, ...]] | None:
        """(state, subscriptions) of the key's account, or None for a bad key."""
        k = account_keys(account_id)
        keys = [k.account, k.api_keys, k.subscriptions]
        out = [text(x) for x in await self.scripts.run("authenticate", keys, [key_id, key_hash])]
        if out[0] != "ok":
            return None
        return out[1], tuple(out[2:])

    async def set_rate_limits(
        self, account_id: str, requests: str, tokens: str, specs: tuple[str, str]
    ) -> None:
        """The account's own limits ("" falls back to the configured defaults), as written
        and as the admission script reads them (`specs`, see ratelimit.rule_spec)."""
        k = account_keys(account_id)
        async with guard():
            await self.client.hset(
                k.account,
                mapping={
                    AccountField.RL_REQUESTS: requests,
                    AccountField.RL_TOKENS: tokens,
                    AccountField.RL_REQUESTS_SPEC: specs[0],
                    AccountField.RL_TOKENS_SPEC: specs[1],
                },
            )

    async def get_rate_limits(self, account_id: str) -> tuple[str, str]:
        k = account_keys(account_id)
        async with guard():
            values: Any = await self.client.hmget(
                k.account, [AccountField.RL_REQUESTS, AccountField.RL_TOKENS]
            )
        return text(values[0] or b""), text(values[1] or b"")

    # notifications ----------------------------------------------------------------------

    async def set_notifications(
        self, account_id: str, preferences_json: bytes, low_threshold: int | None
    ) -> None:
        """Store the account's channels; a new threshold starts a fresh low-balance crossing."""
        k = account_keys(account_id)
        threshold = "" if low_threshold is None else str(low_threshold)
        async with guard():
            await self.client.set(k.notifications, preferences_json)
            await self.client.hset(
                k.account,
                mapping={AccountField.LOW_THRESHOLD: threshold, AccountField.LOW_NOTIFIED: ""},
            )

    async def dead_letters(self, account_id: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The account's deliveries that kept failing, oldest first."""
        k = account_keys(account_id)
        async with guard():
            entries: Any = await self.client.xrange(k.dead_letters, count=limit)
        return [
            (text(entry_id), {text(f): text(v) for f, v in fields.items()})
            for entry_id, fields in entries
        ]

    # calls ------------------------------------------------------------------------------

    async def reserve(
        self,
        account_id: str,
        key_id: str,
        key_hash: str,
        model: str,
        hold: int,
        request_id: str,
        lease_until_ms: int,
        dedicated: bool,
        hold_info: str,
        now_ms: int,
        tokens: int,
        rules: Sequence[str],
    ) -> Admission:
        """Authenticate, check and charge the rate limits (every rule of each), and hold, in
        one round trip. `rules`: the four limit specs of ratelimit.RateRules; `tokens`: the
        token limits' charge (the hold's estimate)."""
        k = account_keys(account_id)
        keys = [
            k.account,
            k.api_keys,
            k.subscriptions,
            k.holds,
            k.hold_leases,
            k.hold_info,
            k.rate("requests"),
            k.rate("tokens"),
            k.rate("requests", model),
            k.rate("tokens", model),
        ]
        args = [
            key_id,
            key_hash,
            model,
            hold,
            request_id,
            lease_until_ms,
            "1" if dedicated else "0",
            hold_info,
            now_ms,
            tokens,
            *rules,
        ]
        await self._index_before(account_id, lease_until_ms)
        out = [text(x) for x in await self.scripts.run("reserve", keys, args)]
        code = out[0]
        if code == "ok":
            charge = TokenCharge(model, tokens, (out[2], out[3]))
            return Admission("ok", held=int(out[1]), charge=charge, rate=tuple(out[4:10]))
        if code == "rate_limited":
            return Admission(code, retry_after_ms=int(out[1]), refused=out[2], rate=tuple(out[3:9]))
        if code == "insufficient_balance":
            return Admission(code, available=int(out[1]))
        return Admission(code)

    async def settle(
        self,
        account_id: str,
        request_id: str,
        cost: int,
        now_ms: int,
        record: Mapping[str, Any],
        only_if_lease_ended: bool = False,
        charge: TokenCharge | None = None,
        actual_tokens: int = 0,
    ) -> SettleResult:
        """Debit `cost`, release the hold, append `record`; a second call changes nothing.
        A sweeper passes `only_if_lease_ended`: a call whose gateway is alive is left alone.
        With `charge`, the token limits are corrected from its estimate to `actual_tokens`."""
        k = account_keys(account_id)
        model = charge.model if charge else ""
        keys = [
            k.account,
            k.holds,
            k.hold_leases,
            k.usage,
            k.settled(request_id),
            k.outbox,
            k.hold_info,
            k.checkpoints,
            k.rate("tokens"),
            k.rate("tokens", model),
        ]
        args: list[Any] = [
            request_id,
            cost,
            now_ms,
            SETTLED_TTL_SECONDS,
            account_id,
            "1" if only_if_lease_ended else "0",
            actual_tokens - charge.tokens if charge else 0,
            *(charge.windows if charge else ("", "")),
        ]
        for field, value in record.items():
            args.extend((field, value))
        out = [text(x) for x in await self.scripts.run("settle", keys, args)]
        if out[0] == "duplicate":
            return SettleResult("duplicate", int(out[1]))
        if out[0] != "ok":
            return SettleResult(out[0], cost)
        result = SettleResult("ok", cost, int(out[1]), out[2], out[3] == "1", int(out[4]))
        if result.frozen_now:
            await self.mark_due(LIFECYCLE_DUE, account_id, now_ms)
        if result.events:
            await self.mark_due(OUTBOX_DUE, account_id, now_ms)
        return result

    async def release(
        self, account_id: str, request_id: str, only_if_lease_ended_by: int | None = None
    ) -> bool:
        """Drop a hold without charging; False if there was none (or its lease is still on)."""
        k = account_keys(account_id)
        keys = [k.account, k.holds, k.hold_leases, k.hold_info, k.checkpoints]
        cutoff = "" if only_if_lease_ended_by is None else str(only_if_lease_ended_by)
        return int(await self.scripts.run("release", keys, [request_id, cutoff])) == 1

    async def checkpoint(
        self, account_id: str, request_id: str, completion_tokens: int, lease_until_ms: int
    ) -> bool:
        """Record a live call's progress and renew its lease; False once it is settled."""
        k = account_keys(account_id)
        keys = [k.holds, k.hold_leases, k.checkpoints]
        args = [request_id, completion_tokens, lease_until_ms]
        done = bool(await self.scripts.run("checkpoint", keys, args))
        if done:
            self._index_hold(account_id, lease_until_ms)
        return done

    async def extend(self, account_id: str, request_id: str, extra: int) -> bool:
        """Grow a live call's hold by `extra` if the available balance covers it."""
        k = account_keys(account_id)
        return int(await self.scripts.run("extend", [k.account, k.holds], [request_id, extra])) == 1

    async def _index_before(self, account_id: str, lease_until_ms: int) -> None:
        """Put the account in the hold index before the script that may place its hold, so a
        gateway that dies in between leaves an index entry (harmless: a sweeper finds no
        expired hold and drops it), never a hold nobody will look for. On the channel the ZADD
        is queued without a wait and leaves in the same write as the script (Redis runs one
        connection's pipelined commands in order, and no other client's between them: no
        extra round trip); on a cluster it is its own command to the index's node, first."""
        command = ("ZADD", HOLDS_DUE, "LT", lease_until_ms, account_id)
        if self.channel is not None and self.channel.send_nowait(*command) is not None:
            return
        async with guard("index holds"):
            await self.scripts.send(*command)

    def _index_hold(self, account_id: str, lease_until_ms: int) -> None:
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
            await self.client.zadd(index, dict(scores), lt=True)
        except (RedisError, OSError):
            return  # the periodic scan re-indexes them

    async def expired_holds(
        self, account_id: str, now_ms: int, limit: int = 100
    ) -> list[tuple[str, str, int]]:
        """(request id, hold info, checkpointed completion tokens) of holds whose lease ended."""
        k = account_keys(account_id)
        async with guard():
            ids: Any = await self.client.zrangebyscore(
                k.hold_leases, "-inf", now_ms, start=0, num=limit
            )
            if not ids:
                return []
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.hmget(k.hold_info, ids)
                pipe.hmget(k.checkpoints, ids)
                infos, cps = await pipe.execute()
        return [
            (text(rid), text(info or b""), int(cp or 0))
            for rid, info, cp in zip(ids, infos, cps, strict=True)
        ]

    async def reindex(self, account_id: str, now_ms: int) -> None:
        """Mark the account due in the lifecycle and outbox indexes if it is frozen or has
        events waiting: what a gateway that died between a settlement and those index writes
        left undone. The hold sweeper asks before it drops an account's hold-index entry (which
        every admission writes first), so no full scan is needed to find such an account."""
        k = account_keys(account_id)
        async with guard():
            found: Any = await asyncio.gather(
                self.client.hget(k.account, AccountField.STATE), self.client.xlen(k.outbox)
            )
        state, waiting = found
        if state == b"frozen":
            await self.mark_due(LIFECYCLE_DUE, account_id, now_ms)
        if waiting:
            await self.mark_due(OUTBOX_DUE, account_id, now_ms)

    async def next_lease_end(self, account_id: str) -> int | None:
        """When the account's earliest open hold's lease ends (ms), or None without holds."""
        k = account_keys(account_id)
        async with guard():
            first: Any = await self.client.zrange(k.hold_leases, 0, 0, withscores=True)
        return int(first[0][1]) if first else None

    # usage ------------------------------------------------------------------------------

    async def usage(
        self, account_id: str, limit: int, after: str | None
    ) -> tuple[list[tuple[str, dict[str, str]]], str | None]:
        """Up to `limit` usage records after cursor `after`, oldest first, and the cursor of the
        next page (None when there is no more)."""
        k = account_keys(account_id)
        start = stream_id_after(after) if after else "-"
        if start is None:
            return [], None
        async with guard():
            entries: Any = await self.client.xrange(k.usage, min=start, max="+", count=limit + 1)
        records = [
            (text(entry_id), {text(f): text(v) for f, v in fields.items()})
            for entry_id, fields in entries[:limit]
        ]
        cursor = records[-1][0] if len(entries) > limit else None
        return records, cursor

    # arrears lifecycle ------------------------------------------------------------------

    async def advance(
        self, account_id: str, now_ms: int, grace_ms: int, retention_ms: int
    ) -> AdvanceResult:
        """Take whatever arrears steps are due for the account (each happens once)."""
        k = account_keys(account_id)
        keys = [k.account, k.subscriptions, k.usage, k.outbox]
        args = [now_ms, grace_ms, retention_ms, account_id]
        out = [text(x) for x in await self.scripts.run("advance", keys, args)]
        result = AdvanceResult(out[0], out[1], int(out[2]), int(out[3]))
        if result.events:
            await self.mark_due(OUTBOX_DUE, account_id, now_ms)
        return result

    # global indexes ---------------------------------------------------------------------

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
        async with guard():
            await self.scripts.run_upkeep("remove_if_score", [index], [account_id, repr(score)])

    # locks ------------------------------------------------------------------------------

    async def lock(self, key: str, owner: str, ttl_ms: int) -> bool:
        async with guard():
            return bool(await self.client.set(key, owner, nx=True, px=ttl_ms))

    async def unlock(self, key: str, owner: str) -> None:
        async with guard():
            await self.scripts.run_upkeep("unlock", [key], [owner])
