"""`inference-gateway backup`: the embedded store copied to a .tar.gz while its gateway serves
(automatic AOF rewrites off, BGREWRITEAOF, copy, rewrites back) or while it is stopped, and
restored by extracting the archive into an empty data directory: the restored gateway serves
the balances and usage records of the moment of the backup, and the audit passes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.admin_client import ADMIN_TOKEN, Admin
from tests.procs import Proc, start_gateway, start_mock

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
ENV = {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}


def _config(data_dir: Path, mock: Proc) -> dict[str, Any]:
    return {
        "store": {"url": "embedded", "data_dir": str(data_dir)},
        # A call in flight at a live backup's moment is in the backup as a hold; in the store
        # restored from it, its gateway is gone, and the orphan sweeper settles it once its
        # lease ends: a short lease, so a test sees that within seconds.
        "billing": {"hold_lease": "1s", "sweep_interval": "100ms"},
        "models": [
            {
                "name": "m",
                "pricing": {"input_per_million": "1.00", "output_per_million": "2.00"},
                "upstreams": [{"url": mock.url + "/v1", "model": "mock-model"}],
            }
        ],
    }


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **ENV},
    )


def _call(url: str, key: str) -> None:
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        assert resp.status == 200


def _state(admin: Admin, accounts: list[str]) -> dict[str, tuple[str, int]]:
    """Each account's balance and record count once its calls have settled: a call's
    settlement is written just after its answer, so read too early the balance can predate
    it while the record count, read next, does not."""
    deadline = time.monotonic() + 10
    while any(admin.account(a)["held"] != "0.000000" for a in accounts):
        assert time.monotonic() < deadline, "calls still held after 10 s"
        time.sleep(0.05)
    return {a: (admin.account(a)["balance"], len(admin.usage(a))) for a in accounts}


def _restore(archive: Path, into: Path) -> None:
    into.mkdir(mode=0o700)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")


@pytest.fixture
def mock(tmp_path: Path) -> Any:
    proc = start_mock(tmp_path)
    yield proc
    proc.stop()


def test_a_live_backup_restores_the_ledger_of_its_moment(tmp_path: Path, mock: Proc) -> None:
    data_dir = tmp_path / "store"
    config = _config(data_dir, mock)
    gateway = start_gateway(tmp_path, config, env=ENV)
    try:
        admin = Admin(gateway.url)
        accounts = []
        for _ in range(3):
            account, key = admin.funded(["m"], "10.00")
            accounts.append(account)
            for _ in range(3):
                _call(gateway.url, key)
        before = _state(admin, accounts)

        # Calls keep coming while the backup runs: it must not stop or corrupt the store.
        stop = threading.Event()

        def traffic() -> None:
            while not stop.is_set():
                _call(gateway.url, key)

        thread = threading.Thread(target=traffic)
        thread.start()
        try:
            assert gateway.config_path is not None
            result = _cli(
                "backup", "--config", str(gateway.config_path), "--out", str(tmp_path / "b.tgz")
            )
        finally:
            stop.set()
            thread.join()
        assert result.returncode == 0, result.stderr
        assert "from the running store" in result.stdout
        assert (tmp_path / "b.tgz").stat().st_mode & 0o077 == 0  # it holds the password
        running = (data_dir / "store.url").read_text().split()[0]
        client = redis.Redis.from_url(running, decode_responses=True)
        setting = "auto-aof-rewrite-percentage"
        assert client.config_get(setting)[setting] == "100"  # rewrites back on
        client.close()
        after = _state(admin, accounts)
    finally:
        assert gateway.stop() == 0
    with tarfile.open(tmp_path / "b.tgz") as tar:
        names = tar.getnames()
    assert "store.password" in names
    assert any(n.startswith("appendonlydir/") and n.endswith(".manifest") for n in names)
    assert not any(n in ("store.url", "valkey.conf", "store.lock") for n in names)

    restored = tmp_path / "restored"
    _restore(tmp_path / "b.tgz", restored)
    again = start_gateway(tmp_path, _config(restored, mock), env=ENV)
    try:
        state = _state(Admin(again.url), accounts)
        # The first two accounts were quiet during the backup: exactly as before it. The
        # third was being called: somewhere between its state before and after.
        for account in accounts[:2]:
            assert state[account] == before[account]
        low, high = before[accounts[2]][1], after[accounts[2]][1]
        assert low <= state[accounts[2]][1] <= high
        assert again.config_path is not None
        audit = _cli("audit", "--config", str(again.config_path))
        assert audit.returncode == 0, audit.stdout + audit.stderr
    finally:
        assert again.stop() == 0


def test_a_stopped_store_is_backed_up_under_its_lock_and_refusals_are_one_line(
    tmp_path: Path, mock: Proc
) -> None:
    data_dir = tmp_path / "store"
    config_path = tmp_path / "gateway.yaml"
    config_path.write_text(yaml.safe_dump(_config(data_dir, mock)))
    result = _cli("backup", "--config", str(config_path), "--out", str(tmp_path / "none.tgz"))
    assert result.returncode == 1
    assert result.stderr.strip() == f"backup: {data_dir} holds no embedded store yet"

    gateway = start_gateway(tmp_path, _config(data_dir, mock), env=ENV)
    try:
        admin = Admin(gateway.url)
        account, key = admin.funded(["m"], "5.00")
        _call(gateway.url, key)
        before = _state(admin, [account])
    finally:
        assert gateway.stop() == 0
    out = tmp_path / "stopped.tgz"
    result = _cli("backup", "--config", str(config_path), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "from the stopped store" in result.stdout
    result = _cli("backup", "--config", str(config_path), "--out", str(out))
    assert result.returncode == 1
    assert result.stderr.strip() == f"backup: {out} exists; name a new file"

    restored = tmp_path / "restored"
    _restore(out, restored)
    again = start_gateway(tmp_path, _config(restored, mock), env=ENV)
    try:
        assert _state(Admin(again.url), [account]) == before
    finally:
        assert again.stop() == 0
