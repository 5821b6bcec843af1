"""`serve --workers N`: N gateway processes on one port, under one supervisor.

The supervisor starts the embedded store once, then N workers that each bind the port with
SO_REUSEPORT (the kernel spreads connections over them). Metrics are aggregated through
prometheus-client's multiprocess directory. Signals are passed on: SIGTERM and SIGINT drain
and stop every worker, SIGHUP makes each reload its config. A worker that dies is restarted.
Workers die with the supervisor (PR_SET_PDEATHSIG), so nothing outlives it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from types import FrameType

from gateway.observability.logging import get_logger
from gateway.store.embedded import die_with_parent

__all__ = ["supervise"]

log = get_logger("gateway.workers")

RESTART_DELAY_S = 1.0


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent if sys.platform == "linux" else None,
    )


def supervise(
    count: int, worker_argv: list[str], extra_env: dict[str, str], drain_timeout: float
) -> int:
    """Run `count` workers until SIGTERM/SIGINT; returns the exit code."""
    metrics_dir = tempfile.mkdtemp(prefix="gateway-metrics-")
    env = {**os.environ, **extra_env, "PROMETHEUS_MULTIPROC_DIR": metrics_dir}
    workers: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM if signum == signal.SIGINT else signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        workers.extend(_spawn(worker_argv, env) for _ in range(count))
        log.info("workers started", count=count, pids=[w.pid for w in workers])
        while not stopping:
            time.sleep(0.2)
            for i, worker in enumerate(workers):
                if worker.poll() is not None and not stopping:
                    log.error("worker died; restarting", pid=worker.pid, code=worker.returncode)
                    _mark_dead(worker.pid)
                    time.sleep(RESTART_DELAY_S)
                    workers[i] = _spawn(worker_argv, env)
        deadline = time.monotonic() + drain_timeout + 15
        for worker in workers:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                worker.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(timeout=5)
        log.info("workers stopped")
        return 0
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def _mark_dead(pid: int) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
