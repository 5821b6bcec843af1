"""The ledger's pipelined connection: replies matched to commands, failures surfaced, recovery."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.store.channel import ScriptChannel, channel_for
from gateway.store.embedded import EmbeddedStore
from tests.procs import free_port


@pytest.fixture
async def channel(valkey: EmbeddedStore) -> AsyncIterator[ScriptChannel]:
    found = channel_for(valkey.url)
    assert found is not None
    yield found
    await found.aclose()


async def test_concurrent_commands_get_their_own_replies(channel: ScriptChannel) -> None:
    """Hundreds of commands in flight at once, each answered with its own value, in one
    connection (they leave in a few writes, and Redis answers in order)."""
    replies = await asyncio.gather(
        *(channel.execute("EVAL", "return ARGV[1]", 0, f"v{i}") for i in range(500))
    )
    assert replies == [f"v{i}".encode() for i in range(500)]


async def test_errors_are_redis_py_errors_and_do_not_break_the_stream(
    channel: ScriptChannel,
) -> None:
    """A NOSCRIPT reply is NoScriptError (the ledger reloads on it), another error reply is
    ResponseError, and the commands around them still get their own replies."""
    first, missing, broken, last = await asyncio.gather(
        channel.execute("EVAL", "return 1", 0),
        channel.execute("EVALSHA", "0" * 40, 0),
        channel.execute("EVAL", "return redis.call('NOSUCHCOMMAND')", 0),
        channel.execute("EVAL", "return 2", 0),
        return_exceptions=True,
    )
    assert (first, last) == (1, 2)
    assert isinstance(missing, NoScriptError)
    assert isinstance(broken, ResponseError)
    assert not isinstance(broken, NoScriptError)


async def test_a_cancelled_command_leaves_the_next_reply_in_place(
    channel: ScriptChannel,
) -> None:
    """A caller that gives up on its command must not shift the replies of the next ones."""
    slow = asyncio.ensure_future(channel.execute("EVAL", "return 'slow'", 0))
    await asyncio.sleep(0)  # sent, not yet answered
    slow.cancel()
    assert await channel.execute("EVAL", "return 'next'", 0) == b"next"


async def test_a_silent_store_times_out_and_the_next_command_reconnects() -> None:
    """A server that accepts and never answers: the waiting command fails with a timeout
    (within about the timeout, not forever), and the channel then opens a fresh connection."""
    silent_port = free_port()
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        while await reader.read(4096):
            pass

    server = await asyncio.start_server(swallow, "127.0.0.1", silent_port)
    channel = ScriptChannel(host="127.0.0.1", port=silent_port, timeout=0.4)
    try:
        started = time.monotonic()
        with pytest.raises(RedisTimeoutError):
            await channel.execute("PING")
        assert 0.4 <= time.monotonic() - started < 1.5
        with pytest.raises(RedisTimeoutError):
            await channel.execute("PING")
        assert len(accepted) == 2  # the failed connection was replaced
    finally:
        await channel.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_store_restart_fails_waiting_commands_then_recovers(tmp_path: Path) -> None:
    """Killing the store fails what waits on it (no hang); once it is back on the same
    address, the next command reconnects by itself."""
    store = EmbeddedStore(tmp_path / "store", port=free_port(), appendfsync="everysec")
    store.start()
    channel = channel_for(store.url)
    assert channel is not None
    try:
        assert await channel.execute("SET", "k", "1") == b"OK"
        store.kill()
        with pytest.raises(RedisConnectionError):
            await channel.execute("GET", "k")
        store.start()
        assert await channel.execute("PING") == b"PONG"
    finally:
        await channel.aclose()
        store.stop()


def test_channel_for_reads_the_url() -> None:
    """Single-node URLs get a channel with their database and credentials; TLS and cluster
    URLs stay with redis-py."""
    plain = channel_for("redis://user:p%40ss@127.0.0.1:6390/3")
    assert plain is not None
    assert (plain.host, plain.port, plain.db) == ("127.0.0.1", 6390, 3)
    assert (plain.username, plain.password) == ("user", "p@ss")
    socket = channel_for("unix:///run/valkey.sock?db=2")
    assert socket is not None
    assert (socket.path, socket.db) == ("/run/valkey.sock", 2)
    assert channel_for("rediss://127.0.0.1:6390/0") is None
    assert channel_for("redis+cluster://127.0.0.1:7000") is None
