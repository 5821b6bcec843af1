"""Connect to the store named by a URL; every caller gets the same pooled async client."""

from __future__ import annotations

import redis.asyncio as aioredis
from redis.exceptions import RedisError

__all__ = ["connect_store", "ping_store"]


def connect_store(url: str) -> aioredis.Redis:
    """An async Redis client for `url` (`redis://`, `rediss://`, `unix://`).

    Short socket timeouts make a dead store fail calls fast (503) instead of hanging them.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        socket_connect_timeout=1.0,
        socket_timeout=2.0,
        retry_on_timeout=False,
        health_check_interval=0,
        max_connections=512,
    )


async def ping_store(client: aioredis.Redis) -> str | None:
    """None when the store answers PING, else the reason it does not."""
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        return f"store unreachable: {exc.__class__.__name__}: {exc}"
    return None
