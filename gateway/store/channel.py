"""One pipelined connection that carries the ledger's scripts: the metered call's hot path.

redis-py spends some 75 µs of Python on every command (connection pool, retry wrapper, a
timeout armed per read, argument encoding); a metered call makes two, and the profile showed
them as the largest part of metering (benchmarks/README.md). This channel writes each
command's RESP bytes to one connection as it is issued (commands issued in the same turn of
the event loop leave in one write) and lets hiredis, redis-py's own parser, read the replies.
Redis answers a connection's commands in order, so each reply resolves the oldest command
waiting. One timer per connection, not one per command, fails everything waiting once the
oldest command has waited longer than the timeout; the next command opens a new connection.

Used for single-node `redis://` and `unix://` stores (the embedded one included). TLS and
Redis Cluster stores go through redis-py, which routes commands to slots.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["ScriptChannel", "channel_for"]

_Arg = str | bytes | int


def _encode(args: tuple[_Arg, ...]) -> bytes:
    """A RESP array of bulk strings, packed by hiredis in C (a script call's 30-odd arguments
    took some 20 µs in Python: 2% of a metered call, issue 19's profile)."""
    try:
        # (hiredis's stub types the argument as a 1-tuple; any length is packed)
        return cast(bytes, hiredis.pack_command(args))  # type: ignore[arg-type]
    except TypeError:  # an argument hiredis does not take (a bool, say): as text
        return _encode_text(args)


def _encode_text(args: tuple[_Arg, ...]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


class _Protocol(asyncio.Protocol):
    """One connection: replies resolve waiting commands in the order they were sent."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        self.waiting: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.outgoing: list[bytes] = []
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def send(self, payload: bytes, future: asyncio.Future[Any]) -> None:
        if not self.outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self.outgoing.append(payload)
        self.waiting.append((future, time.monotonic()))

    def _flush(self) -> None:
        data, self.outgoing = b"".join(self.outgoing), []
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if not self.waiting:  # nothing asked for it (not sent by Redis in RESP2)
                continue
            future, _ = self.waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            if isinstance(reply, hiredis.ReplyError):
                text = str(reply)
                error = NoScriptError if text.startswith("NOSCRIPT") else ResponseError
                future.set_exception(error(text))
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError(f"connection to the store lost ({exc or 'closed'})"))

    def fail(self, error: Exception) -> None:
        self.closed = True
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)
        if self.transport is not None:
            self.transport.abort()


def _consume(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ScriptChannel:
    """Sends commands over one pipelined connection, reconnecting after a failure."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 6379,
        path: str | None = None,
        db: int = 0,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 2.0,
        connect_timeout: float = 1.0,
    ) -> None:
        self.host, self.port, self.path = host, port, path
        self.db, self.username, self.password = db, username, password
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Task[_Protocol] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def execute(self, *args: _Arg) -> Any:
        """Send one command and wait for its reply (redis-py's exceptions on failure)."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            protocol = await self._connected()
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        protocol.send(_encode(args), future)
        return await future

    def send_nowait(self, *args: _Arg) -> asyncio.Future[Any] | None:
        """Queue one command now, ahead of any sent after it, without waiting for its reply
        (None when the connection is not up: then `execute` it). Its future keeps the reply;
        a failure nobody awaits is consumed, not reported as unretrieved."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return None
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.add_done_callback(_consume)
        protocol.send(_encode(args), future)
        return future

    async def _connected(self) -> _Protocol:
        if self._connecting is None or self._connecting.done():
            self._connecting = asyncio.ensure_future(self._connect())
        return await asyncio.shield(self._connecting)

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                if self.path is not None:
                    _, protocol = await loop.create_unix_connection(_Protocol, self.path)
                else:
                    _, protocol = await loop.create_connection(_Protocol, self.host, self.port)
        except TimeoutError as exc:
            raise RedisTimeoutError("timed out connecting to the store") from exc
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect to the store ({exc})") from exc
        setup: list[tuple[_Arg, ...]] = []
        if self.password is not None:
            auth: tuple[_Arg, ...] = ("AUTH", self.password)
            setup.append(auth if self.username is None else ("AUTH", self.username, self.password))
        if self.db:
            setup.append(("SELECT", self.db))
        for command in setup:
            future: asyncio.Future[Any] = loop.create_future()
            protocol.send(_encode(command), future)
            await future
        self._protocol = protocol
        self._arm_watchdog()
        return protocol

    def _arm_watchdog(self) -> None:
        loop = asyncio.get_running_loop()
        self._watchdog = loop.call_later(self.timeout / 4, self._check)

    def _check(self) -> None:
        """Fail every waiting command if the oldest has waited past the timeout."""
        protocol = self._protocol
        self._watchdog = None
        if protocol is None or protocol.closed:
            return
        if protocol.waiting and time.monotonic() - protocol.waiting[0][1] > self.timeout:
            protocol.fail(RedisTimeoutError(f"the store did not answer within {self.timeout}s"))
            return
        self._arm_watchdog()

    async def aclose(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()
            with contextlib.suppress(BaseException):
                await self._connecting
        if self._protocol is not None:
            self._protocol.fail(RedisConnectionError("the channel is closed"))
            self._protocol = None


def channel_for(url: str) -> ScriptChannel | None:
    """A channel for a single-node `redis://` or `unix://` URL; None for TLS and cluster
    URLs, which stay with redis-py."""
    parts = urlsplit(url)
    password = unquote(parts.password) if parts.password else None
    username = unquote(parts.username) if parts.username else None
    if parts.scheme == "redis":
        db = int(parts.path.strip("/") or 0)
        host = parts.hostname or "127.0.0.1"
        return ScriptChannel(
            host=host, port=parts.port or 6379, db=db, username=username, password=password
        )
    if parts.scheme == "unix":
        query = dict(item.split("=", 1) for item in parts.query.split("&") if "=" in item)
        return ScriptChannel(
            path=parts.path, db=int(query.get("db", 0)), username=username, password=password
        )
    return None
