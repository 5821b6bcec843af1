"""Connect to the store named by a URL; every caller gets the same pooled async client."""

from __future__ import annotations

from typing import Any, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisError

__all__ = [
    "StoreMisconfigured",
    "check_eviction_policy",
    "connect_store",
    "ping_store",
    "store_pool",
]


# Connections one process may open to the store (Valkey's default maxclients is 10000).
POOL_SIZE = 4096


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
    return aioredis.Redis(connection_pool=store_pool(url))


def store_pool(url: str) -> aioredis.ConnectionPool:
    """A connection per command in flight, kept for reuse.

    A plain pool, not redis-py's BlockingConnectionPool: that one takes a lock and arms a
    timeout for every command it hands a connection to, a tenth of a metered call's CPU. The
    size bound is far above what a gateway process keeps in flight (each call holds a
    connection only for its admission and its settlement scripts), so a burst never meets it.
    """
    return aioredis.ConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        retry_on_timeout=False,
        health_check_interval=0,
    )


async def ping_store(client: aioredis.Redis) -> str | None:
    """None when the store answers PING, else the reason it does not."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"store unreachable: {exc.__class__.__name__}: {exc}"
    return None
