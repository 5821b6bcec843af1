"""One open-loop rate, held for a few steps, against direct, the proxy and the metered gateway.

    python benchmarks/rate_probe.py --rate 500                      # the gateway's default store
    python benchmarks/rate_probe.py --rate 500 --appendfsync always # every write fsynced
    PYTHONPATH=/tmp/old python benchmarks/rate_probe.py ...         # run from another checkout

`bench_proxy.py`'s rate sweep asks "up to what rate"; on a noisy machine one stall ends it.
This asks "at this rate, what": the same stack (`bench_proxy.running_stack`: nginx upstream,
both gateways pinned as there, no peers) and the same fixed-rate generator
(`rig/openloop.FixedRate`, latency from when each call was due), one warm-up second, then
`--steps` steps of `--seconds` per target, printing p50, p99, the largest latency, the
generator's largest send lag and how many calls took over 8 ms. Run it from the checkout to
measure (its `gateway` package is the one started).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

import bench_proxy  # the script's directory is first on sys.path
from rig.openloop import FixedRate

SLOW_NS = 8_000_000


async def _probe(stack: bench_proxy.Stack, rate: int, seconds: float, steps: int) -> None:
    for target in stack.targets:
        pool = FixedRate(target, target.payload(False), False)
        await pool.step(rate, 1.0)  # warm-up: connections open
        for i in range(steps):
            step = await pool.step(rate, seconds)
            slow = sum(1 for x in step.latency_ns if x > SLOW_NS)
            print(
                f"| {target.label} | {rate}/s | {i + 1} | {step.p50_ms:.2f} | {step.p99_ms:.2f} "
                f"| {max(step.latency_ns, default=0) / 1e6:.1f} "
                f"| {max(step.send_lag_ns, default=0) / 1e6:.1f} | {slow} | {len(step.errors)} |",
                flush=True,
            )
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rate", type=int, default=500, help="calls a second")
    parser.add_argument("--seconds", type=float, default=4.0, help="seconds per step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--appendfsync", choices=("always", "everysec"), default="everysec")
    parser.add_argument(
        "--history",
        choices=("embedded", "off"),
        default="embedded",
        help="the metered gateway's usage history export (the gateway's default: embedded)",
    )
    args = parser.parse_args()
    if args.history == "off":
        configure = bench_proxy.gateway_config

        def without_history(*a: Any, **kw: Any) -> dict[str, Any]:
            return {**configure(*a, **kw), "history": {"url": "off"}}

        bench_proxy.gateway_config = without_history
    stack_args = argparse.Namespace(
        upstream="nginx", peers=[], appendfsync=args.appendfsync, store_cpu="upstream"
    )
    pinned, pinning = bench_proxy.choose_pinning("upstream")
    print(f"- {pinning}\n- store: appendfsync {args.appendfsync}; history {args.history}\n")
    print("| target | rate | step | p50 ms | p99 ms | max ms | max send lag ms | > 8 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    with (
        tempfile.TemporaryDirectory() as tmp,
        bench_proxy.running_stack(Path(tmp), pinned, stack_args, may_install=False) as stack,
    ):
        asyncio.run(_probe(stack, args.rate, args.seconds, args.steps))


if __name__ == "__main__":
    main()
