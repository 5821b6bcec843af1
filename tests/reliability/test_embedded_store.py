"""The embedded store belongs to its gateway: group signals, a killed store, a second gateway on
the same data directory, and workers that cannot start."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros, wait_no_holds
from tests.conftest import GATEWAY_ENV, model_entry
from tests.procs import Proc, alive, free_port, start_gateway, store_pid, valkeys_on

STREAM_TOKENS = 30


def _config(data_dir: Path, mock: Proc, **sections: Any) -> dict[str, Any]:
    return {
        "store": {"url": "embedded", "data_dir": str(data_dir)},
        "models": [model_entry("m", mock.url, upstream_model="mock-model")],
        **sections,
    }


def _reaped(pid: int) -> bool:
    """Gone from the process table: not running, and not a zombie waiting for its parent."""
    return not Path(f"/proc/{pid}").exists()


async def _wait_listening(gw: Proc, workers: int) -> None:
    deadline = time.monotonic() + 20
    while gw.log().count("gateway listening") < workers:
        assert time.monotonic() < deadline, gw.log()
        assert gw.popen.poll() is None, gw.log()
        await asyncio.sleep(0.05)


async def _call(url: str, key: str) -> int:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        await resp.read()
        return resp.status


async def _readyz(url: str) -> int:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as session,
            session.get(url + "/readyz", headers={"Connection": "close"}) as resp,
        ):
            return resp.status
    except (aiohttp.ClientError, TimeoutError):
        return 0


async def _stream(url: str, key: str, started: asyncio.Event) -> tuple[str, bytes]:
    """A slow stream on its own connection; returns its request id and every byte of it."""
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "a story"}],
        "max_tokens": STREAM_TOKENS,
        "stream": True,
    }
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"x-mock-token-delay": "0.06"},
        ) as resp,
    ):
        assert resp.status == 200
        received = b""
        async for chunk in resp.content.iter_any():
            received += chunk
            started.set()
        return resp.headers["x-request-id"], received


@pytest.mark.parametrize(
    ("signum", "workers"),
    [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)],
    ids=["sigterm", "sigint", "sigterm-2-workers"],
)
async def test_group_signal_drains_before_the_store_stops(
    tmp_path: Path, mock_a: Proc, signum: int, workers: int
) -> None:
    """A signal sent to the gateway's whole process group (Ctrl-C in a terminal,
    `kill -TERM -PGID`) does not reach the embedded store: the 5 streams in flight end whole,
    each is billed once for every token, the gateway exits 0 and leaves no Valkey running;
    started again on the same data directory, the ledger shows it."""
    data = tmp_path / "store"
    args = ("--workers", str(workers)) if workers > 1 else ()
    gw = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV, args=args, new_session=True)
    try:
        await _wait_listening(gw, workers)
        account_id, key = Admin(gw.url).funded(["m"], amount="10.00")
        events = [asyncio.Event() for _ in range(5)]
        tasks = [asyncio.create_task(_stream(gw.url, key, event)) for event in events]
        async with asyncio.timeout(15):
            for event in events:
                await event.wait()
        os.killpg(gw.pid, signum)
        answered = await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
        code = await asyncio.to_thread(gw.popen.wait, 30)
    finally:
        gw.stop(signal.SIGKILL)
    assert code == 0, gw.log()
    for _, received in answered:
        assert received.endswith(b"data: [DONE]\n\n"), received[-200:]
    assert valkeys_on(data) == []
    again = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV)
    try:
        client = redis.Redis.from_url((data / "store.url").read_text().split()[0])
        _, records = assert_invariant(Admin(again.url), client, account_id, micros("10.00"))
        client.close()
    finally:
        again.stop()
    by_request = {r["request_id"]: r for r in records}
    assert len(records) == len(by_request) == 5
    for request_id, _ in answered:
        assert by_request[request_id]["status"] == "ok"
        assert by_request[request_id]["completion_tokens"] == STREAM_TOKENS
    assert "settlement failed" not in gw.log()


@pytest.mark.parametrize(
    ("workers", "end"),
    [(1, signal.SIGTERM), (2, signal.SIGTERM), (1, signal.SIGKILL)],
    ids=["1-worker", "2-workers", "1-worker-then-sigkill"],
)
async def test_killed_store_is_reaped_and_restarted(
    tmp_path: Path, mock_a: Proc, workers: int, end: int
) -> None:
    """SIGKILL of the embedded Valkey: /readyz turns 503, then the gateway (or the workers'
    supervisor) reaps it and starts it again on the same address; /readyz is 200 again,
    metered calls succeed, and what the store held is still there (append-only file). The
    restarted store still ends with its gateway: stopped by SIGTERM, or dying with it on
    SIGKILL (it was started by the long-lived watcher thread, not a short-lived one)."""
    data = tmp_path / "store"
    args = ("--workers", str(workers)) if workers > 1 else ()
    gw = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV, args=args)
    try:
        await _wait_listening(gw, workers)
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="10.00")
        assert await _call(gw.url, key) == 200
        client = redis.Redis.from_url((data / "store.url").read_text().split()[0])
        wait_no_holds(client, account_id)  # the call's settlement has landed
        client.close()
        before = admin.account(account_id)["balance"]
        old = store_pid(data)
        assert old is not None
        os.kill(old, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while await _readyz(gw.url) != 503:
            assert time.monotonic() < deadline, "/readyz never noticed the store was gone"
            await asyncio.sleep(0.02)
        deadline = time.monotonic() + 20
        while await _readyz(gw.url) != 200 or store_pid(data) in (old, None):
            assert time.monotonic() < deadline, gw.log()
            await asyncio.sleep(0.1)
        new = store_pid(data)
        assert new is not None
        assert alive(new)
        assert _reaped(old), "the killed store was left a zombie"
        assert valkeys_on(data) == [new]
        assert admin.account(account_id)["balance"] == before
        assert await _call(gw.url, key) == 200
        client = redis.Redis.from_url((data / "store.url").read_text().split()[0])
        wait_no_holds(client, account_id)
        client.close()
        assert len(admin.usage(account_id)) == 2
        log = gw.log()
        assert "embedded store died; restarting" in log
        assert "SIGKILL" in log
        assert "embedded store restarted" in log
    finally:
        code = gw.stop(end, timeout=30)
    if end == signal.SIGTERM:
        assert code == 0, gw.log()
        assert valkeys_on(data) == []
    else:
        deadline = time.monotonic() + 10
        while valkeys_on(data):
            assert time.monotonic() < deadline, "the restarted store outlived its gateway"
            await asyncio.sleep(0.05)


async def test_second_serve_on_the_same_data_dir_refuses(tmp_path: Path, mock_a: Proc) -> None:
    """A second `serve` on a data directory in use exits 1 at once, naming the directory and
    the pid holding it, and touches nothing: the first keeps its store.url, its socket and
    its store, and goes on serving metered calls."""
    data = tmp_path / "store"
    first = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV)
    try:
        _, key = Admin(first.url).funded(["m"])
        marker = (data / "store.url").read_text()
        sock = (data / "valkey.sock").stat().st_ino
        assert first.config_path is not None
        started = time.monotonic()
        second = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "serve", "--config", str(first.config_path)],
            capture_output=True,
            text=True,
            env={**os.environ, **GATEWAY_ENV},
            timeout=30,
            check=False,
        )
        assert second.returncode == 1, second.stderr
        assert time.monotonic() - started < 10
        assert f"store.data_dir {data.resolve()} is in use" in second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert (data / "store.url").read_text() == marker
        assert (data / "valkey.sock").stat().st_ino == sock
        assert valkeys_on(data) == [store_pid(data)]
        assert await _readyz(first.url) == 200
        assert await _call(first.url, key) == 200
    finally:
        assert first.stop() == 0


def test_audit_uses_the_store_of_a_running_gateway(tmp_path: Path, mock_a: Proc) -> None:
    """`audit` on an embedded config whose data directory a gateway holds audits that
    gateway's store (it does not open the directory a second time) and leaves it serving."""
    data = tmp_path / "store"
    gw = start_gateway(tmp_path, _config(data, mock_a), GATEWAY_ENV)
    try:
        Admin(gw.url).funded(["m"], amount="2.00")
        marker = (data / "store.url").read_text()
        assert gw.config_path is not None
        result = subprocess.run(
            [sys.executable, "-m", "gateway", "audit", "--config", str(gw.config_path)],
            capture_output=True,
            text=True,
            env={**os.environ, **GATEWAY_ENV},
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "audited 1 accounts: 0 failing" in result.stdout
        assert (data / "store.url").read_text() == marker
        assert valkeys_on(data) == [store_pid(data)]
    finally:
        assert gw.stop() == 0


async def test_workers_that_cannot_start_make_the_supervisor_give_up(
    tmp_path: Path, mock_a: Proc
) -> None:
    """Workers that die at start (their port is taken by a socket without SO_REUSEPORT) are
    restarted later each time, and after a few such deaths the supervisor gives up: it logs
    why and exits non-zero instead of restarting them forever."""
    port = free_port()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        gw = start_gateway(
            tmp_path,
            _config(tmp_path / "store", mock_a),
            GATEWAY_ENV,
            wait=False,
            args=("--workers", "2"),
            port=port,
        )
        started = time.monotonic()
        try:
            code = await asyncio.to_thread(gw.popen.wait, 60)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            gw.stop(signal.SIGKILL)
    assert code is not None, "the supervisor kept restarting workers for 60 s"
    assert code != 0
    log = gw.log()
    assert "workers keep dying at start; giving up" in log
    assert log.count("worker died; restarting") == 4
    assert time.monotonic() - started < 60
    assert valkeys_on(tmp_path / "store") == []
