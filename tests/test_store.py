"""The embedded store and the probes: persistence, a child that dies with the gateway, a data
directory one store at a time, /readyz."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis

from gateway.store.embedded import EmbeddedStore, EmbeddedStoreError
from tests.admin_client import Admin
from tests.conftest import GATEWAY_ENV, model_entry
from tests.procs import Proc, children, free_port, start_gateway, wait_dead


def _valkey_children(pid: int) -> list[int]:
    return [child for child, cmdline in children(pid) if b"valkey-server" in cmdline]


def test_embedded_store_keeps_data_across_restart(tmp_path: Path) -> None:
    """A write acknowledged by the embedded store is there after it stops and starts again."""
    store = EmbeddedStore(tmp_path / "data")
    client = redis.Redis.from_url(store.start())
    client.set("balance", "123")
    client.close()
    store.stop()
    again = EmbeddedStore(tmp_path / "data")
    client = redis.Redis.from_url(again.start())
    try:
        assert client.get("balance") == b"123"
        assert client.config_get("appendonly")["appendonly"] == "yes"
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    finally:
        client.close()
        again.stop()


def test_data_dir_is_locked_while_a_store_runs(tmp_path: Path) -> None:
    """A second EmbeddedStore on a directory in use refuses to start, naming the directory and
    the pid holding it, and writes nothing there; once the first stops, the directory is free.
    The server runs in a session of its own (group signals are for the gateway)."""
    data = tmp_path / "data"
    first = EmbeddedStore(data)
    first.start()
    try:
        assert first.pid is not None
        assert os.getsid(first.pid) == first.pid != os.getsid(0)
        written = {path.name: path.stat().st_mtime_ns for path in data.iterdir()}
        second = EmbeddedStore(data)
        with pytest.raises(EmbeddedStoreError, match="is in use by") as refused:
            second.start()
        assert str(data.resolve()) in str(refused.value)
        assert f"pid {os.getpid()}" in str(refused.value)
        assert second.pid is None
        assert {path.name: path.stat().st_mtime_ns for path in data.iterdir()} == written
        assert EmbeddedStore.running_url(data) == first.url
    finally:
        first.stop()
    second.start()
    second.stop()


def _embedded_gateway(tmp_path: Path, mock: Proc) -> Proc:
    config = {
        "store": {"url": "embedded", "data_dir": str(tmp_path / "store")},
        "models": [model_entry("mock-model", mock.url)],
    }
    return start_gateway(tmp_path, config, env=GATEWAY_ENV)


def test_sigkill_of_gateway_leaves_no_valkey(tmp_path: Path, mock_a: Proc) -> None:
    """Killing the gateway with SIGKILL takes its embedded Valkey down too."""
    gw = _embedded_gateway(tmp_path, mock_a)
    children = _valkey_children(gw.pid)
    assert len(children) == 1
    gw.stop(signal.SIGKILL)
    assert wait_dead(children[0])


def test_sigterm_stops_gateway_and_valkey_cleanly(tmp_path: Path, mock_a: Proc) -> None:
    """SIGTERM ends the gateway with exit code 0 and stops its Valkey."""
    gw = _embedded_gateway(tmp_path, mock_a)
    children = _valkey_children(gw.pid)
    assert len(children) == 1
    assert gw.stop(signal.SIGTERM) == 0
    assert wait_dead(children[0])
    assert "embedded store stopped" in gw.log()


async def test_embedded_gateway_serves_calls(tmp_path: Path, mock_a: Proc) -> None:
    """A gateway on the embedded store is ready and proxies calls."""
    gw = _embedded_gateway(tmp_path, mock_a)
    try:
        body = orjson.dumps({"model": "mock-model", "messages": [{"role": "user", "content": "x"}]})
        _, key = Admin(gw.url).funded(["mock-model"])
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
            async with session.get(gw.url + "/readyz") as r:
                assert r.status == 200
            async with session.post(gw.url + "/v1/chat/completions", data=body) as r:
                assert r.status == 200
    finally:
        gw.stop()


async def test_readyz_reports_an_unreachable_store(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """With Redis not answering, /readyz is 503 with the reason and /healthz stays 200."""
    gw = make_gateway(
        [model_entry("mock-model", mock_a.url)], store={"url": f"redis://127.0.0.1:{free_port()}/0"}
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/readyz") as r:
            assert r.status == 503
            body = await r.json()
        assert body["status"] == "unavailable"
        assert "store unreachable" in body["reason"]
        async with session.get(gw.url + "/healthz") as r:
            assert r.status == 200


async def test_readyz_follows_the_store(
    tmp_path: Path, make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """/readyz turns 503 when the store goes away and 200 again when it is back."""
    store = EmbeddedStore(tmp_path / "own", port=free_port())
    store.start()
    gw = make_gateway([model_entry("mock-model", mock_a.url)], store={"url": store.url})
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/readyz") as r:
            assert r.status == 200
        store.stop()
        async with session.get(gw.url + "/readyz") as r:
            assert r.status == 503
        store.start()
        async with session.get(gw.url + "/readyz") as r:
            assert r.status == 200
    store.stop()
