"""API keys: made once, shown once, stored only as a sha256.

A key reads `sk-gw-<account>.<key id>.<secret>`. Carrying the account id lets admission find
the account's keys, state, subscriptions and balance under one hash tag, in one script and
one round trip. The secret has 256 bits of entropy, so a plain sha256 is a safe stored form.
"""

from __future__ import annotations

import functools
import hashlib
import secrets
from dataclasses import dataclass

from gateway.ledger.keys import valid_account_id, valid_id

__all__ = ["KEY_PREFIX", "NewKey", "ParsedKey", "hash_key", "new_api_key", "parse_api_key"]

KEY_PREFIX = "sk-gw-"


@dataclass(frozen=True, slots=True)
class ParsedKey:
    """The parts of a presented key that admission needs; the secret only as its hash."""

    account_id: str
    key_id: str
    key_hash: str


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    secret: str  # the whole key, shown to the operator once
    key_hash: str


def hash_key(token: str) -> str:
    """The stored form of a key."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_api_key(account_id: str, key_id: str | None = None) -> NewKey:
    """A fresh key for `account_id`; with `key_id`, a new secret for that key (a rotation)."""
    key_id = key_id or "key_" + secrets.token_hex(6)
    token = f"{KEY_PREFIX}{account_id}.{key_id}.{secrets.token_urlsafe(32)}"
    return NewKey(key_id=key_id, secret=token, key_hash=hash_key(token))


def parse_api_key(authorization: str | None) -> ParsedKey | None:
    """The key in an `Authorization: Bearer …` header, or None if it cannot be one of ours."""
    if not authorization or not authorization.startswith("Bearer "):
        return None
    token = authorization[7:].strip()
    if len(token) > 200:
        return None
    return _parse_token(token)


# The keys recently presented, parsed and hashed once: a client sends the same header on
# every call, and the parse and the sha256 were 1.4% of a metered call's CPU (issue 19's
# profile). Bounded in entries and in length (above); what it keeps is what every call's
# headers carry through memory anyway.
@functools.lru_cache(maxsize=4096)
def _parse_token(token: str) -> ParsedKey | None:
    if not token.startswith(KEY_PREFIX):
        return None
    parts = token[len(KEY_PREFIX) :].split(".")
    if len(parts) != 3 or not valid_account_id(parts[0]) or not valid_id(parts[1]):
        return None
    if not parts[2]:
        return None
    return ParsedKey(account_id=parts[0], key_id=parts[1], key_hash=hash_key(token))
