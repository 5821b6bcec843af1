"""A metered call costs the store one round trip at admission and one at settlement.

Watched from the store's side with MONITOR, on a store of the test's own (no other gateway
talks to it) and with the sweepers' and the notifier's intervals far beyond the test, so every
command seen is one the calls caused.
"""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections import Counter
from collections.abc import Callable

import aiohttp
import orjson
import pytest

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.procs import Proc

CHAT = {
    "model": "m",
    "messages": [{"role": "user", "content": "hi"}],
    "max_tokens": 4,
}
# `+1764150000.123456 [0 127.0.0.1:53422] "EVALSHA" "..."` -> the client and the command
_LINE = re.compile(rb'^\+[\d.]+ \[\d+ ([^\]]+)\] "([A-Za-z]+)"')


class Monitor:
    """The store's MONITOR feed: every command any client sends, as it runs."""

    def __init__(self, port: int, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(f"AUTH {password}\r\nMONITOR\r\n".encode())
        answer = b""
        while len(answer) < 10 and (chunk := self.sock.recv(10 - len(answer))):
            answer += chunk
        assert answer == b"+OK\r\n+OK\r\n", answer
        self.buffer = b""

    def commands(self, quiet_for: float = 0.5) -> list[tuple[str, str]]:
        """(client, command) of everything seen until the feed is quiet for `quiet_for` s."""
        self.sock.settimeout(quiet_for)
        try:
            while chunk := self.sock.recv(65536):
                self.buffer += chunk
        except TimeoutError:
            pass
        lines, _, self.buffer = self.buffer.rpartition(b"\r\n")
        found = []
        for line in lines.split(b"\r\n"):
            match = _LINE.match(line)
            if match and match.group(1) != b"lua":  # commands run inside a script
                found.append((match.group(1).decode(), match.group(2).decode().upper()))
        return found

    def close(self) -> None:
        self.sock.close()


async def _call(gw: Proc, key: str, stream: bool) -> None:
    body = {**CHAT, "stream": stream}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        assert resp.status == 200
        await resp.read()


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_one_script_at_admission_one_at_settlement(
    make_gateway: Callable[..., Proc], mock_a: Proc, own_store: EmbeddedStore, stream: bool
) -> None:
    """After a first call (which loads the scripts), each call sends exactly two commands,
    both EVALSHA on the ledger's one connection: admission (key, state, subscription, rate
    limits and hold) and settlement (debit, usage record, token-limit correction). The only
    other commands a burst of calls causes are one batched hold-index ZADD and the
    settlements' fsync confirmation (the marker's INCRBY and WAITAOF on a connection of its
    own, off the call's path: at most one round a call here, one sequential call after
    another; rounds are shared under load, tests/reliability/test_durability.py)."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        store={"url": own_store.url},
        billing={"sweep_interval": "1h"},
        notifications={"poll_interval": "1h"},
        rate_limits={"requests": "1000/minute", "tokens": "1000000/minute"},
    )
    _, key = Admin(gw.url).funded(["m"])
    await _call(gw, key, stream)  # scripts loaded, connections open
    await asyncio.sleep(0.3)
    monitor = Monitor(own_store.port or 0, own_store.password)
    try:
        monitor.commands(quiet_for=0.3)  # whatever was still on its way
        calls = 5
        started = time.monotonic()
        for _ in range(calls):
            await _call(gw, key, stream)
        seen = monitor.commands()
        assert time.monotonic() - started < 10
    finally:
        monitor.close()
    by_command = Counter(command for _, command in seen)
    assert by_command["EVALSHA"] == 2 * calls, seen
    assert {client for client, command in seen if command == "EVALSHA"} == {
        next(client for client, command in seen if command == "EVALSHA")
    }  # one pipelined connection carries them all
    others = {command for command in by_command if command != "EVALSHA"}
    assert others <= {"ZADD", "INCRBY", "WAITAOF"}, seen
    assert by_command["ZADD"] <= calls  # batched: at most one a call, usually one in all
    assert 1 <= by_command["WAITAOF"] == by_command["INCRBY"] <= calls, seen
    confirming = {client for client, command in seen if command == "WAITAOF"}
    assert not confirming & {client for client, command in seen if command == "EVALSHA"}
