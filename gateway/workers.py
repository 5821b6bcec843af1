"""`serve --workers N`: N gateway processes on one port, under one supervisor.

The supervisor starts the embedded store once, then N workers that each bind the port with
SO_REUSEPORT (the kernel spreads connections over them). Metrics are aggregated through
prometheus-client's multiprocess directory. Signals are passed on: SIGTERM and SIGINT drain
and stop every worker, SIGHUP makes each reload its config.

Workers run in a session of their own, so a signal sent to the supervisor's process group
(Ctrl-C, `kill -TERM -PGID`) reaches them once, from the supervisor: aiohttp takes a second
SIGTERM during the drain as an order to cut it. Workers still die with the
supervisor (PR_SET_PDEATHSIG), so nothing outlives it.

A worker that dies is restarted. One that dies young (within `SHORT_LIFE_S` of its start) is
restarted later each time, and after `GIVE_UP_AFTER` such deaths in a row the supervisor stops
and exits 1: a worker that cannot start (a port taken, a store refusing it) would otherwise be
restarted forever.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from types import FrameType

from gateway.observability.logging import get_logger
from gateway.store.embedded import child_preexec

__all__ = ["supervise"]

log = get_logger("gateway.workers")

RESTART_DELAY_S = 1.0  # after the death of a worker that had run for a while
YOUNG_BACKOFF_S = (1.0, 2.0, 4.0, 8.0)  # after the 1st, 2nd, ... young death in a row
SHORT_LIFE_S = 10.0
GIVE_UP_AFTER = 5


@dataclass
class _Slot:
    """One of the N places a worker runs in: the process, or when it is due again."""

    worker: subprocess.Popen[bytes] | None
    started: float
    restart_at: float = 0.0


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
        preexec_fn=child_preexec(),
    )


def supervise(
    count: int, worker_argv: list[str], extra_env: dict[str, str], drain_timeout: float
) -> int:
    """Run `count` workers until SIGTERM/SIGINT; returns the exit code (1 after giving up)."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    env = {**os.environ, **extra_env, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    slots: list[_Slot] = []
    stopping = False
    gave_up = False

    def stop_requested() -> bool:  # read through a call: a signal handler sets it
        return stopping

    def living() -> list[subprocess.Popen[bytes]]:
        return [s.worker for s in slots if s.worker is not None and s.worker.poll() is None]

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for worker in living():
            worker.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        slots.extend(_Slot(_spawn(worker_argv, env), time.monotonic()) for _ in range(count))
        log.info("workers started", count=count, pids=[s.worker.pid for s in slots if s.worker])
        young_deaths = 0
        while not stopping:
            time.sleep(0.2)
            for slot in slots:
                if stop_requested():
                    break
                now = time.monotonic()
                if slot.worker is None:
                    if now >= slot.restart_at:
                        slot.worker, slot.started = _spawn(worker_argv, env), now
                    continue
                if slot.worker.poll() is None:
                    continue
                pid, code, lived = slot.worker.pid, slot.worker.returncode, now - slot.started
                _mark_dead(pid, metrics_dir)
                young_deaths = young_deaths + 1 if lived < SHORT_LIFE_S else 0
                if young_deaths >= GIVE_UP_AFTER:
                    log.error(
                        "workers keep dying at start; giving up",
                        deaths=young_deaths,
                        pid=pid,
                        code=code,
                        lived_s=round(lived, 1),
                    )
                    gave_up = stopping = True
                    break
                delay = YOUNG_BACKOFF_S[young_deaths - 1] if young_deaths else RESTART_DELAY_S
                log.error(
                    "worker died; restarting",
                    pid=pid,
                    code=code,
                    lived_s=round(lived, 1),
                    restart_in_s=delay,
                )
                slot.worker, slot.restart_at = None, now + delay
        if gave_up:
            for worker in living():
                worker.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + drain_timeout + 15
        for slot in slots:
            if slot.worker is None:
                continue
            remaining = max(0.1, deadline - time.monotonic())
            try:
                slot.worker.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                slot.worker.kill()
                slot.worker.wait(timeout=5)
        log.info("workers stopped")
        return 1 if gave_up else 0
    finally:
        for worker in living():
            worker.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead worker's live gauges. The directory is named: PROMETHEUS_MULTIPROC_DIR is
    set in the workers' environment only, not in the supervisor's."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
