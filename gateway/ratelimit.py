"""Rate limits per account and per (account, model), on the shared Redis, with `limits`.

Requests use a moving window (exact); tokens a fixed window, because a call's tokens are a
cost of thousands and the fixed window counts a cost with one INCRBY. Tokens are charged the
hold estimate at admission and corrected at settlement (the difference is added, or refunded
while the same window lasts). Limits hold across instances because the counters live in Redis.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from limits import RateLimitItem, parse
from limits.aio.storage import RedisStorage
from limits.aio.strategies import FixedWindowRateLimiter, MovingWindowRateLimiter
from limits.storage import storage_from_string

from gateway.errors import LedgerUnavailable, RateLimited
from gateway.store.client import blocking_pool

__all__ = ["Decision", "RateLimiter", "Rule", "format_reset"]

T = TypeVar("T")


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `20ms`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@dataclass(frozen=True, slots=True)
class Rule:
    """One limit on one subject: `scope` names the subject (account, or account and model)."""

    kind: str  # requests | tokens
    item: RateLimitItem
    scope: tuple[str, ...]


@dataclass(slots=True)
class Decision:
    """What admission found: the headers to send, and the token rules to correct later."""

    headers: dict[str, str] = field(default_factory=dict)
    token_rules: list[Rule] = field(default_factory=list)
    tokens_charged: int = 0


def _rules(
    account_id: str,
    model: str,
    account: dict[str, str | None],
    per_model: dict[str, str | None],
) -> list[Rule]:
    rules: list[Rule] = []
    for kind in ("requests", "tokens"):
        text = account.get(kind)
        if text:
            rules.append(Rule(kind, parse(text), ("acct", account_id)))
        text = per_model.get(kind)
        if text:
            rules.append(Rule(kind, parse(text), ("model", account_id, model)))
    return rules


def limits_url(store_url: str) -> str:
    """The `limits` storage string for a store URL (`async+redis://...`)."""
    scheme, _, rest = store_url.partition("://")
    mapped = {
        "redis": "redis",
        "rediss": "rediss",
        "unix": "redis+unix",
        "redis+cluster": "redis+cluster",
        "rediss+cluster": "redis+cluster",
    }[scheme]
    return f"async+{mapped}://{rest}"


class RateLimiter:
    """Checks and charges the limits of one call."""

    def __init__(self, store_url: str) -> None:
        options: dict[str, Any] = {}
        if "+cluster" not in store_url:
            options["connection_pool"] = blocking_pool(store_url)
        storage = storage_from_string(limits_url(store_url), implementation="redispy", **options)
        if not isinstance(storage, RedisStorage):  # pragma: no cover - the URL decides
            raise TypeError(f"unexpected rate-limit storage {storage!r}")
        self.storage = storage
        self.moving = MovingWindowRateLimiter(storage)
        self.fixed = FixedWindowRateLimiter(storage)

    async def _hit(self, rule: Rule, tokens: int) -> bool:
        if rule.kind == "requests":
            return await self.moving.hit(rule.item, *rule.scope)
        return await self.fixed.hit(rule.item, *rule.scope, cost=tokens)

    async def _stats(self, rule: Rule) -> tuple[float, int]:
        limiter = self.moving if rule.kind == "requests" else self.fixed
        stats = await limiter.get_window_stats(rule.item, *rule.scope)
        return stats.reset_time, stats.remaining

    async def admit(
        self,
        account_id: str,
        model: str,
        account: dict[str, str | None],
        per_model: dict[str, str | None],
        tokens: int,
    ) -> Decision:
        """Charge every rule; refuse (and undo the token charges) when any is exhausted."""
        rules = _rules(account_id, model, account, per_model)
        if not rules:
            return Decision()
        allowed = await self._retrying(lambda: [self._hit(rule, tokens) for rule in rules])
        stats = await self._retrying(lambda: [self._stats(rule) for rule in rules])
        now = time.time()
        headers: dict[str, str] = {}
        for rule, (reset, remaining) in zip(rules, stats, strict=True):
            if rule.scope[0] != "acct" and f"x-ratelimit-limit-{rule.kind}" in headers:
                continue
            headers[f"x-ratelimit-limit-{rule.kind}"] = str(rule.item.amount)
            headers[f"x-ratelimit-remaining-{rule.kind}"] = str(remaining)
            headers[f"x-ratelimit-reset-{rule.kind}"] = format_reset(reset - now)
        token_rules = [rule for rule in rules if rule.kind == "tokens"]
        refused = [rule for rule, ok in zip(rules, allowed, strict=True) if not ok]
        if refused:
            # A fixed window counts a refused cost too: give every token charge back.
            await self._refund(token_rules, tokens)
            retry_after = max(
                1,
                max(
                    math.ceil(reset - now)
                    for rule, (reset, _) in zip(rules, stats, strict=True)
                    if rule in refused
                ),
            )
            what = ", ".join(
                f"{r.kind} ({r.item.amount} per {r.item.get_expiry()}s)" for r in refused
            )
            raise RateLimited(f"rate limit reached for {what}", retry_after, headers)
        return Decision(headers, token_rules, tokens)

    @staticmethod
    async def _retrying(calls: Callable[[], list[Awaitable[T]]]) -> list[T]:
        """Run the calls together; once more after a connection-level failure (a cluster
        client may hand out a connection its node just closed); then fail closed."""
        for attempt in (1, 2):
            try:
                return list(await asyncio.gather(*calls()))
            except Exception as exc:  # limits wraps store errors in its own StorageError
                if attempt == 2:
                    raise LedgerUnavailable(f"rate-limit store unavailable ({exc})") from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def _refund(self, rules: list[Rule], tokens: int) -> None:
        for rule in rules:
            key = rule.item.key_for(*rule.scope)
            current = await self.storage.get(key)
            if tokens > 0 and current > 0:
                await self.storage.incr(key, rule.item.get_expiry(), amount=-min(tokens, current))

    async def correct(self, decision: Decision, actual_tokens: int) -> None:
        """Settle the token charge at the call's actual tokens (best effort: never refuses)."""
        delta = actual_tokens - decision.tokens_charged
        if not decision.token_rules or delta == 0:
            return
        try:
            if delta > 0:
                for rule in decision.token_rules:
                    key = rule.item.key_for(*rule.scope)
                    await self.storage.incr(key, rule.item.get_expiry(), amount=delta)
            else:
                await self._refund(decision.token_rules, -delta)
        except Exception:  # a missed correction must not fail a settled call
            return
