"""Connect to the store named by a URL; every caller gets the same pooled async client."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any, cast
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

__all__ = [
    "PING_TIMEOUT",
    "UNAVAILABLE_REPLIES",
    "StoreMisconfigured",
    "blocking_pool",
    "check_eviction_policy",
    "connect_store",
    "exposure_warning",
    "ping_store",
    "store_refused",
    "without_credentials",
]

# How long /readyz waits for each PING: a probe must answer within its own timeout.
PING_TIMEOUT = 1.0

# First words of the error replies that say the store cannot serve now, rather than that it
# refused the operation: still loading its data, busy running a script, slots unserved or moving
# (cluster), a replica or a primary without enough replicas, out of memory (noeviction), unable
# to persist, a script cache flushed again between EVALSHA and EVAL, credentials or ACL refused.
UNAVAILABLE_REPLIES = frozenset(
    {
        "LOADING",
        "BUSY",
        "CLUSTERDOWN",
        "TRYAGAIN",
        "MASTERDOWN",
        "READONLY",
        "NOREPLICAS",
        "OOM",
        "MOVED",
        "ASK",
        "MISCONF",
        "NOSCRIPT",
        "NOAUTH",
        "WRONGPASS",
        "NOPERM",
    }
)
# redis-py's classes for some of those replies (it strips the first word from their message).
_UNAVAILABLE_CLASSES = (
    AskError,  # MovedError too
    ClusterError,  # ClusterDownError, MasterDownError
    NoPermissionError,
    NoScriptError,
    OutOfMemoryError,
    ReadOnlyError,
    TryAgainError,
)


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


def without_credentials(url: str) -> str:
    """`url` with its user and password left out: for messages, and to name a store
    whatever credentials reach it."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(an unreadable URL)"
    if "@" not in parts.netloc:
        return url  # as it is: it also names the store's journal (ledger/journal.py)
    return url.replace(parts.netloc, parts.netloc.rpartition("@")[2], 1)


def exposure_warning(url: str) -> str | None:
    """Why the ledger is open to the network at `url`, if it is: a store on another host
    reached with neither a password nor TLS (`rediss://`). Loopback and Unix sockets are not
    the network; the embedded store always has a password."""
    parts = urlsplit(url)
    if parts.scheme == "unix" or parts.scheme.startswith("rediss") or parts.password:
        return None
    host = parts.hostname or "localhost"
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name: assume it is another machine
    return (
        f"the store at {host} is reached with neither a password nor TLS: anyone on that "
        "network can read and change every balance; use a rediss:// URL with a password "
        "(README, Security)"
    )


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


def store_refused(exc: BaseException) -> bool:
    """True when the store answered and refused the operation itself: an error reply that is
    none of the availability replies (`ERR user_script:...`, `ERR increment or decrement would
    overflow`, `WRONGTYPE`, `CROSSSLOT`). False for everything else a store client raises,
    whatever its class: the store is unavailable.

    The one classification of store errors. It reads redis-py's exception classes and, for a
    plain `ResponseError`, the reply's first word: redis-py keeps it as `status_code` when it
    strips it from the message, the ledger's channel leaves it in the message."""
    if not isinstance(exc, ResponseError) or isinstance(exc, _UNAVAILABLE_CLASSES):
        return False
    text = str(exc)
    if "max number of clients reached" in text:  # an ERR reply, but the store is full
        return False
    code = getattr(exc, "status_code", None) or text.split(" ", 1)[0]
    return code not in UNAVAILABLE_REPLIES


async def ping_store(client: aioredis.Redis) -> str | None:
    """None when the store answers PING, else the reason it does not. On a cluster, every
    primary must answer (each holds the only copy of its slots' accounts): the reason names
    those that do not. Each PING waits at most PING_TIMEOUT."""
    store: object = client
    try:
        if isinstance(store, RedisCluster):
            return await _ping_primaries(store)
        async with asyncio.timeout(PING_TIMEOUT):
            await client.ping()
    except Exception as exc:  # whatever the client raises, the store is not there for us
        return f"store unreachable: {_describe(exc)}"
    return None


async def _ping_primaries(cluster: RedisCluster) -> str | None:
    """PING each primary on its own connection, not through the cluster client's command path,
    whose error handling (re-discovery, closing every node's connections) a probe must not set
    off. The nodes are the client's current view of the slot owners."""
    primaries = cluster.get_primaries()
    if not primaries:  # no topology yet
        async with asyncio.timeout(PING_TIMEOUT):
            await cluster.initialize()
        primaries = cluster.get_primaries()

    async def ping(node: ClusterNode) -> str | None:
        try:
            async with asyncio.timeout(PING_TIMEOUT):
                await node.execute_command("PING")
        except Exception as exc:  # the node is down, hung, loading...
            return f"{node.name} ({_describe(exc)})"
        return None

    down = [reason for reason in await asyncio.gather(*map(ping, primaries)) if reason]
    if down:
        return f"store primaries unreachable: {', '.join(down)}"
    return None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError) and not str(exc):
        return f"no answer within {PING_TIMEOUT}s"
    return f"{exc.__class__.__name__}: {exc}"
