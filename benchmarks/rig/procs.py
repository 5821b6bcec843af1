"""The processes under test: start them, wait until they answer, stop them, and what they cost.

Why real processes: the numbers must be those of the gateway (and of its peers) as they are
started in production, with their own event loops, stores and children, not of an in-process
app. Their CPU time and memory are read from /proc, so a target's cost includes its children
(the gateway's embedded Valkey, a peer's workers).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from rig.client import HOST

START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Proc:
    """A started child process and where its output goes.

    `group`: it was started in a session of its own, and is stopped with its whole process
    group (a peer may be a launcher with the server as its child).
    """

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path
    group: bool = False

    def log_tail(self, chars: int = 2000) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-chars:]
        return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpus: str, pinned: bool) -> list[str]:
    """`taskset -c CPUS` when pinning, else nothing."""
    return ["taskset", "-c", cpus] if pinned else []


def spawn(
    name: str,
    argv: Sequence[str],
    port: int,
    workdir: Path,
    env: dict[str, str],
    cwd: Path | None = None,
    group: bool = False,
) -> Proc:
    """Start ARGV with the environment plus ENV, its output in WORKDIR/NAME.log."""
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=cwd,
            start_new_session=group,
        )
    return Proc(name, popen, port, log, group)


def http_call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One JSON call with http.client (which ignores proxy settings): (status, decoded body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def healthy(port: int, path: str = "/healthz", headers: dict[str, str] | None = None) -> bool:
    try:
        return http_call(port, "GET", path, headers=headers)[0] == 200
    except OSError:
        return False


def wait_healthy(
    proc: Proc,
    path: str = "/healthz",
    headers: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> None:
    """Poll GET PATH until it answers 200; raise if the process exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        if healthy(proc.port, path, headers):
            return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} was not healthy within {timeout:.0f}s")


def stop(proc: Proc) -> None:
    """SIGTERM, then SIGKILL if it lingers (to its process group when it has one)."""

    def signal_it(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            if proc.group:
                os.killpg(proc.popen.pid, signum)  # the group this script made for it
            else:
                proc.popen.send_signal(signum)

    if proc.popen.poll() is None:
        signal_it(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            signal_it(signal.SIGKILL)
            proc.popen.wait(timeout=5)
    if proc.group:  # the leader is gone; stragglers of its group are not
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.popen.pid, signal.SIGKILL)


# -- /proc -----------------------------------------------------------------------------------


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc/PID/stat line after the command name (which may hold spaces)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, grandchildren...), from one scan of /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents.setdefault(int(_stat_fields(str(stat))[1]), []).append(int(stat.parent.name))
    found: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def comm(pid: int) -> str:
    """The process's command name ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def cpu_ticks(pid: int, reaped: bool = True) -> int:
    """CPU ticks used by `pid` (utime+stime), plus its reaped children's when `reaped`."""
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
    except OSError:
        return 0
    return sum(int(v) for v in fields[11 : 15 if reaped else 13])


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def _busy_ticks() -> int:
    """CPU ticks the whole machine spent in processes (user, nice, system; not irq time)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[0]) + int(fields[1]) + int(fields[2])


class CpuWatch:
    """CPU time that processes other than the benchmark's used while it measured.

    The benchmark's own processes (this one with its reaped `wrk` children, the upstreams,
    the gateways, the peers and their children) are subtracted from the machine's busy time;
    what remains is interference, such as a test suite started on the same CPUs.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = self._sample()
        self._began = time.monotonic()

    def _sample(self) -> tuple[int, int]:
        return _busy_ticks(), sum(cpu_ticks(pid) for pid in self.pids)

    def report(self, also_ours: int = 0) -> str:
        """`also_ours`: ticks of benchmark processes that ended before this report."""
        busy, ours = self._sample()
        ours += also_ours
        other = max(0, (busy - self._start[0]) - (ours - self._start[1])) / CLOCK_TICKS
        wall = time.monotonic() - self._began
        return f"{other:.1f} CPU-s in {wall:.0f} s ({100 * other / wall:.0f}% of one CPU)"


def affinity(pid: int) -> str:
    try:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
    except OSError:
        return "?"


@dataclass(frozen=True)
class TreeUsage:
    """What a process tree used over one measured interval."""

    cpu_seconds: float  # utime + stime of every process in the tree
    peak_rss_mib: float  # the largest sum of RSS over the tree among the samples
    processes: int
    samples: int


class TreeMeter:
    """CPU time and peak memory of a process tree while a `with` block runs.

    Why a sampler thread: peak memory needs samples during the load (every `interval`), and
    the load generator (wrk, or this process's event loop) must not be the one pausing to
    take them. The tree is listed once at the start: the processes under test do not fork
    under load. CPU is the per-process difference of utime+stime, so a process that exits
    keeps what it used until its last sample.
    """

    def __init__(self, root: int, interval: float = 0.1) -> None:
        self.root = root
        self.interval = interval
        self.pids: list[int] = []
        self._first: dict[int, int] = {}
        self._last: dict[int, int] = {}
        self._peak = 0
        self._samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tree-meter", daemon=True)

    def _sample(self) -> None:
        rss = 0
        for pid in self.pids:
            ticks = cpu_ticks(pid, reaped=False)
            if ticks:
                self._first.setdefault(pid, ticks)
                self._last[pid] = ticks
            rss += rss_bytes(pid)
        self._peak = max(self._peak, rss)
        self._samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> TreeMeter:
        self.pids = tree(self.root)
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def usage(self) -> TreeUsage:
        ticks = sum(self._last[pid] - first for pid, first in self._first.items())
        return TreeUsage(ticks / CLOCK_TICKS, self._peak / 2**20, len(self.pids), self._samples)
