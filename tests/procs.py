"""Real processes for tests: the gateway and the mock upstream, started as the CLI starts them."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "Proc",
    "alive",
    "children",
    "free_port",
    "start_gateway",
    "start_mock",
    "store_pid",
    "valkeys_on",
    "wait_dead",
    "wait_http",
]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    """True while `pid` runs; a zombie waiting to be reaped counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def wait_dead(pid: int, timeout: float = 10.0) -> bool:
    """True once `pid` has exited within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


def children(pid: int) -> list[tuple[int, bytes]]:
    """(pid, command line) of the living children of `pid`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().split(") ", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append((int(entry), cmdline))
    return found


def store_pid(data_dir: Path) -> int | None:
    """The pid of the embedded store serving `data_dir`, as its gateway wrote it in
    `store.url` (None while there is none)."""
    try:
        return int((data_dir / "store.url").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None


def valkeys_on(data_dir: Path) -> list[int]:
    """The living valkey-server processes working in `data_dir`, whoever their parent is (a
    store in a session of its own is out of its gateway's process group)."""
    where = str(data_dir.resolve())
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as cmd:
                cmdline = cmd.read()
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if b"valkey-server" in cmdline and cwd == where and alive(int(entry)):
            found.append(int(entry))
    return found


def wait_http(url: str, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    """Poll `url` until it answers (any status), or fail with the process's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=0.5):
                return
        except urllib.error.HTTPError:
            return  # it answered, with an error status
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer within {timeout}s")


class Proc:
    """A child process with its URL; stopped with SIGTERM (then SIGKILL) on close."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        url: str,
        log_path: Path,
        config_path: Path | None = None,
    ) -> None:
        self.popen = popen
        self.url = url
        self.log_path = log_path
        self.config_path = config_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        """The JSON log lines, parsed (other lines, such as a crash's traceback, skipped)."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except ValueError:
                    continue
        return found

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        return self.popen.returncode


def _spawn(
    args: list[str], log_path: Path, env: dict[str, str] | None, new_session: bool = False
) -> subprocess.Popen[bytes]:
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=full_env,
            start_new_session=new_session,
        )


def start_mock(tmp: Path, *extra: str, env: dict[str, str] | None = None) -> Proc:
    """Start `inference-gateway mock-upstream` on a free loopback port."""
    port = free_port()
    log_path = tmp / f"mock-{port}.log"
    popen = _spawn(["mock-upstream", "--port", str(port), *extra], log_path, env)
    proc = Proc(popen, f"http://127.0.0.1:{port}", log_path)
    wait_http(proc.url + "/healthz", popen)
    return proc


def start_gateway(
    tmp: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    wait: bool = True,
    args: tuple[str, ...] = (),
    port: int | None = None,
    new_session: bool = False,
) -> Proc:
    """Write `config` as YAML and start `inference-gateway serve` on `port` (a free one by
    default). `new_session` starts it as the leader of a process group of its own, which a
    test can signal whole with `os.killpg` without hitting pytest. Its history is off unless
    `config` says otherwise (the history tests, tests/history, give theirs)."""
    port = port or free_port()
    config = {**config, "server": {**config.get("server", {}), "host": "127.0.0.1", "port": port}}
    config.setdefault("history", {"url": "off"})
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log_path = tmp / f"gateway-{port}.log"
    popen = _spawn(["serve", "--config", str(path), *args], log_path, env, new_session)
    proc = Proc(popen, f"http://127.0.0.1:{port}", log_path, path)
    if wait:
        try:
            wait_http(proc.url + "/healthz", popen)
        except (RuntimeError, TimeoutError) as exc:
            proc.stop(signal.SIGKILL)
            raise RuntimeError(f"{exc}\n--- gateway log ---\n{proc.log()}") from None
    return proc


def rewrite_config(proc: Proc, change: Callable[[dict[str, Any]], None]) -> None:
    """Edit the config file a gateway was started from, as editors do: a rename over it."""
    assert proc.config_path is not None
    config = yaml.safe_load(proc.config_path.read_text())
    change(config)
    tmp = proc.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(proc.config_path)
