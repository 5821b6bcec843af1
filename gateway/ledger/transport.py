"""How the ledger talks to its store: the Lua scripts and the one mapping of store errors.

The ledger's other modules say what to run; this one says how: every script of `lua/` loaded
once (with `_prelude.lua` in front), called by SHA with one EVAL after a `NOSCRIPT`, on the
pipelined channel when there is one. And whatever a store client raises, a script's or a
plain command's, becomes one of two errors here and nowhere else: `LedgerScriptError` (the
store refused the operation) or `LedgerUnavailable` (it did not serve it).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from gateway.errors import GatewayError, LedgerScriptError, LedgerUnavailable
from gateway.observability.logging import get_logger
from gateway.store.channel import ScriptChannel
from gateway.store.client import store_refused

__all__ = [
    "SCRIPT_NAMES",
    "UPKEEP_SCRIPT_NAMES",
    "ScriptRunner",
    "guard",
    "ledger_error",
    "stream_entries",
    "text",
]

log = get_logger("gateway.ledger")

# The money scripts: the calls the Redis latency metric is labelled by (one series each).
SCRIPT_NAMES = (
    "advance",
    "authenticate",
    "checkpoint",
    "create_account",
    "extend",
    "release",
    "reserve",
    "settle",
    "subscribe",
    "topup",
)
# The indexes', locks' and admin API's own scripts: off the hot path, so plain client
# commands, unmetered.
UPKEEP_SCRIPT_NAMES = ("key_status", "remove_if_score", "trim_usage", "unlock", "write_key")

# The classes a store client is expected to raise; any other (redis-py's cluster code has
# raised AttributeError and uvloop's RuntimeError on connections it closed under a command) is
# logged once per class, then answered the same way.
_EXPECTED_ERRORS = (RedisError, RedisClusterException, OSError)
_unexpected_seen: set[type[BaseException]] = set()


def text(value: Any) -> str:
    """A store reply (bytes, or a number) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def stream_entries(entries: Sequence[Any]) -> list[tuple[str, dict[str, str]]]:
    """XRANGE's reply as (entry id, fields), all text."""
    return [
        (text(entry_id), {text(f): text(v) for f, v in fields.items()})
        for entry_id, fields in entries
    ]


def ledger_error(exc: Exception, operation: str) -> GatewayError:
    """The one mapping of a store client's failure, at the ledger's edge: the store refusing
    the operation (a script failed inside Redis) is `LedgerScriptError`, 500; anything else,
    whatever its class, is the store being unavailable, `LedgerUnavailable`, 503."""
    if isinstance(exc, GatewayError):
        return exc
    if store_refused(exc):
        log.error("the ledger store refused an operation", operation=operation, error=str(exc))
        return LedgerScriptError(f"the ledger refused the operation ({operation})")
    kind = type(exc)
    if not isinstance(exc, _EXPECTED_ERRORS) and kind not in _unexpected_seen:
        _unexpected_seen.add(kind)
        log.warning(
            "unexpected error from the store client, answered as the store unavailable",
            operation=operation,
            error_class=f"{kind.__module__}.{kind.__qualname__}",
            exc_info=exc,
        )
    return LedgerUnavailable(f"the ledger store is unavailable ({kind.__name__})")


@asynccontextmanager
async def guard(operation: str = "store command") -> AsyncIterator[None]:
    """Turn any store failure into LedgerUnavailable (or LedgerScriptError, see
    `ledger_error`)."""
    try:
        yield
    except Exception as exc:
        raise ledger_error(exc, operation) from exc


Send = Callable[..., Awaitable[Any]]


class ScriptRunner:
    """Runs the ledger's Lua scripts on one store, each by its name (its file in `lua/`)."""

    def __init__(self, client: aioredis.Redis, channel: ScriptChannel | None = None) -> None:
        self.client = client
        self.channel = channel  # the scripts' pipelined connection (single-node stores)
        lua = resources.files("gateway.ledger").joinpath("lua")
        prelude = lua.joinpath("_prelude.lua").read_text()
        self._sources = {
            entry.name.removesuffix(".lua"): prelude + entry.read_text()
            for entry in sorted(lua.iterdir(), key=lambda entry: entry.name)
            if entry.name.endswith(".lua") and entry.name != "_prelude.lua"
        }
        self._shas = {
            name: hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 - Redis's script id
            for name, source in self._sources.items()
        }
        # Called with (script name, seconds) after every script: the Redis latency metric.
        self.observe: Callable[[str, float], None] | None = None
        # Where commands of the hot path go: the pipelined channel when there is one, else
        # redis-py's execute_command (which routes each to its slot on a cluster).
        self.send: Send = channel.execute if channel is not None else client.execute_command

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """EVALSHA; on NOSCRIPT (the store restarted, failed over or was flushed) one EVAL of
        the source, which runs it and caches it again in one step (a SCRIPT LOAD and a second
        EVALSHA could be split by another flush). Sent on the pipelined channel when there is
        one, else as a plain redis-py command (which routes it to its slot on a cluster).

        A script may run twice for one call: redis-py resends a command whose connection
        dropped before its reply came (the cluster client does, up to three times), and the
        first run may have happened. Each script answers a resend as the same call: `reserve`
        finds its hold and answers as its first run did; `settle` finds its settled marker
        (`duplicate`, the first cost); `topup` its idempotency key (`replay`); `checkpoint`
        writes the same tokens and lease again; `release` finds no hold (False: nothing
        changes); `advance` takes each step once. Two answer a resend differently but change
        nothing more: `create_account` says the id is taken and `subscribe` says `exists`.
        `extend` is the exception: a resend holds `extra` once more (it charges nothing, and
        settlement releases the whole hold; the account's other calls see that much less
        available meanwhile)."""
        started = time.perf_counter()
        try:
            return await self._evalsha(self.send, name, keys, args)
        finally:
            if self.observe is not None:
                self.observe(name, time.perf_counter() - started)

    async def run_upkeep(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of UPKEEP_SCRIPT_NAMES the same way (a rerun changes nothing more: each
        acts only if what it checks still holds), as a plain redis-py command, unmetered."""
        return await self._evalsha(self.client.execute_command, name, keys, args)

    async def _evalsha(self, send: Send, name: str, keys: list[str], args: list[Any]) -> Any:
        try:
            try:
                return await send("EVALSHA", self._shas[name], len(keys), *keys, *args)
            except NoScriptError:
                return await send("EVAL", self._sources[name], len(keys), *keys, *args)
        except Exception as exc:  # every failure of the client, cluster code included
            raise ledger_error(exc, name) from exc
