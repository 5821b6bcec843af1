"""The Ledger: the money operations, typed Python calls onto the Lua scripts.

Each operation is one script (run by `transport.ScriptRunner`), so each money change is
atomic; the plain reads and writes around them (accounts, API keys, usage, holds, the outbox)
go through the same error mapping (`transport.guard`). Handlers never import redis: a store
that does not answer surfaces here as `LedgerUnavailable` (503, fail closed). The indexes and
locks are `indexes.Indexes`, which the Ledger owns and hands on to its callers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis

from gateway.ledger.indexes import Indexes
from gateway.ledger.keys import (
    IDEMPOTENCY_TTL_SECONDS,
    LIFECYCLE_DUE,
    OUTBOX_DUE,
    SETTLED_TTL_SECONDS,
    AccountField,
    account_keys,
    stream_id_after,
)
from gateway.ledger.records import (
    AccountRecord,
    Admission,
    AdvanceResult,
    KeyBudgetState,
    KeyLimits,
    KeySpend,
    Reservation,
    SettleResult,
    TokenCharge,
    TopupResult,
)
from gateway.ledger.transport import ScriptRunner, guard, stream_entries, text
from gateway.money import MAX_BALANCE_MICROS
from gateway.store.channel import ScriptChannel
from gateway.store.durability import FsyncConfirmer

__all__ = ["Ledger"]


class Ledger:
    """Money operations on one Redis (or Redis Cluster) store."""

    def __init__(
        self,
        client: aioredis.Redis,
        channel: ScriptChannel | None = None,
        confirmer: FsyncConfirmer | None = None,
    ) -> None:
        self.client = client
        self.channel = channel  # the scripts' pipelined connection (single-node stores)
        # Confirms that answered writes are on the store's disk (single-node stores; None on
        # a cluster, whose nodes' own appendfsync holds).
        self.confirmer = confirmer
        self.scripts = ScriptRunner(client, channel)
        self.indexes = Indexes(self.scripts)
        # How long a settled request id is remembered (history.settled_ttl with history on).
        self.settled_ttl = SETTLED_TTL_SECONDS

    @property
    def observe(self) -> Callable[[str, float], None] | None:
        """Called with (script name, seconds) after every script: the Redis latency metric."""
        return self.scripts.observe

    @observe.setter
    def observe(self, hook: Callable[[str, float], None] | None) -> None:
        self.scripts.observe = hook

    async def confirm(self) -> None:
        """Return once every write the store answered before this call is on its disk
        (`FsyncConfirmer`); LedgerUnavailable when that cannot be learnt. Settlements and
        releases (through the journal), top-ups and key changes wait for it; admissions do
        not: a hold lost in a crash of the store costs nothing."""
        if self.confirmer is not None:
            async with guard("confirm"):
                await self.confirmer.confirm()

    # accounts ---------------------------------------------------------------------------

    async def create_account(self, account_id: str, name: str, now_ms: int) -> bool:
        """Create an account; False if the id is taken. Its account-index member goes in first
        (keys.ACCOUNTS): a crash before the script leaves a member the listing skips, never an
        account the listing cannot find."""
        k = account_keys(account_id)
        member = await self.indexes.add_account(account_id, now_ms)
        if await self.scripts.run("create_account", [k.account], [account_id, name, now_ms]):
            return True
        await self.indexes.tidy_account(account_id, member)
        return False

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
        await self.confirm()  # a credit is answered only once a crash cannot undo it
        if result.events:
            await self.indexes.mark_due(OUTBOX_DUE, account_id, now_ms)
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

    async def write_key(
        self,
        account_id: str,
        key_id: str,
        meta: bytes,
        limits: KeyLimits | None = None,
        key_hash: str = "",
        previous_until_ms: int | None = None,
    ) -> str:
        """Write a key's metadata with its limits in one step. Without `key_hash`, an update
        of an existing key's limits; with `limits`, a new key; else a rotation: the new hash
        replaces the old, which stays valid until `previous_until_ms` (None: not at all).
        Answers `ok`, `account_not_found`, `key_not_found` or `key_revoked`."""
        k = account_keys(account_id)
        mode = "update" if not key_hash else ("create" if limits is not None else "rotate")
        until = "" if previous_until_ms is None else str(previous_until_ms)
        fields = (limits or KeyLimits()).fields()
        keys = [k.account, k.api_keys, k.api_key_meta, k.key_limits]
        args = [mode, key_id, meta, key_hash, until, *fields]
        outcome = text(await self.scripts.run_upkeep("write_key", keys, args))
        await self.confirm()  # a new secret, limit or rotation a store crash cannot undo
        return outcome

    async def list_api_keys(self, account_id: str) -> dict[str, str]:
        """Key id -> its metadata JSON."""
        k = account_keys(account_id)
        async with guard():
            raw = await self.client.hgetall(k.api_key_meta)
        return {text(key): text(value) for key, value in raw.items()}

    async def key_spend(
        self, account_id: str, key_ids: Sequence[str], now_ms: int
    ) -> dict[str, KeySpend]:
        """Each key's spend in its current budget period and its open holds, as admission
        sees them at `now_ms`."""
        if not key_ids:
            return {}
        k = account_keys(account_id)
        reply = await self.scripts.run_upkeep(
            "key_status", [k.key_limits, k.key_spend], [now_ms, *key_ids]
        )
        out = [int(x) if text(x) else None for x in reply]
        spends: dict[str, KeySpend] = {}
        for i, key_id in enumerate(key_ids):
            spent, held, total, start, stop = out[5 * i : 5 * i + 5]
            spends[key_id] = KeySpend(spent or 0, held or 0, total or 0, start or 0, stop)
        return spends

    async def revoke_api_key(self, account_id: str, key_id: str, meta: bytes) -> None:
        """The key stops working at once, on every instance: its hash is gone (and the
        previous one of a rotation in its grace)."""
        k = account_keys(account_id)
        async with guard():  # the hashes first: the key stops working before anything else
            await self.client.hdel(k.api_keys, key_id, f"{key_id}:prev")
            await self.client.hset(k.api_key_meta, key_id, meta)
        await self.confirm()  # a crash of the store must not bring the key back

    async def authenticate(
        self, account_id: str, key_id: str, key_hash: str, now_ms: int
    ) -> tuple[str, tuple[str, ...], tuple[str, ...] | None] | str:
        """(state, subscriptions, the models the key may call or None for all) of the key's
        account, or the refusal's code: `invalid_api_key` or `key_expired`."""
        k = account_keys(account_id)
        keys = [k.account, k.api_keys, k.subscriptions, k.key_limits]
        args = [key_id, key_hash, now_ms]
        out = [text(x) for x in await self.scripts.run("authenticate", keys, args)]
        if out[0] != "ok":
            return out[0]
        models = None if out[2] == "*" else tuple(out[2].split("\n"))
        return out[1], tuple(out[3:]), models

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

    async def get_notifications(self, account_id: str) -> bytes | None:
        """The JSON `set_notifications` stored for the account, or None when it has set none."""
        async with guard():
            raw: Any = await self.client.get(account_keys(account_id).notifications)
        return None if raw is None else bytes(raw)

    # the outbox (what the notifier delivers) --------------------------------------------

    async def outbox(self, account_id: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        """Up to `limit` of the account's events waiting for delivery, oldest first."""
        async with guard():
            entries: Any = await self.client.xrange(account_keys(account_id).outbox, count=limit)
        return stream_entries(entries)

    async def outbox_waiting(self, account_id: str) -> int:
        """How many of the account's events wait for delivery."""
        async with guard():
            waiting: Any = await self.client.xlen(account_keys(account_id).outbox)
        return int(waiting)

    async def delivery_state(self, account_id: str, field: str) -> str | None:
        """Where one delivery stands (`field`: `<event id>|<channel id>`, see
        keys.AccountKeys.deliveries): `done`, `dead`, `<attempts>:<next try ms>`, or None
        before its first try."""
        async with guard():
            state: Any = await self.client.hget(account_keys(account_id).deliveries, field)
        return None if state is None else text(state)

    async def set_delivery_state(self, account_id: str, field: str, state: str) -> None:
        async with guard():
            await self.client.hset(account_keys(account_id).deliveries, field, state)

    async def drop_event(self, account_id: str, event_id: str, fields: Sequence[str]) -> None:
        """An event that every channel has had leaves the outbox, then its deliveries' states
        (`fields`) go: a crash in between leaves states that no event refers to."""
        k = account_keys(account_id)
        async with guard():
            await self.client.xdel(k.outbox, event_id)
            if fields:
                await self.client.hdel(k.deliveries, *fields)

    async def add_dead_letter(
        self, account_id: str, entry: Mapping[str, bytes | str | int]
    ) -> None:
        """Keep a delivery that kept failing, for the admin API (`dead_letters`)."""
        fields: dict[Any, Any] = dict(entry)
        async with guard():
            await self.client.xadd(account_keys(account_id).dead_letters, fields)

    async def dead_letters(self, account_id: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The account's deliveries that kept failing, oldest first."""
        k = account_keys(account_id)
        async with guard():
            entries: Any = await self.client.xrange(k.dead_letters, count=limit)
        return stream_entries(entries)

    # calls ------------------------------------------------------------------------------

    async def reserve(self, reservation: Reservation) -> Admission:
        """Authenticate, check and charge the rate limits (every rule of each), and hold, in
        one round trip (see Reservation)."""
        r = reservation
        k = account_keys(r.account_id)
        keys = [
            k.account,
            k.api_keys,
            k.subscriptions,
            k.holds,
            k.hold_leases,
            k.hold_info,
            k.rate("requests"),
            k.rate("tokens"),
            k.rate("requests", r.model),
            k.rate("tokens", r.model),
            k.key_limits,
            k.key_spend,
            k.key_rate(r.key_id, "requests"),
            k.key_rate(r.key_id, "tokens"),
        ]
        args = [
            r.key_id,
            r.key_hash,
            r.model,
            r.hold,
            r.request_id,
            r.lease_until_ms,
            "1" if r.dedicated else "0",
            r.hold_info,
            r.now_ms,
            r.tokens,
            *r.rules,
        ]
        await self.indexes.index_before(r.account_id, r.lease_until_ms)
        out = [text(x) for x in await self.scripts.run("reserve", keys, args)]
        code = out[0]
        if code == "ok":
            charge = TokenCharge(r.model, r.tokens, (out[2], out[3], out[11]))
            return Admission(
                "ok",
                held=int(out[1]),
                available=int(out[10]),  # after the hold is placed
                charge=charge,
                rate=tuple(out[4:10]),
                bounded=out[12] == "1",
            )
        if code == "rate_limited":
            return Admission(code, retry_after_ms=int(out[1]), refused=out[2], rate=tuple(out[3:9]))
        if code == "insufficient_balance":
            return Admission(code, available=int(out[1]))
        if code == "key_budget_exceeded":
            end = int(out[4]) if out[4] else None
            state = KeyBudgetState(int(out[1]), int(out[2]), int(out[3]), end)
            return Admission(code, budget=state)
        if code == "key_expired":
            return Admission(code, expired_ms=int(out[1]))
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
        key_id = str(record.get("key_id") or "")
        windows = charge.windows if charge else ("", "", "")
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
            k.key_limits,
            k.key_spend,
            k.key_rate(key_id, "tokens") if key_id else k.key_spend,
        ]
        args: list[Any] = [
            request_id,
            cost,
            now_ms,
            self.settled_ttl,
            account_id,
            "1" if only_if_lease_ended else "0",
            actual_tokens - charge.tokens if charge else 0,
            windows[0],
            windows[1],
            key_id,
            windows[2] if key_id else "",
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
            await self.indexes.mark_due(LIFECYCLE_DUE, account_id, now_ms)
        if result.events:
            await self.indexes.mark_due(OUTBOX_DUE, account_id, now_ms)
        return result

    async def release(
        self, account_id: str, request_id: str, only_if_lease_ended_by: int | None = None
    ) -> bool:
        """Drop a hold without charging; False if there was none (or its lease is still on)."""
        k = account_keys(account_id)
        keys = [k.account, k.holds, k.hold_leases, k.hold_info, k.checkpoints, k.key_spend]
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
            self.indexes.index_hold(account_id, lease_until_ms)
        return done

    async def extend(self, account_id: str, request_id: str, extra: int, now_ms: int) -> bool:
        """Grow a live call's hold by `extra` if the available balance covers it, and its
        key's budget (in the period holding `now_ms`)."""
        k = account_keys(account_id)
        keys = [k.account, k.holds, k.key_limits, k.key_spend]
        return int(await self.scripts.run("extend", keys, [request_id, extra, now_ms])) == 1

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
            await self.indexes.mark_due(LIFECYCLE_DUE, account_id, now_ms)
        if waiting:
            await self.indexes.mark_due(OUTBOX_DUE, account_id, now_ms)

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
        records = stream_entries(entries[:limit])
        cursor = records[-1][0] if len(entries) > limit else None
        return records, cursor

    async def recent_usage(self, account_id: str, limit: int) -> list[tuple[str, dict[str, str]]]:
        """The account's newest `limit` usage records still in the store, newest first."""
        async with guard():
            entries: Any = await self.client.xrevrange(account_keys(account_id).usage, count=limit)
        return stream_entries(entries)

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
            await self.indexes.mark_due(OUTBOX_DUE, account_id, now_ms)
        return result

    # indexes and locks: done by Indexes, offered here to the ledger's callers -----------

    async def list_accounts(
        self, limit: int, after: str | None, state: str | None = None
    ) -> tuple[list[AccountRecord], str | None]:
        return await self.indexes.list_accounts(limit, after, state)

    async def ids_by_prefix(
        self, prefix: str, limit: int, after: str | None = None
    ) -> tuple[list[str], str | None]:
        return await self.indexes.ids_by_prefix(prefix, limit, after)

    async def ensure_accounts_backfilled(self) -> None:
        await self.indexes.ensure_accounts_backfilled()

    async def backfill_accounts_index(self) -> int:
        return await self.indexes.backfill_accounts_index()

    async def mark_due(self, index: str, account_id: str, at_ms: int) -> None:
        await self.indexes.mark_due(index, account_id, at_ms)

    async def due(self, index: str, now_ms: int, limit: int) -> list[tuple[str, float]]:
        return await self.indexes.due(index, now_ms, limit)

    async def unmark(self, index: str, account_id: str, score: float) -> None:
        await self.indexes.unmark(index, account_id, score)

    async def lock(self, key: str, owner: str, ttl_ms: int) -> bool:
        return await self.indexes.lock(key, owner, ttl_ms)

    async def unlock(self, key: str, owner: str) -> None:
        await self.indexes.unlock(key, owner)
