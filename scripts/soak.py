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

With `--history` the two gateways export to one PostgreSQL (the embedded one the product
runs, `gateway.history.embedded`, started by this script on a fixed port so that it outlives
the gateways' restarts, and given to both as `history.url: postgresql://...`, as instances
sharing a store share a database; with `history.url: embedded` each gateway would run a
database of its own and trim records the other's lacks), with a short
`history.keep_in_store` (`--keep-in-store`, 10s) and `history.export_interval`
(`--export-interval`, 200ms); `history.settled_ttl` is set only when `--settled-ttl` is given.
After the faults, a steady phase runs the same load without faults: `--warmup` seconds for
the usage streams to reach their trimmed length, then `--steady` seconds in which the store's
memory is sampled every `--sample-every` seconds. The run then also fails unless the memory
is flat once history is exported (`_flat`, which says why its bounds are what they are):

- each usage stream holds only recent records: the entries of all of them stay below the calls
  ended in the last keep_in_store + 5 s plus the calls in flight;
- the rest of `used_memory` (less client buffers, the AOF buffer, the keyspace's hash tables,
  which grow in doublings, and the usage streams) grows by no more than the settled markers
  added meanwhile (the keys added: every other key is per account and older than the window)
  times a marker's size (MEMORY USAGE, mean of sampled markers) plus 10%, plus a slack of
  256 KiB and 1 KiB per call in flight; and its slope against the keys added is at most 1.25
  markers per key (`history.settled_ttl` is at least 10 minutes: markers made in the window
  outlive it, and any older ones expiring meanwhile count as keys removed).

    python scripts/soak.py --history --duration 60 --concurrency 300 --steady 60
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis.asyncio as aioredis
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config.types import parse_duration
from gateway.history.embedded import EmbeddedPostgres
from gateway.ledger.keys import account_keys
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


def _gateway(
    tmp: Path,
    store_url: str,
    mock_port: int,
    port: int,
    history: dict[str, Any] | None = None,
) -> subprocess.Popen[bytes]:
    config: dict[str, Any] = {
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
    # Without --history, off: two gateways on one store, each with a database of its own,
    # would export the same records twice over.
    config["history"] = history if history is not None else {"url": "off"}
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
    urls: list[str],
    keys: list[str],
    duration: float,
    concurrency: int,
    faults: list[Any],
    done: list[float] | None = None,
    watch: Coroutine[Any, Any, None] | None = None,
) -> tuple[Counter[str], set[str]]:
    """Run the load; fault i of n fires at (i + 1) / (n + 1) of the duration. Each call's
    end time goes to `done` if given; `watch` runs beside the load and is awaited with it."""
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
                if done is not None:
                    done.append(time.monotonic())

        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        if watch is not None:
            workers.append(asyncio.create_task(watch))
        fired = 0
        loop = asyncio.get_running_loop()
        while time.monotonic() < deadline:
            await asyncio.sleep(0.5)
            if fired < len(faults) and time.monotonic() >= due[fired]:
                await loop.run_in_executor(FAULTS, faults[fired])
                fired += 1
        await asyncio.gather(*workers)
    return tally, answered


# -- the store's memory with history on ---------------------------------------------------

SETTLED_PATTERN = "gw:{a:*}:settled:*"
# Records live keep_in_store, then wait at most one trim period (a tenth of it, at most 1 min)
# and an export pass or two: more than this past keep_in_store is a stream not trimmed.
TRIM_MARGIN_S = 5.0
# What the rest of used_memory may move by besides the markers, none of it per call: the
# calls in flight (each a hold, its lease, hold info and checkpoint: four hash fields, well
# under 1 KiB), counted per call of --concurrency, plus 256 KiB for the slow log (128
# entries), the usage streams' MEMORY USAGE (which counts a listpack's used bytes, not its
# allocation) and objects a background thread frees lazily.
SLACK_BYTES = 256 * 1024
SLACK_PER_CALL_IN_FLIGHT = 1024
MARKER_FACTOR = 1.1  # markers' names are all of one length; 10% for the allocator's rounding
# Over the window, the rest's least-squares slope against the keys added, in marker sizes:
# above this, something besides the markers grows with the calls (an untrimmed usage record
# adds some 1.4 markers' worth, benchmarks/store_memory.py). Fitted only over 1,000 keys.
SLOPE_FACTOR = 1.25
SLOPE_MIN_KEYS = 1000


@dataclass
class Sample:
    """One reading of the store during the steady phase."""

    at: float  # seconds into the sampled window
    used: int  # INFO memory used_memory
    buffers: int  # client buffers and the AOF buffer
    tables: int  # the keyspace's hash tables (a rehash in progress included)
    streams: int  # MEMORY USAGE of every account's usage stream
    entries: int  # their entries (XLEN)
    keys: int  # DBSIZE
    recent: int  # calls ended in the last keep_in_store + TRIM_MARGIN_S

    @property
    def rest(self) -> int:
        return self.used - self.buffers - self.tables - self.streams


def _dict(raw: Any) -> dict[str, Any]:
    """A reply of field/value pairs (a map, or a flat array under RESP2) with text keys."""
    pairs = raw.items() if isinstance(raw, dict) else zip(raw[::2], raw[1::2], strict=True)
    return {(k.decode() if isinstance(k, bytes) else str(k)): v for k, v in pairs}


async def _sample(
    client: aioredis.Redis,
    account_ids: list[str],
    done: list[float],
    keep: float,
    started: float,
) -> Sample:
    pipe = client.pipeline(transaction=False)
    pipe.info("memory")
    pipe.execute_command("MEMORY", "STATS")
    pipe.dbsize()
    for account_id in account_ids:
        usage = account_keys(account_id).usage
        pipe.xlen(usage)
        pipe.memory_usage(usage, samples=0)
    info, stats, keys, *streams = await pipe.execute()
    now = time.monotonic()
    stats = _dict(stats)
    tables = sum(
        int(v) for k, v in _dict(stats.get("db.0") or {}).items() if k.startswith("overhead.")
    )
    return Sample(
        at=now - started,
        used=int(info["used_memory"]),
        buffers=int(info["mem_clients_normal"]) + int(info.get("mem_aof_buffer", 0)),
        tables=tables + int(stats.get("overhead.db.hashtable.rehashing", 0)),
        streams=sum(int(n or 0) for n in streams[1::2]),
        entries=sum(int(n) for n in streams[0::2]),
        keys=int(keys),
        recent=len(done) - bisect.bisect_left(done, now - keep - TRIM_MARGIN_S),
    )


async def _marker_size(client: aioredis.Redis, wanted: int = 500) -> float:
    """The mean MEMORY USAGE of up to `wanted` settled markers (0 when there are none)."""
    found: list[bytes] = []
    async for key in client.scan_iter(match=SETTLED_PATTERN, count=1000):
        found.append(key)
        if len(found) >= wanted:
            break
    if not found:
        return 0.0
    pipe = client.pipeline(transaction=False)
    for key in found:
        pipe.memory_usage(key, samples=0)
    sizes = [int(n or 0) for n in await pipe.execute()]
    return sum(sizes) / len(sizes)


async def _watch_memory(
    store_url: str,
    account_ids: list[str],
    done: list[float],
    keep: float,
    warmup: float,
    steady: float,
    every: float,
    samples: list[Sample],
    marker_size: list[float],
) -> None:
    """After `warmup` seconds, sample the store every `every` seconds for `steady` seconds;
    then measure a marker."""
    client = aioredis.Redis.from_url(store_url)
    try:
        await asyncio.sleep(warmup)
        started = time.monotonic()
        end = started + steady - 0.5  # before the load stops
        while True:
            samples.append(await _sample(client, account_ids, done, keep, started))
            if time.monotonic() + every > end:
                break
            await asyncio.sleep(every)
        marker_size.append(await _marker_size(client))
    finally:
        await client.aclose()


def _flat(samples: list[Sample], marker_bytes: float, concurrency: int, keep: float) -> bool:
    """Print the samples; True when the store's memory is flat in the sense of the module
    docstring. Against the first sample of the window, at every sample:

    - entries <= calls ended in the last keep_in_store + TRIM_MARGIN_S, plus `concurrency`
      (each call appends at most one usage record; those in flight may have appended theirs);
    - growth of `rest` (used_memory less client and AOF buffers, hash tables and the usage
      streams) <= the keys added (the settled markers: no other key is made per call) times
      `marker_bytes` times MARKER_FACTOR, plus SLACK_BYTES. Hash tables are left out because
      they double at a power of two of the key count, a step of up to 16 bytes times the keys
      (main and expires), which lands in some windows and not others; the markers' share of
      them is counted by benchmarks/store_memory.py. Markers expiring (a short settled_ttl)
      make `added` negative: the rest must then drop by nearly as much (0.9 of a marker each);

    and over the window, the slope of `rest` against the keys (least squares, once the keys
    moved by SLOPE_MIN_KEYS) <= SLOPE_FACTOR markers: the growth is the markers', not a
    constant offset the slack hides in a short run.
    """
    print(
        f"store memory, sampled after the warm-up (marker MEMORY USAGE {marker_bytes:.0f} B; "
        f"keep_in_store {keep:g}s):"
    )
    print(
        "     t s |  used_memory |  buffers |   tables | usage streams B |   entries/cap "
        "|    keys | added | rest growth / allowed |"
    )
    flat = len(samples) >= 2
    if not flat:
        print("  fewer than two samples: make --steady longer than --sample-every")
    base = samples[0] if samples else None
    slack = SLACK_BYTES + concurrency * SLACK_PER_CALL_IN_FLIGHT
    for s in samples:
        assert base is not None
        added = s.keys - base.keys
        factor = MARKER_FACTOR if added >= 0 else 0.9
        allowed = added * marker_bytes * factor + slack
        growth = s.rest - base.rest
        cap = s.recent + concurrency
        ok = growth <= allowed and s.entries <= cap
        flat = flat and ok
        print(
            f"  {s.at:6.1f} | {s.used:12,} | {s.buffers:8,} | {s.tables:8,} | "
            f"{s.streams:15,} | {s.entries:6,}/{cap:<6,} | {s.keys:7,} | {added:5,} | "
            f"{growth:10,} / {allowed:10,.0f} | {'ok' if ok else 'NOT FLAT'}"
        )
    if len(samples) >= 2:
        first, last = samples[0], samples[-1]
        added = last.keys - first.keys
        span = last.at - first.at
        print(
            f"  over {span:.0f}s: used_memory {last.used - first.used:+,} B "
            f"({(last.used - first.used) / span:+,.0f} B/s), markers {added:+,} "
            f"({added / span:,.0f}/s), rest {last.rest - first.rest:+,} B "
            f"({(last.rest - first.rest) / max(added, 1):,.0f} B per marker added)"
        )
        xs = [s.keys - first.keys for s in samples]
        ys = [s.rest - first.rest for s in samples]
        if max(xs) - min(xs) >= SLOPE_MIN_KEYS and len(samples) >= 3:
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
                (x - mx) ** 2 for x in xs
            )
            bound = marker_bytes * SLOPE_FACTOR
            ok = slope <= bound
            flat = flat and ok
            print(
                f"  rest against keys: {slope:,.0f} B per key added (bound {bound:,.0f}: "
                f"{SLOPE_FACTOR:g} markers): {'ok' if ok else 'NOT FLAT'}"
            )
        else:
            print("  rest against keys: not fitted (the keys moved by under 1,000)")
    print("memory flat:", "PASSED" if flat else "FAILED")
    return flat


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
    parser.add_argument(
        "--history",
        action="store_true",
        help="export to one PostgreSQL, then check that the store's memory is flat",
    )
    parser.add_argument("--keep-in-store", default="10s", help="history.keep_in_store")
    parser.add_argument("--export-interval", default="200ms", help="history.export_interval")
    parser.add_argument(
        "--settled-ttl", default=None, help="history.settled_ttl (left unset by default)"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=20.0,
        help="seconds of steady load before sampling (at least keep_in_store + 10)",
    )
    parser.add_argument("--steady", type=float, default=60.0, help="seconds sampled")
    parser.add_argument("--sample-every", type=float, default=5.0)
    args = parser.parse_args()
    keep = parse_duration(args.keep_in_store)
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    store = EmbeddedStore(tmp / "store", port=free_port())
    store.start()
    history: dict[str, Any] | None = None
    database: EmbeddedPostgres | None = None
    if args.history:
        # One database for both gateways, outliving their restarts (see the docstring).
        database = EmbeddedPostgres(tmp / "history", port=free_port())
        history = {
            "url": database.start(),
            "keep_in_store": args.keep_in_store,
            "export_interval": args.export_interval,
        }
        if args.settled_ttl:
            history["settled_ttl"] = args.settled_ttl
    mock_port = free_port()
    mock = _spawn(["mock-upstream", "--port", str(mock_port)], tmp / "mock.log", {})
    wait_http(f"http://127.0.0.1:{mock_port}/healthz", mock)
    ports = [free_port(), free_port()]
    gateways = [_gateway(tmp, store.url, mock_port, port, history) for port in ports]
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
            gateways[1] = _gateway(tmp, store.url, mock_port, ports[1], history)
            _say(f"gateway on port {ports[1]} restarted")

        def group_sigterm() -> None:
            _say(f"SIGTERM to the process group of gateway on port {ports[0]}")
            os.killpg(gateways[0].pid, signal.SIGTERM)
            code = gateways[0].wait(timeout=60)
            gateways[0] = _gateway(tmp, store.url, mock_port, ports[0], history)
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
        flat = True
        if args.history:
            warmup = max(args.warmup, keep + 10.0)
            _say(f"steady load: {warmup:g}s of warm-up, then {args.steady:g}s sampled")
            samples: list[Sample] = []
            marker_size: list[float] = []
            done: list[float] = []
            watch = _watch_memory(
                store.url,
                account_ids,
                done,
                keep,
                warmup,
                args.steady,
                args.sample_every,
                samples,
                marker_size,
            )
            steady, steady_answered = asyncio.run(
                _load(
                    urls,
                    keys,
                    warmup + args.steady,
                    args.concurrency,
                    [],
                    done=done,
                    watch=watch,
                )
            )
            print(f"steady load: {sum(steady.values())} calls")
            for outcome, count in sorted(steady.items()):
                print(f"  {outcome}: {count}")
            tally.update(steady)
            answered |= steady_answered
            flat = _flat(samples, marker_size[0] if marker_size else 0.0, args.concurrency, keep)
        time.sleep(10)  # leases of the killed gateway's calls end; journals and sweepers settle
        records = _records(admin, account_ids)
        missing = answered - set(records)
        doubled = [rid for rid, n in records.items() if n > 1]
        print(f"answered 200: {len(answered)}; usage records: {sum(records.values())}")
        print(f"answered calls without a usage record: {len(missing)} {sorted(missing)[:5]}")
        print(f"request ids with more than one record: {len(doubled)} {doubled[:5]}")
        config = tmp / "audit.yaml"
        audited: dict[str, Any] = {"store": {"url": store.url}}
        if history is not None:
            audited["history"] = {"url": history["url"]}
        config.write_text(yaml.safe_dump(audited))
        audit = subprocess.run(
            [sys.executable, "-m", "gateway", "audit", "--config", str(config)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        print(audit.stdout, audit.stderr)
        print("audit", "PASSED" if audit.returncode == 0 else "FAILED")
        passed = audit.returncode == 0 and not missing and not doubled and flat
        if args.history:
            print("memory flat:", "PASSED" if flat else "FAILED")
        return 0 if passed else 1
    finally:
        for proc in [*gateways, mock]:
            proc.send_signal(signal.SIGTERM)
        for proc in [*gateways, mock]:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        store.stop()
        if database is not None:
            database.stop()
        FAULTS.shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
