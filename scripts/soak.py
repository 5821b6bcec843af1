"""Soak: load and faults together, then the audit. Opt-in (not part of the test suite).

Starts a store, a paced mock upstream and two gateways on loopback; drives thousands of
concurrent streamed and plain calls for a bounded time with random client disconnects,
upstream deaths mid-stream and upstream errors; kills one gateway with SIGKILL halfway and
starts it again; then waits for the orphan sweeper and runs `inference-gateway audit`, whose
exit code is this script's.

    python scripts/soak.py --duration 600 --concurrency 2000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.procs import free_port, wait_http

ADMIN_TOKEN = "soak-admin-token"


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )


def _gateway(tmp: Path, store_url: str, mock_port: int, port: int) -> subprocess.Popen[bytes]:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout": "2s"},
        "store": {"url": store_url},
        "billing": {"hold_lease": "3s", "checkpoint_tokens": 20, "sweep_interval": "250ms"},
        "rate_limits": {"requests": "1000000/minute", "tokens": "1000000000/minute"},
        "proxy": {"timeouts": {"first_byte": "10s", "idle": "10s"}},
        "models": [
            {
                "name": "soak",
                "pricing": {"input_per_million": "0.5", "output_per_million": "1.5"},
                "upstreams": [{"url": f"http://127.0.0.1:{mock_port}/v1", "model": "mock-model"}],
            }
        ],
    }
    path = tmp / f"gateway-{port}.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = _spawn(
        ["serve", "--config", str(path), "--log-level", "warning"],
        tmp / f"gateway-{port}.log",
        {"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


async def _one(
    session: aiohttp.ClientSession, url: str, key: str, rng: random.Random, tally: Counter[str]
) -> None:
    roll = rng.random()
    stream = rng.random() < 0.8
    body = {
        "model": "soak",
        "messages": [{"role": "user", "content": "soak " * rng.randint(1, 200)}],
        "max_tokens": rng.randint(5, 80),
        "stream": stream,
    }
    headers = {"Authorization": f"Bearer {key}", "x-mock-token-delay": "0.02"}
    kind = "ok"
    if roll < 0.10:
        kind = "client_disconnect"
    elif roll < 0.20:
        kind = "upstream_dies"
        headers["x-mock-disconnect-after"] = str(rng.randint(1, 5))
    elif roll < 0.25:
        kind = "upstream_500"
        headers["x-mock-status"] = "500"
    try:
        async with session.post(
            url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
        ) as resp:
            if kind == "client_disconnect" and stream:
                await resp.content.readany()
                resp.close()
            else:
                await resp.read()
            tally[f"{kind}:{resp.status}"] += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally[f"{kind}:{exc.__class__.__name__}"] += 1


async def _load(
    urls: list[str], keys: list[str], duration: float, concurrency: int, kill: Any
) -> Counter[str]:
    tally: Counter[str] = Counter()
    rng = random.Random(7)
    deadline = time.monotonic() + duration
    killed = False
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(i: int) -> None:
            while time.monotonic() < deadline:
                await _one(session, urls[i % len(urls)], keys[i % len(keys)], rng, tally)

        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        while time.monotonic() < deadline:
            await asyncio.sleep(1)
            if not killed and time.monotonic() > deadline - duration / 2:
                killed = True
                await asyncio.to_thread(kill)
        await asyncio.gather(*workers)
    return tally


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=2000, help="calls in flight")
    parser.add_argument("--accounts", type=int, default=50)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    store = EmbeddedStore(tmp / "store", port=free_port())
    store.start()
    mock_port = free_port()
    mock = _spawn(["mock-upstream", "--port", str(mock_port)], tmp / "mock.log", {})
    wait_http(f"http://127.0.0.1:{mock_port}/healthz", mock)
    ports = [free_port(), free_port()]
    gateways = [_gateway(tmp, store.url, mock_port, port) for port in ports]
    try:
        admin = Admin(f"http://127.0.0.1:{ports[0]}", token=ADMIN_TOKEN)
        keys = [admin.funded(["soak"], amount="1000.00")[1] for _ in range(args.accounts)]
        urls = [f"http://127.0.0.1:{port}" for port in ports]

        def kill() -> None:
            print(f"[{time.strftime('%X')}] SIGKILL gateway on port {ports[1]}", flush=True)
            gateways[1].send_signal(signal.SIGKILL)
            gateways[1].wait()
            gateways[1] = _gateway(tmp, store.url, mock_port, ports[1])
            print(f"[{time.strftime('%X')}] gateway on port {ports[1]} restarted", flush=True)

        started = time.monotonic()
        tally = asyncio.run(_load(urls, keys, args.duration, args.concurrency, kill))
        print(f"load done in {time.monotonic() - started:.0f}s: {sum(tally.values())} calls")
        for outcome, count in sorted(tally.items()):
            print(f"  {outcome}: {count}")
        time.sleep(5)  # leases of the killed gateway's calls end; the sweepers settle them
        config = tmp / "audit.yaml"
        config.write_text(yaml.safe_dump({"store": {"url": store.url}}))
        audit = subprocess.run(
            [sys.executable, "-m", "gateway", "audit", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        print(audit.stdout, audit.stderr)
        print("audit", "PASSED" if audit.returncode == 0 else "FAILED")
        return audit.returncode
    finally:
        for proc in [*gateways, mock]:
            proc.send_signal(signal.SIGTERM)
        for proc in [*gateways, mock]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.stop()


if __name__ == "__main__":
    raise SystemExit(main())
