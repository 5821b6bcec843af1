"""The ledger's pipelined connection: replies matched to commands, failures surfaced, recovery;
and what the ledger makes of the store's answers on either send path (the channel, redis-py):
a resent script is the same call, a script that fails inside Redis is not an outage."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.accounts.apikeys import parse_api_key
from gateway.errors import LedgerScriptError, LedgerUnavailable
from gateway.ledger import Admission, Ledger, Reservation
from gateway.ledger.keys import account_keys
from gateway.store.channel import ScriptChannel, channel_for
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
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


@pytest.fixture(params=["channel", "redis-py"])
async def ledger(request: pytest.FixtureRequest, valkey: EmbeddedStore) -> AsyncIterator[Ledger]:
    """A Ledger on the shared store, sending its scripts on the channel or through redis-py."""
    client = aioredis.Redis.from_url(valkey.url)
    channel = channel_for(valkey.url) if request.param == "channel" else None
    yield Ledger(client, channel)
    await asyncio.sleep(0.2)  # let the batched hold-index write go out
    if channel is not None:
        await channel.aclose()
    await client.aclose()


async def test_a_resent_reserve_answers_as_its_first_run(
    ledger: Ledger, admin: Admin, redis_client: redis.Redis
) -> None:
    """The admission script run twice with the same request id and ARGV (a client library
    resending it after a lost reply) answers `ok` both times with the same hold, token windows
    and rate-limit header values, and holds and charges once: the hold takes the whole
    balance and the request limit is 1, so a second charge would have been refused."""
    account_id, token = admin.funded(["mock-model"], amount="1.00")
    key = parse_api_key(f"Bearer {token}")
    assert key is not None
    now = int(time.time() * 1000)
    request_id = f"req_resent_{now}"

    async def reserve() -> Admission:
        return await ledger.reserve(
            Reservation(
                account_id,
                key.key_id,
                key.key_hash,
                "mock-model",
                1_000_000,  # the whole balance
                request_id,
                now + 60_000,
                False,
                "",
                now,
                40,
                ("1:60000", "1000:60000", "", ""),  # 1 request, 1000 tokens a minute
            )
        )

    first = await reserve()
    second = await reserve()  # the same ARGV, `now` included, as a resend carries
    assert first.code == "ok"
    assert second == first
    assert first.rate[:2] == ("1", "0")  # one request allowed, none left: counted once
    assert first.rate[3:5] == ("1000", "960")
    k = account_keys(account_id)
    assert redis_client.hget(k.account, "held") == b"1000000"
    assert redis_client.hget(k.rate("requests"), "c") == b"1"
    assert redis_client.hget(k.rate("tokens"), "c") == b"40"
    assert await ledger.release(account_id, request_id)
    assert redis_client.hget(k.account, "held") == b"0"


async def test_a_script_failing_inside_redis_is_a_script_error_not_an_outage(
    ledger: Ledger, admin: Admin, redis_client: redis.Redis
) -> None:
    """A settlement whose debit would overflow the balance's 64 bits fails inside Redis ("ERR
    increment or decrement would overflow"): the ledger raises LedgerScriptError (500, the
    ledger refused the operation), not LedgerUnavailable, and nothing was written."""
    account_id, _ = admin.funded(["mock-model"], amount="")
    k = account_keys(account_id)
    lowest = -(2**63) + 10
    redis_client.hset(k.account, "balance", lowest)
    record = {"request_id": "req_overflow", "time": 1, "kind": "inference", "cost": 1000}
    with pytest.raises(LedgerScriptError) as caught:
        await ledger.settle(account_id, "req_overflow", 1000, 1, record)
    assert not isinstance(caught.value, LedgerUnavailable)
    assert (caught.value.status, caught.value.code) == (500, "internal_error")
    assert "settle" in caught.value.message
    assert redis_client.hget(k.account, "balance") == str(lowest).encode()
    assert redis_client.xlen(k.usage) == 0
    assert not redis_client.exists(k.settled("req_overflow"))


async def test_a_busy_store_is_unavailable_not_a_script_error(own_store: EmbeddedStore) -> None:
    """While another client's script keeps the store busy, a ledger script gets a BUSY reply:
    that is the store being unavailable (503), on both send paths; once the script is killed
    the same operation goes through."""
    client = aioredis.Redis.from_url(own_store.url)
    channel = channel_for(own_store.url)
    assert channel is not None
    blocker = aioredis.Redis.from_url(own_store.url)
    try:
        await client.config_set("busy-reply-threshold", 50)
        busy = asyncio.ensure_future(blocker.eval("local i = 0 while true do i = i + 1 end", 0))
        await asyncio.sleep(0.3)  # the loop has run past the threshold
        for ledger in (Ledger(client, channel), Ledger(client)):
            with pytest.raises(LedgerUnavailable):
                await ledger.subscribe("acct-busy", "m")
        await client.script_kill()
        with pytest.raises(ResponseError):
            await busy
        assert await Ledger(client, channel).subscribe("acct-busy", "m") == "account_not_found"
    finally:
        await channel.aclose()
        await blocker.aclose()
        await client.aclose()
