"""Python function calls per metered call: a CPU measure that a noisy machine cannot move.

    python benchmarks/call_count.py                      # this tree, whole answers
    python benchmarks/call_count.py --stream             # streamed
    python benchmarks/call_count.py --tree /tmp/old      # another checkout (a git worktree)

Wall-clock benchmarks on a shared machine move by 20% or more between runs of the same tree
(benchmarks/README.md), which hides a change of a few per cent. This counts instead: it runs
one gateway under cProfile (embedded store, the project's mock upstream), makes N metered
chat calls (8 in flight), stops the gateway and reads the profile's total call count; it does
the same with no calls, and prints the difference divided by N: the Python function calls
(built-ins included) that one metered call costs. Run to run the count moves by a few
calls (0.5%). It does not see time spent inside C code (tiktoken, orjson, the
HTTP parser), which a change of Python code does not alter, so it bounds the change in CPU a
change of gateway code makes, not the CPU itself.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import pstats
import secrets
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _count(tree: Path, calls: int, stream: bool) -> int:
    """Total Python function calls of a gateway process that served `calls` calls."""
    sys.path.insert(0, str(tree))
    from tests.admin_client import Admin
    from tests.procs import free_port, start_mock, wait_http

    tmp = Path(tempfile.mkdtemp(prefix="call-count-"))
    token = secrets.token_hex(16)  # the throwaway gateway's admin token
    env = {**os.environ, "PYTHONPATH": str(tree), "GATEWAY_ADMIN_TOKEN": token}
    mock = start_mock(tmp, env=env)
    port = free_port()
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "watch_config": False},
        "store": {"url": "embedded", "data_dir": str(tmp / "data")},
        "rate_limits": {"requests": "1000000/minute", "tokens": "1000000000/minute"},
        "models": [
            {
                "name": "mock-model",
                "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
                "upstreams": [{"url": mock.url + "/v1"}],
            }
        ],
    }
    if (tree / "gateway" / "history").is_dir():
        # The export runs beside the calls and would be counted with them: off unless
        # --history asks to count it (a tree from before history has no such section).
        wanted = os.environ.get("CALL_COUNT_HISTORY") == "1"
        config["history"] = {"url": "embedded" if wanted else "off"}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
    profile = tmp / "gateway.prof"
    command = [sys.executable, "-m", "cProfile", "-o", str(profile), "-m", "gateway", "serve"]
    with (tmp / "gateway.log").open("w") as log:
        gateway = subprocess.Popen(
            [*command, "--config", str(tmp / "gateway.yaml")],
            cwd=tree,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/healthz", gateway, timeout=120)
        _, key = Admin(url, token=token).funded(["mock-model"], amount="100000.00")
        body: dict[str, Any] = {
            "model": "mock-model",
            "messages": [{"role": "user", "content": "hello there " * 40}],
            "max_tokens": 32,
            "stream": stream,
        }
        asyncio.run(_load(url, key, body, calls))
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(60)
        mock.stop()
    return pstats.Stats(str(profile)).total_calls  # type: ignore[attr-defined,no-any-return]


async def _load(url: str, key: str, body: dict[str, Any], calls: int) -> None:
    limit = asyncio.Semaphore(8)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:

        async def one() -> None:
            async with limit, session.post(url + "/v1/chat/completions", json=body) as reply:
                if reply.status != 200:
                    raise RuntimeError(f"{reply.status}: {await reply.text()}")
                await reply.read()

        await asyncio.gather(*(one() for _ in range(calls)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="the checkout to measure")
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument(
        "--history", action="store_true", help="with the history export running (embedded)"
    )
    args = parser.parse_args()
    # Each count in its own process: a tree's modules must not meet another's.
    if os.environ.get("CALL_COUNT_CHILD"):
        print(_count(args.tree.resolve(), args.calls, args.stream))
        return
    counts = []
    for calls in (0, args.calls):
        child = [sys.executable, __file__, "--tree", str(args.tree), "--calls", str(calls)]
        child += ["--stream"] if args.stream else []
        out = subprocess.run(
            child,
            env={
                **os.environ,
                "CALL_COUNT_CHILD": "1",
                "CALL_COUNT_HISTORY": str(int(args.history)),
            },
            capture_output=True,
            text=True,
            check=True,
        )
        counts.append(int(out.stdout.split()[-1]))
    per_call = (counts[1] - counts[0]) / args.calls
    mode = ("streamed" if args.stream else "whole answers") + (
        ", history on" if args.history else ""
    )
    print(f"{args.tree}: {per_call:.1f} Python calls per metered call ({mode}, {args.calls} calls)")


if __name__ == "__main__":
    main()
