"""Console logins, kept in the store so any instance serves them and each expires there.

The browser holds only a random token (an HttpOnly, SameSite=Strict cookie); the store keeps,
under the token's sha256, who logged in (an operator, or the owner of one account) and the
login's CSRF token, which every form of the session carries back.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis

from gateway.ledger.keys import console_session_key
from gateway.ledger.transport import guard, text

__all__ = ["COOKIE", "Session", "Sessions"]

COOKIE = "gw_console"
Role = Literal["operator", "owner"]


@dataclass(frozen=True, slots=True)
class Session:
    role: Role
    account_id: str  # the owner's account ('' for an operator)
    csrf: str
    key_id: str = ""  # the key an owner logged in with, checked again on every page
    key_hash: str = ""

    def csrf_ok(self, given: object) -> bool:
        return isinstance(given, str) and hmac.compare_digest(given, self.csrf)

    def may_see(self, account_id: str) -> bool:
        return self.role == "operator" or account_id == self.account_id


def _key(token: str) -> str:
    return console_session_key(hashlib.sha256(token.encode()).hexdigest())


class Sessions:
    def __init__(self, store: aioredis.Redis) -> None:
        self.store = store

    async def open(
        self, role: Role, account_id: str, ttl_s: int, key_id: str = "", key_hash: str = ""
    ) -> tuple[str, Session]:
        """A new login: the cookie's token and the session."""
        token = secrets.token_urlsafe(32)
        session = Session(role, account_id, secrets.token_urlsafe(24), key_id, key_hash)
        fields: dict[Any, Any] = {
            "role": role,
            "account": account_id,
            "csrf": session.csrf,
            "key_id": key_id,
            "key_hash": key_hash,
        }
        async with guard(), self.store.pipeline(transaction=True) as pipe:
            pipe.hset(_key(token), mapping=fields)  # one key: MULTI works on a cluster too
            pipe.expire(_key(token), ttl_s)
            await pipe.execute()
        return token, session

    async def get(self, token: str | None) -> Session | None:
        if not token or len(token) > 100:
            return None
        async with guard():
            found: Any = await self.store.hgetall(_key(token))
        if not found or b"csrf" not in found:
            return None
        fields = {text(k): text(v) for k, v in found.items()}
        role: Role = "operator" if fields.get("role") == "operator" else "owner"
        return Session(
            role,
            fields.get("account", ""),
            fields["csrf"],
            fields.get("key_id", ""),
            fields.get("key_hash", ""),
        )

    async def close(self, token: str | None) -> None:
        if token and len(token) <= 100:
            async with guard():
                await self.store.delete(_key(token))
