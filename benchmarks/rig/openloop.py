"""The fixed-rate (open-loop) generator behind the rate sweep.

Why open loop: a closed loop (N connections, each sending its next request when the last
answer arrives) slows down with the server, so it never sees the queueing a real client
population causes. Here requests are due at fixed times (`rate` per second), each goes out
on an idle keep-alive connection (a new one is opened when none is idle), and its latency is
counted from when it was due, not from when it was sent: a server that falls behind shows it
in the latency (no coordinated omission). wrk2 would do this, but Debian has no wrk2.

The sweep steps the rate up geometrically and stops at the first step that fails: an error,
a call unfinished well after the last was due, or an added p99 (the target's p99 minus the
direct upstream's p99 at the same rate) of `limit_ms` or more. The direct upstream is driven
by the same generator at each rate a target reaches (once per rate, just before the first
target that needs it), so it is both the baseline and the proof that the generator keeps up:
when the direct upstream fails a rate, the rates above it say nothing about the target.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from rig.client import Connection, Exchange, Target, connect, problem

MAX_CONNECTIONS = 512  # per target: enough for LiteLLM's queue at 3x its ceiling
GRACE_SECONDS = 5.0  # how long a step waits for its last calls after the last was due


def percentile(values: list[int], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of nanosecond values, in ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return (ordered[low] + (ordered[high] - ordered[low]) * (rank - low)) / 1e6


@dataclass
class Step:
    """One rate held for `seconds`: latencies from when each call was due, in ns."""

    rate: int
    seconds: float
    scheduled: int
    completed: int = 0
    unfinished: int = 0
    connections: int = 0  # connections open when the step ended
    errors: Counter[str] = field(default_factory=Counter)
    latency_ns: list[int] = field(default_factory=list)
    send_lag_ns: list[int] = field(default_factory=list)  # sent minus due: the queue here

    @property
    def p50_ms(self) -> float:
        return percentile(self.latency_ns, 50)

    @property
    def p99_ms(self) -> float:
        return percentile(self.latency_ns, 99)

    def failure(self, base: Step | None, limit_ms: float) -> str | None:
        """Why this step fails (vs `base`, the direct upstream at the same rate), or None."""
        if self.errors:
            return "errors: " + ", ".join(f"{k} x{v}" for k, v in self.errors.items())
        if self.unfinished:
            return f"{self.unfinished} calls unfinished {GRACE_SECONDS:g} s after the last was due"
        added = self.p99_ms - (base.p99_ms if base is not None else 0.0)
        if not added < limit_ms:  # also when NaN
            what = "added p99" if base is not None else "p99"
            return f"{what} {added:.1f} ms"
        return None


class FixedRate:
    """Keep-alive connections to one target, driven at fixed rates; reused across steps."""

    def __init__(self, target: Target, payload: bytes, stream: bool) -> None:
        self.target = target
        self.payload = payload
        self.stream = stream
        self.idle: list[Connection] = []
        self.busy: set[Connection] = set()
        self.open = 0  # connections made and not yet lost or closed
        self.opening = 0

    def close(self) -> None:
        """Drop every connection, busy ones too (their calls are written off)."""
        for conn in [*self.idle, *self.busy]:
            conn.close()
        self.idle.clear()
        self.busy.clear()
        self.open = 0

    async def _open_one(self, step: Step, ready: Callable[[], None]) -> None:
        try:
            conn = await connect(self.target.port)
        except OSError as exc:
            step.errors[f"connect: {type(exc).__name__}"] += 1
        else:
            self.open += 1
            self.idle.append(conn)
        finally:
            self.opening -= 1
        ready()

    async def step(self, rate: int, seconds: float) -> Step:
        """Send `rate` calls a second for `seconds`; wait for the last ones (a grace period)."""
        loop = asyncio.get_running_loop()
        count = max(1, round(rate * seconds))
        step = Step(rate, seconds, count)
        interval = 1e9 / rate
        pending: deque[int] = deque()  # due times of calls waiting for a connection
        tasks: set[asyncio.Task[None]] = set()
        state = {"outstanding": 0, "all_due": False}
        finished = loop.create_future()

        def grow(wanted: int) -> None:
            room = MAX_CONNECTIONS - self.open - self.opening
            for _ in range(min(wanted, room)):
                self.opening += 1
                task = loop.create_task(self._open_one(step, dispatch))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        def dispatch() -> None:
            while pending and self.idle:
                conn = self.idle.pop()
                if conn.lost:
                    self.open -= 1
                    continue
                due = pending.popleft()
                future = conn.send(self.payload, None)
                self.busy.add(conn)
                step.send_lag_ns.append(conn.start_ns - due)
                state["outstanding"] += 1
                future.add_done_callback(partial(answered, conn, due))
            if pending and not step.errors:  # no reconnect storm once something failed
                grow(len(pending) - self.opening)
            idle = state["all_due"] and not pending and not state["outstanding"]
            if idle and not finished.done():
                finished.set_result(None)

        def answered(conn: Connection, due: int, future: asyncio.Future[Exchange]) -> None:
            state["outstanding"] -= 1
            if conn not in self.busy:
                return  # written off by close(): counted as unfinished
            self.busy.discard(conn)
            exc = None if future.cancelled() else future.exception()
            if future.cancelled() or exc is not None:
                step.errors[type(exc).__name__ if exc else "cancelled"] += 1
                conn.close()
                self.open -= 1
            else:
                result = future.result()
                why = problem(result, self.stream, check_tokens=False)
                if why is not None:
                    step.errors[why] += 1
                else:
                    step.completed += 1
                    step.latency_ns.append(result.end_ns - due)
                if result.keep_alive and not conn.lost:
                    self.idle.append(conn)
                else:
                    conn.close()
                    self.open -= 1
            dispatch()

        expected = math.ceil(rate * 0.004) + 4  # calls in flight at ~4 ms each
        if self.open < expected:
            grow(expected - self.open)
            await asyncio.sleep(0.05)
        start = time.perf_counter_ns() + 1_000_000
        sent = 0
        while sent < count:
            now = time.perf_counter_ns()
            while sent < count and (due := start + int(sent * interval)) <= now:
                pending.append(due)
                sent += 1
            dispatch()
            if sent < count:
                await asyncio.sleep(max(0.0, (start + sent * interval - now) / 1e9))
        state["all_due"] = True
        dispatch()
        try:
            await asyncio.wait_for(finished, GRACE_SECONDS)
        except TimeoutError:
            step.unfinished = state["outstanding"] + len(pending)
            self.close()  # a server working through a backlog must see its callers go
        step.connections = self.open
        return step


@dataclass
class Sweep:
    """One target's rate sweep: every step, and the last that passed."""

    label: str
    steps: list[Step] = field(default_factory=list)
    passed: Step | None = None
    stop: str = ""  # why the sweep ended

    @property
    def rate(self) -> int | None:
        return None if self.passed is None else self.passed.rate


def rates(start: int, factor: float, top: int) -> list[int]:
    """start, start*factor, ... up to `top`, rounded."""
    found: list[int] = []
    value = float(start)
    while round(value) <= top:
        found.append(round(value))
        value *= factor
    return found
