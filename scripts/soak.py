"""Soak: load and faults together, then the audit. Opt-in (not part of the test suite).

Starts a store, a paced mock upstream and two gateways on loopback (each in its own process
group, as systemd runs a service); drives thousands of concurrent streamed and plain calls for
a bounded time with random client disconnects, upstream deaths mid-stream and upstream
errors. On top of that, three faults, a quarter of the run apart: the store is killed with
SIGKILL and restarted `--store-outage` seconds later; one gateway is killed with SIGKILL and
started again; the other gets SIGTERM sent to its whole process group (as systemd's
KillMode=control-group and a terminal's Ctrl-C deliver it) and is started again.

Every call answered 200 is noted by its `x-request-id`. At the end the script waits for the
journals and the sweepers, fetches every usage record, and reports the answered calls
without a usage record and the request ids with more than one; then it runs `inference-gateway
audit`. It exits 0 only when the audit passes and both counts are zero.

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
from concurrent.futures import ThreadPoolExecutor
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
# Faults run on one thread that lives as long as the script: a process started from a thread
# gets PR_SET_PDEATHSIG for that thread (the embedded store does), so a store restarted from a
# short-lived worker thread would be killed when that thread ends.
FAULTS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faults")


def _spawn(
    args: list[str], log: Path, env: dict[str, str], group: bool = False
) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=group,  # its own process group, which a group signal reaches
        )


def _gateway(tmp: Path, store_url: str, mock_port: int, port: int) -> subprocess.Popen[bytes]:
    config = {
        "server": {"host": "127.0.0.1", "port": port, "drain_timeout": "2s"},
        "store": {"url": store_url, "data_dir": str(tmp / f"gateway-{port}")},
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
        group=True,
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    return proc


async def _one(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    rng: random.Random,
    tally: Counter[str],
    answered: set[str],
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
            if resp.status == 200:
                answered.add(resp.headers["x-request-id"])
            if kind == "client_disconnect" and stream:
                await resp.content.readany()
                resp.close()
            else:
                await resp.read()
            tally[f"{kind}:{resp.status}"] += 1
    except (TimeoutError, aiohttp.ClientError) as exc:
        tally[f"{kind}:{exc.__class__.__name__}"] += 1


async def _load(
    urls: list[str], keys: list[str], duration: float, concurrency: int, faults: list[Any]
) -> tuple[Counter[str], set[str]]:
    """Run the load; fault i of n fires at (i + 1) / (n + 1) of the duration."""
    tally: Counter[str] = Counter()
    answered: set[str] = set()
    rng = random.Random(7)
    started = time.monotonic()
    deadline = started + duration
    due = [started + duration * (i + 1) / (len(faults) + 1) for i in range(len(faults))]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker(i: int) -> None:
            while time.monotonic() < deadline:
                url, key = urls[i % len(urls)], keys[i % len(keys)]
                await _one(session, url, key, rng, tally, answered)

        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        fired = 0
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if fired < len(faults) and time.monotonic() >= due[fired]:
                await loop.run_in_executor(FAULTS, faults[fired])
                fired += 1
        await asyncio.gather(*workers)
    return tally, answered


def _records(admin: Admin, account_ids: list[str]) -> Counter[str]:
    """How many usage records each request id has, over every account."""
    seen: Counter[str] = Counter()
    for account_id in account_ids:
        for record in admin.usage(account_id):
            seen[record["request_id"]] += 1
    return seen


def _say(text: str) -> None:
    print(f"[{time.strftime('%X')}] {text}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=2000, help="calls in flight")
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument(
        "--store-outage", type=float, default=5.0, help="seconds the store stays killed"
    )
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
        funded = [admin.funded(["soak"], amount="1000.00") for _ in range(args.accounts)]
        account_ids, keys = [a for a, _ in funded], [k for _, k in funded]
        urls = [f"http://127.0.0.1:{port}" for port in ports]

        def kill_store() -> None:
            _say(f"SIGKILL the store; back in {args.store_outage:g}s")
            store.kill()
            time.sleep(args.store_outage)
            store.start()
            _say("store restarted")

        def kill_gateway() -> None:
            _say(f"SIGKILL gateway on port {ports[1]}")
            gateways[1].send_signal(signal.SIGKILL)
            gateways[1].wait()
            gateways[1] = _gateway(tmp, store.url, mock_port, ports[1])
            _say(f"gateway on port {ports[1]} restarted")

        def group_sigterm() -> None:
            _say(f"SIGTERM to the process group of gateway on port {ports[0]}")
            os.killpg(gateways[0].pid, signal.SIGTERM)
            code = gateways[0].wait(timeout=60)
            gateways[0] = _gateway(tmp, store.url, mock_port, ports[0])
            _say(f"gateway on port {ports[0]} exited {code}; restarted")

        started = time.monotonic()
        tally, answered = asyncio.run(
            _load(
                urls,
                keys,
                args.duration,
                args.concurrency,
                [kill_store, kill_gateway, group_sigterm],
            )
        )
        print(f"load done in {time.monotonic() - started:.0f}s: {sum(tally.values())} calls")
        for outcome, count in sorted(tally.items()):
            print(f"  {outcome}: {count}")
        time.sleep(10)  # leases of the killed gateway's calls end; journals and sweepers settle
        records = _records(admin, account_ids)
        missing = answered - set(records)
        doubled = [rid for rid, n in records.items() if n > 1]
        print(f"answered 200: {len(answered)}; usage records: {sum(records.values())}")
        print(f"answered calls without a usage record: {len(missing)} {sorted(missing)[:5]}")
        print(f"request ids with more than one record: {len(doubled)} {doubled[:5]}")
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
        return 0 if audit.returncode == 0 and not missing and not doubled else 1
    finally:
        for proc in [*gateways, mock]:
            proc.send_signal(signal.SIGTERM)
        for proc in [*gateways, mock]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.stop()
        FAULTS.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
