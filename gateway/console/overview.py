"""The overview's numbers: the gateway's own metrics, sampled every 10 s for the last hour.

Counters only ever grow, so a rate is the difference of two samples over the time between
them: calls per second, and errors and amount billed per minute. The samples are this
process's view (every worker's, with several workers); each instance samples its own.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from gateway.keys import METRICS
from gateway.money import format_micros
from gateway.observability.metrics import Metrics
from gateway.timefmt import iso_ms

__all__ = ["SAMPLER", "Sampler", "sampler_ctx"]

INTERVAL_S = 10.0
KEEP = 360  # an hour of samples


class Sampler:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.samples: deque[tuple[float, dict[str, float]]] = deque(maxlen=KEEP)

    def sample(self) -> None:
        self.samples.append((time.time(), self.metrics.totals()))

    def series(self) -> dict[str, Any]:
        """Per interval between samples (and up to now): its end time, calls per second,
        errors per minute, amount billed per minute; and the totals now."""
        points = [*self.samples, (time.time(), self.metrics.totals())]
        out: dict[str, list[Any]] = {"time": [], "at": [], "calls_per_s": [], "errors_per_min": []}
        billed: list[str] = []
        for (t0, a), (t1, b) in itertools.pairwise(points):
            span = t1 - t0
            if span <= 0:
                continue
            out["time"].append(round(t1))
            out["at"].append(iso_ms(round(t1 * 1000)))
            out["calls_per_s"].append(round((b["calls"] - a["calls"]) / span, 3))
            out["errors_per_min"].append(round((b["errors"] - a["errors"]) * 60 / span, 3))
            billed.append(
                format_micros(round((b["billed_micros"] - a["billed_micros"]) * 60 / span))
            )
        now = points[-1][1]
        return {
            **out,
            "billed_per_min": billed,
            "totals": {
                "calls": int(now["calls"]),
                "errors": int(now["errors"]),
                "billed": format_micros(int(now["billed_micros"])),
            },
        }


SAMPLER = web.AppKey("console_sampler", Sampler)


async def sampler_ctx(app: web.Application) -> AsyncIterator[None]:
    """Sample from the gateway's start to its stop."""
    sampler = app[SAMPLER] = Sampler(app[METRICS])
    sampler.sample()

    async def run() -> None:
        while True:
            await asyncio.sleep(INTERVAL_S)
            sampler.sample()

    task = asyncio.create_task(run())
    yield
    task.cancel()
