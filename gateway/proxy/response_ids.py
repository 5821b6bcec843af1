"""Which account created which Responses API response, so only that account reaches it again.

A response stored upstream (`store`, the default) can be read, deleted and cancelled by its
id, and it holds the conversation it came from. The upstream's key is the gateway's, shared by
every account, so the upstream cannot tell who may: the gateway records, as each metered
`POST /v1/responses` passes, the id with its account, model and upstream (one key per id,
expiring after `proxy.response_ttl`, 30 days by default as OpenAI keeps responses), and
forwards `GET`, `DELETE` and `cancel` of that id only for that account, to that upstream.
Anyone else, and any id never seen or expired, gets 404, as an unknown id does upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson
import redis.asyncio as aioredis

from gateway.ledger.keys import response_owner_key
from gateway.ledger.transport import guard, text

__all__ = ["ResponseIds", "ResponseOwner"]

# A response id as the APIs give them (`resp_` + hex); anything longer or odder is no id of
# ours and is not looked up.
_MAX_ID = 256


@dataclass(frozen=True, slots=True)
class ResponseOwner:
    account_id: str
    model: str
    upstream: str  # the upstream's label (host:port) that holds the response


class ResponseIds:
    """The store's record of response ids (see the module docstring)."""

    __slots__ = ("client",)

    def __init__(self, client: aioredis.Redis) -> None:
        self.client = client

    async def remember(self, response_id: str, owner: ResponseOwner, ttl_seconds: int) -> None:
        """Record who created `response_id` (a later one of the same id keeps the first)."""
        if not response_id or len(response_id) > _MAX_ID:
            return
        value = orjson.dumps([owner.account_id, owner.model, owner.upstream])
        async with guard("remember response id"):
            await self.client.set(response_owner_key(response_id), value, ex=ttl_seconds, nx=True)

    async def owner(self, response_id: str) -> ResponseOwner | None:
        """Who created `response_id`, if the gateway saw it created and still remembers."""
        if not response_id or len(response_id) > _MAX_ID:
            return None
        async with guard("read response id"):
            value = await self.client.get(response_owner_key(response_id))
        if value is None:
            return None
        account_id, model, upstream = orjson.loads(text(value))
        return ResponseOwner(account_id, model, upstream)
