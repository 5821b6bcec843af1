"""Where a metered call's CPU goes: the gateway under load, sampled by py-spy.

    python benchmarks/profile_gateway.py                 # 10 s, 32 connections, non-streamed
    python benchmarks/profile_gateway.py --stream        # the same, streamed
    python benchmarks/profile_gateway.py --metering off  # the proxy alone, for comparison
    python benchmarks/profile_gateway.py --upstream nginx # bench_proxy.py's native upstream

Starts the project's mock upstream (CPU 1) and one gateway worker on its embedded store
(CPU 0), makes a funded account and key through the admin API, drives the gateway with N
keep-alive connections from this process (CPU 1) and records the gateway process with
`py-spy record` (installed with the test extras) for the duration. It prints the calls per
second reached, the share of samples per part of the stack (inclusive: a sample counts for
every part it passes through) and the top functions by own time, and keeps the raw collapsed
stacks (for flame graphs) in `--out`. The optimisation notes in benchmarks/README.md quote
this output.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp
import yaml

HOST = "127.0.0.1"
GATEWAY_CPU, CLIENT_CPU = 0, 1
TOKENS = 64

# uvloop runs callbacks from C, so a sample's Python stack starts at the task or callback that
# was running: own time grouped by where its code lives is the view that survives that.
IDLE_LEAF = "run_app ("  # the loop waiting in C: idle time of the worker


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def wait_ok(url: str, timeout: float = 30.0) -> None:  # loopback http:// URLs only
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:  # noqa: S310
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer 200 within {timeout}s")


def admin(port: int, token: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        f"http://{HOST}:{port}/admin{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as reply:  # noqa: S310
        return json.loads(reply.read() or b"null")


def provision(port: int, token: str) -> str:
    account = admin(port, token, "POST", "/accounts", {"id": "prof"})["id"]
    admin(port, token, "POST", f"/accounts/{account}/topups", {"amount": "1000000.00"})
    admin(port, token, "POST", f"/accounts/{account}/subscriptions", {"model": "bench-model"})
    return str(admin(port, token, "POST", f"/accounts/{account}/keys", {})["key"])


async def drive(port: int, key: str, stream: bool, connections: int, seconds: float) -> int:
    """Closed-loop load: each connection sends its next call when the last one ended."""
    body = json.dumps(
        {
            "model": "bench-model",
            "messages": [{"role": "user", "content": "Summarize these notes. " * 45}],
            "max_tokens": TOKENS,
            "stream": stream,
        }
    ).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    done = 0
    deadline = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:

        async def worker() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                async with session.post(
                    f"http://{HOST}:{port}/v1/chat/completions", data=body
                ) as reply:
                    await reply.read()
                    if reply.status != 200:
                        raise RuntimeError(f"HTTP {reply.status}")
                done += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
    return done


def component(frame: str) -> str:
    """`gateway/ledger/ledger.py`, `redis`, `asyncio`... for a `func (path:line)` frame."""
    match = re.search(r"\((.+?):\d+\)$", frame)
    path = match.group(1) if match else frame
    if path.startswith("gateway/"):
        return path
    top = path.split("/", 1)[0]
    return top.removesuffix(".py")


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def family(pid: int) -> dict[str, int]:
    """The process and its children (the embedded Valkey), by command name."""
    found = {"gateway": pid}
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            found[Path(f"/proc/{child}/comm").read_text().strip()] = int(child)
    return found


def start_native(
    work: Path, mock_port: int, pinned: bool, procs: list[subprocess.Popen[bytes]]
) -> str:
    """bench_proxy.py's nginx upstream (canned answers of the mock), on the client's CPU."""
    sys.path.insert(0, str(Path(__file__).parent))
    from rig.nginx import canned_answers, find_nginx, start_nginx

    binary = find_nginx()
    if binary is None:
        raise SystemExit("nginx is not installed (bench_proxy.py installs nginx-light)")
    plain, sse = canned_answers(mock_port)
    pin = ["taskset", "-c", str(CLIENT_CPU)] if pinned else []
    proc = start_nginx(binary, work, pin, mock_port, plain, sse)
    procs.append(proc.popen)
    wait_ok(f"http://{HOST}:{proc.port}/healthz")
    return f"http://{HOST}:{proc.port}/v1"


def summarize(raw: Path, top: int) -> str:
    by_thread: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
    for line in raw.read_text().splitlines():
        stack, _, tail = line.rpartition(" ")
        if stack and tail.isdigit():
            thread, _, rest = stack.partition(";")
            by_thread[thread].append((rest, int(tail)))
    # The event loop's thread: the one serving HTTP. Pool threads (tokenizer off-loading,
    # DNS, file watching) mostly wait, and py-spy cannot always tell waiting from working.
    stacks = max(by_thread.values(), key=lambda items: sum(c for s, c in items if "aiohttp/" in s))
    total = sum(count for _, count in stacks) or 1
    own: collections.Counter[str] = collections.Counter()
    parts: collections.Counter[str] = collections.Counter()
    for stack, count in stacks:
        leaf = stack.rsplit(";", 1)[-1]
        own[leaf] += count
        parts["(idle: loop waiting)" if leaf.startswith(IDLE_LEAF) else component(leaf)] += count
    lines = [f"samples of the event loop's thread: {total}", ""]
    lines += ["| own time in | share |", "|---|---:|"]
    for name, count in parts.most_common(top):
        lines.append(f"| {name} | {100 * count / total:.1f}% |")
    lines += ["", "| top functions by own time | share |", "|---|---:|"]
    for frame, count in own.most_common(top):
        lines.append(f"| `{frame[:110]}` | {100 * count / total:.1f}% |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--metering", choices=("on", "off"), default="on")
    parser.add_argument(
        "--rate", type=int, default=250, help="py-spy samples per second (0: no profile)"
    )
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--upstream",
        choices=("mock", "nginx"),
        default="mock",
        help="the python mock, or nginx with the mock's canned answers (as bench_proxy.py)",
    )
    parser.add_argument("--appendfsync", choices=("always", "everysec"), default="everysec")
    parser.add_argument(
        "--history",
        choices=("embedded", "off"),
        default="embedded",
        help="the usage history's export to PostgreSQL (the gateway's default: embedded)",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    py_spy = shutil.which("py-spy", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    if py_spy is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    pinned = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pinned:
        os.sched_setaffinity(0, {CLIENT_CPU})
    work = Path(tempfile.mkdtemp(prefix="gw-profile-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        mock_port, gw_port = free_port(), free_port()
        procs.append(
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "gateway", "mock-upstream", "--host", HOST),
                    *("--port", str(mock_port), "--max-tokens", str(TOKENS)),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        upstream_url = f"http://{HOST}:{mock_port}/v1"
        if args.upstream == "nginx":
            wait_ok(f"http://{HOST}:{mock_port}/healthz")
            upstream_url = start_native(work, mock_port, pinned, procs)
        token = secrets.token_urlsafe(16)
        config = {
            "server": {"host": HOST, "port": gw_port, "admin_token_env": "PROFILE_ADMIN"},
            "store": {
                "url": "embedded",
                "data_dir": str(work / "store"),
                "appendfsync": args.appendfsync,
            },
            "rate_limits": {"requests": "1000000/minute", "tokens": "1000000000/minute"},
            "billing": {"metering": args.metering == "on"},
            "history": {"url": args.history},
            "models": [
                {
                    "name": "bench-model",
                    "tokenizer": "o200k_base",
                    "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
                    "upstreams": [{"url": upstream_url, "model": "m"}],
                }
            ],
        }
        (work / "gw.yaml").write_text(yaml.safe_dump(config))
        pin = ["taskset", "-c", str(GATEWAY_CPU)] if pinned else []
        with (work / "gw.log").open("wb") as log:
            gateway = subprocess.Popen(
                [*pin, sys.executable, "-m", "gateway", "serve", "--config", str(work / "gw.yaml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PROFILE_ADMIN": token},
            )
        procs.append(gateway)
        wait_ok(f"http://{HOST}:{mock_port}/healthz")
        wait_ok(f"http://{HOST}:{gw_port}/healthz")
        key = provision(gw_port, token) if args.metering == "on" else "none"
        asyncio.run(drive(gw_port, key, args.stream, args.connections, 2.0))  # warm-up
        args.out.mkdir(parents=True, exist_ok=True)
        mode = ("stream" if args.stream else "plain") + ("" if args.metering == "on" else "-off")
        raw = args.out / f"profile-{mode}.txt"
        spy = (
            None
            if args.rate == 0
            else subprocess.Popen(
                [
                    *(py_spy, "record", "--pid", str(gateway.pid), "--rate", str(args.rate)),
                    *(
                        "--duration",
                        str(int(args.seconds)),
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                    ),
                    "--threads",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        watched = {**family(gateway.pid), "mock upstream": procs[0].pid, "load": os.getpid()}
        before = {name: cpu_seconds(pid) for name, pid in watched.items()}
        started = time.monotonic()
        calls = asyncio.run(drive(gw_port, key, args.stream, args.connections, args.seconds))
        elapsed = time.monotonic() - started
        used = {name: cpu_seconds(pid) - before[name] for name, pid in watched.items()}
        if spy is None:
            per_call = {name: round(1e6 * sec / calls) for name, sec in used.items()}
            print(f"{calls / elapsed:.0f} calls/s; CPU µs per call: {per_call}")
            return 0
        spy.wait(timeout=args.seconds + 30)
        print(
            f"# gateway profile: metering {args.metering}, {mode}, {args.connections} conns, "
            f"{calls} calls in {elapsed:.1f} s = {calls / elapsed:.0f} calls/s "
            f"({'pinned' if pinned else 'unpinned'}); raw stacks: {raw}\n"
        )
        print("| process | CPU s per 1000 calls | CPU share of the run |\n|---|---:|---:|")
        for name, seconds in used.items():
            print(f"| {name} | {1000 * seconds / calls:.3f} | {100 * seconds / elapsed:.0f}% |")
        print("(py-spy itself pauses the gateway briefly at each sample)\n")
        print(summarize(raw, args.top))
        return 0
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if os.environ.get("PROFILE_KEEP"):
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
