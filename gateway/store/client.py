"""Connect to the store named by a URL; every caller gets the same pooled async client."""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

__all__ = [
    "StoreMisconfigured",
    "blocking_pool",
    "check_eviction_policy",
    "connect_store",
    "ping_store",
]


class StoreMisconfigured(RuntimeError):
    """The store would lose ledger data: the gateway refuses to start on it."""


async def check_eviction_policy(client: aioredis.Redis) -> str | None:
    """Refuse a store that may evict keys; return a warning when the policy cannot be read.

    Ledger keys have no TTL, but settled-request markers and idempotency keys do, so neither an
    `allkeys-*` nor a `volatile-*` policy is safe: the store must run with `noeviction`.
    """
    try:
        answer: Any = await client.config_get("maxmemory-policy")
    except RedisError as exc:  # managed services may forbid CONFIG
        return f"could not read maxmemory-policy ({exc}); it must be noeviction"
    policy = answer.get("maxmemory-policy") or answer.get(b"maxmemory-policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy and policy != "noeviction":
        raise StoreMisconfigured(
            f"the store's maxmemory-policy is {policy!r}: it could evict ledger keys; "
            "run it with maxmemory-policy noeviction"
        )
    return None


def connect_store(url: str) -> aioredis.Redis:
    """An async Redis client for `url` (`redis://`, `rediss://`, `unix://`,
    `redis+cluster://`, `rediss+cluster://`).

    Short socket timeouts make a dead store fail calls fast (503) instead of hanging them.
    Every ledger script touches one account's hash tag, so each runs on one cluster node.
    """
    scheme, _, rest = url.partition("://")
    if scheme.endswith("+cluster"):
        cluster = RedisCluster.from_url(
            f"{scheme.removesuffix('+cluster')}://{rest}",
            decode_responses=False,
            socket_connect_timeout=1.0,
            socket_timeout=2.0,
        )
        # The cluster client offers the commands the ledger uses with the same signatures.
        return cast(aioredis.Redis, cluster)
    return aioredis.Redis(connection_pool=blocking_pool(url))


def blocking_pool(url: str) -> aioredis.BlockingConnectionPool:
    """A pool that makes a burst of calls wait (up to 2 s) for a connection instead of failing:
    a plain pool raises "Too many connections" when a burst exceeds its size."""
    return aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=256,
        timeout=2.0,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        retry_on_timeout=False,
        # One retry on a fresh connection after a connection error: after a store restart the
        # pool still holds connections to the old process, and redis-py only finds out when a
        # command fails on one. Safe: the commands sent this way are reads and idempotent
        # writes; every money change is a script that cannot apply twice (see Ledger.topup).
        retry=Retry(NoBackoff(), 1),
        health_check_interval=0,
    )


async def ping_store(client: aioredis.Redis) -> str | None:
    """None when the store answers PING, else the reason it does not."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"store unreachable: {exc.__class__.__name__}: {exc}"
    return None
