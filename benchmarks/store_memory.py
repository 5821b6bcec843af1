"""How much store memory does an account cost, and a metered call, with and without history?

Issue 16: each metered call grew the store's `used_memory` for good (the usage record in the
account's stream `gw:{a:<id>}:usage`, never trimmed, and the settled marker
`gw:{a:<id>}:settled:<request id>`, a string with a TTL). With `history` on, the gateway
exports the records to PostgreSQL and trims exported ones older than `keep_in_store`.

This measures it with real processes on loopback: an embedded Valkey (the product's
EmbeddedStore, `appendfsync everysec`), the project's mock upstream and `inference-gateway
serve`, once per configuration:

- `off`: `history.url: off` (the store keeps every record, as before history existed);
- `on`: `history.url: embedded` (serve starts its private PostgreSQL in
  `<store.data_dir>/history`), a short `keep_in_store` and `export_interval`, and
  `history.settled_ttl` only when `--settled-ttl` is given.

For each: `--accounts` accounts are created through the admin API with one top-up each
(then a subscription and an API key), `--calls` small non-streamed chat calls are made
`--concurrency` at a time, round-robin over the accounts' keys; then the script waits for
the steady state (`off`: the usage streams hold every call; `on`: every usage stream is
exported and trimmed, XLEN 0). It reads `INFO memory` `used_memory` at each point and
reports bytes per account and bytes per call (delta / calls) right after the calls and at
the steady state, with how many settled markers remain (`DBSIZE`, a SCAN count) and the
share of the steady delta they hold. That share is measured, not estimated: the markers are
then deleted (what their TTL's expiry will do: `history.settled_ttl` is at least 10 minutes,
longer than a run) and the drop is their memory. Valkey's hash tables (MEMORY STATS
`overhead.hashtable.*`) grow in doublings, so a per-key figure carries a share of one
doubling; the table part is printed too. Before the baseline a warm-up does everything once
(the server allocates some memory on a command's or a script's first use).

    python benchmarks/store_memory.py [--accounts 100] [--calls 20000] [--concurrency 32]
        [--configs off,on] [--keep-in-store 5s] [--export-interval 100ms] [--settled-ttl 10m]

It prints a table and a key census per configuration; `--json` writes the raw numbers.
Exit code 1 if calls failed or the steady state was not reached.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.config.types import parse_duration
from gateway.ledger.keys import ACCOUNTS, account_keys
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import ADMIN_TOKEN, Admin
from tests.procs import Proc, start_gateway, start_mock, wait_http

MODEL = "mem"
SETTLED_PATTERN = "gw:{a:*}:settled:*"
USAGE_PATTERN = "gw:{a:*}:usage"


@dataclass
class Mem:
    """One reading of the store's memory."""

    used: int
    tables: int  # the keyspace's hash tables (main, expires, a rehash in progress)
    clients: int
    keys: int

    @classmethod
    def read(cls, client: redis.Redis) -> Mem:
        info: Any = client.info("memory")
        stats: Any = client.execute_command("MEMORY", "STATS")
        stats = {_s(k): v for k, v in stats.items()}
        db = {_s(k): v for k, v in (stats.get("db.0") or {}).items()}
        tables = sum(int(v) for k, v in db.items() if k.startswith("overhead.hashtable"))
        tables += int(stats.get("overhead.db.hashtable.rehashing", 0))
        return cls(
            used=int(info["used_memory"]),
            tables=tables,
            clients=int(info["mem_clients_normal"]),
            keys=int(client.dbsize()),
        )


@dataclass
class Result:
    config: str
    accounts: int
    calls: int
    statuses: dict[str, int] = field(default_factory=dict)
    call_seconds: float = 0.0
    steady_seconds: float = 0.0
    steady_reached: bool = False
    settled_ttl: int = -1  # the TTL a marker had at the steady state (seconds)
    mem: dict[str, Mem] = field(default_factory=dict)
    usage_entries: dict[str, int] = field(default_factory=dict)
    markers: dict[str, int] = field(default_factory=dict)
    census: list[tuple[str, int, int]] = field(default_factory=list)  # pattern, keys, bytes


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _say(text: str) -> None:
    print(f"[{time.strftime('%X')}] {text}", file=sys.stderr, flush=True)


# -- the store ----------------------------------------------------------------------------


def _scan_count(client: redis.Redis, pattern: str) -> int:
    return sum(1 for _ in client.scan_iter(match=pattern, count=1000))


def _usage_entries(client: redis.Redis, account_ids: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for account_id in account_ids:
        pipe.xlen(account_keys(account_id).usage)
    return sum(int(n) for n in pipe.execute())


_TAG = re.compile(r"\{a:[^}]*\}")


def _pattern(key: str) -> str:
    """A key name with its account and per-call parts as `*`."""
    tagged = _TAG.search(key) is not None
    parts = _TAG.sub("{a:*}", key).split(":")
    if tagged:
        head = next(i for i, p in enumerate(parts) if p == "*}") + 2
        return ":".join(parts[:head] + ["*"] * min(1, len(parts) - head))
    return ":".join("*" if len(p) >= 16 else p for p in parts)


def _census(client: redis.Redis) -> list[tuple[str, int, int]]:
    """Every key pattern with its key count and the sum of MEMORY USAGE over its keys."""
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    batch: list[str] = []

    def flush() -> None:
        pipe = client.pipeline(transaction=False)
        for key in batch:
            pipe.memory_usage(key, samples=0)
        for key, size in zip(batch, pipe.execute(), strict=True):
            pattern = _pattern(key)
            counts[pattern] += 1
            sizes[pattern] += int(size or 0)
        batch.clear()

    for raw in client.scan_iter(count=1000):
        batch.append(_s(raw))
        if len(batch) >= 1000:
            flush()
    flush()
    return sorted(((p, counts[p], sizes[p]) for p in counts), key=lambda row: -row[2])


def _delete(client: redis.Redis, pattern: str, spare: str) -> int:
    """Delete the keys matching `pattern` but those of account `spare`."""
    deleted = 0
    batch: list[bytes] = []
    spared = f"{{a:{spare}}}".encode()
    for key in client.scan_iter(match=pattern, count=1000):
        if spared in key:
            continue
        batch.append(key)
        if len(batch) >= 1000:
            deleted += int(client.delete(*batch))
            batch.clear()
    if batch:
        deleted += int(client.delete(*batch))
    return deleted


def _quiet_read(client: redis.Redis, wait: float = 1.5) -> Mem:
    """A reading once the server's cron has had time to resize its tables."""
    time.sleep(wait)
    return Mem.read(client)


# -- the load -----------------------------------------------------------------------------


async def _calls(url: str, keys: list[str], calls: int, concurrency: int) -> Counter[str]:
    statuses: Counter[str] = Counter()
    body = orjson.dumps(
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
    )
    todo = iter(range(calls))
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            for n in todo:
                headers = {
                    "Authorization": f"Bearer {keys[n % len(keys)]}",
                    "Content-Type": "application/json",
                }
                try:
                    async with session.post(
                        url + "/v1/chat/completions", data=body, headers=headers
                    ) as resp:
                        await resp.read()
                        statuses[str(resp.status)] += 1
                except (TimeoutError, aiohttp.ClientError) as exc:
                    statuses[type(exc).__name__] += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return statuses


def _accounts(admin: Admin, count: int) -> list[str]:
    def one(_: int) -> str:
        account_id = admin.create_account()
        admin.topup(account_id, "1000.00")
        return account_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(count)))


def _keys(admin: Admin, account_ids: list[str]) -> list[str]:
    def one(account_id: str) -> str:
        admin.subscribe(account_id, MODEL)
        return admin.new_key(account_id)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, account_ids))


# -- one configuration ----------------------------------------------------------------------


def _warm_up(
    name: str, args: argparse.Namespace, admin: Admin, url: str, client: redis.Redis
) -> str:
    """Everything the measured phases do, once, before the baseline: the server allocates
    some memory on the first use of each command (its latency histogram, some 25-50 KB)
    and of each script (the script cache), and the gateway opens its connections; none of
    that is per account or per call. One account of its own, a top-up, a key, a few calls
    (their markers are subtracted from the counts), with history on until they are trimmed;
    then this script's own commands."""
    account_id = admin.create_account()
    admin.topup(account_id, "1000.00")
    admin.subscribe(account_id, MODEL)
    key = admin.new_key(account_id)
    statuses = asyncio.run(_calls(url, [key], args.concurrency * 4, args.concurrency))
    if set(statuses) != {"200"}:
        raise RuntimeError(f"warm-up calls failed: {dict(statuses)}")
    if name == "on":
        deadline = time.monotonic() + args.steady_timeout
        while _usage_entries(client, [account_id]) and time.monotonic() < deadline:
            time.sleep(0.25)
    _census(client)
    client.delete("gw:store-memory:nothing")
    client.ttl("gw:store-memory:nothing")
    client.zcard(ACCOUNTS)
    Mem.read(client)
    return account_id


def _history(name: str, args: argparse.Namespace) -> dict[str, Any]:
    if name == "off":
        return {"url": "off"}
    section: dict[str, Any] = {
        "url": "embedded",
        "keep_in_store": args.keep_in_store,
        "export_interval": args.export_interval,
    }
    if args.settled_ttl:
        section["settled_ttl"] = args.settled_ttl
    return section


def run_config(name: str, args: argparse.Namespace, tmp: Path) -> Result:
    result = Result(config=name, accounts=args.accounts, calls=args.calls)
    work = tmp / name
    work.mkdir()
    store = EmbeddedStore(work / "store", appendfsync="everysec")
    store.start()
    client = redis.Redis.from_url(store.url)
    mock: Proc | None = None
    gateway: Proc | None = None
    try:
        mock = start_mock(work)
        config = {
            "server": {"drain_timeout": "2s"},
            "store": {"url": store.url, "data_dir": str(work / "gateway")},
            "rate_limits": {"requests": "1000000/minute", "tokens": "1000000000/minute"},
            "models": [
                {
                    "name": MODEL,
                    "tokenizer": "o200k_base",
                    "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
                    "upstreams": [{"url": f"{mock.url}/v1", "model": "mock-model"}],
                }
            ],
            "history": _history(name, args),
        }
        gateway = start_gateway(
            work,
            config,
            env={"GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN},
            wait=False,
            args=("--log-level", "warning"),
        )
        try:
            wait_http(gateway.url + "/healthz", gateway.popen, timeout=90)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}\n--- gateway log ---\n{gateway.log()[-3000:]}") from None
        admin = Admin(gateway.url, token=ADMIN_TOKEN)
        _say(f"{name}: gateway up; warming up")
        warm_account = _warm_up(name, args, admin, gateway.url, client)
        result.mem["started"] = _quiet_read(client)
        result.markers["started"] = _scan_count(client, SETTLED_PATTERN)
        _say(f"{name}: creating {args.accounts} accounts")
        account_ids = _accounts(admin, args.accounts)
        result.mem["accounts"] = _quiet_read(client)
        keys = _keys(admin, account_ids)
        result.mem["keys"] = _quiet_read(client)
        assert client.zcard(ACCOUNTS) >= args.accounts

        _say(f"{name}: {args.calls} calls, {args.concurrency} at a time")
        started = time.monotonic()
        statuses = asyncio.run(_calls(gateway.url, keys, args.calls, args.concurrency))
        result.call_seconds = time.monotonic() - started
        result.statuses = dict(statuses)
        result.mem["after_calls"] = Mem.read(client)
        result.usage_entries["after_calls"] = _usage_entries(client, account_ids)
        result.markers["after_calls"] = _scan_count(client, SETTLED_PATTERN)
        _say(f"{name}: calls done in {result.call_seconds:.1f}s: {dict(statuses)}")

        # The steady state: every record where it stays.
        started = time.monotonic()
        deadline = started + args.steady_timeout
        want = 0 if name == "on" else statuses.get("200", 0)
        while time.monotonic() < deadline:
            entries = _usage_entries(client, account_ids)
            if (entries == 0) if name == "on" else (entries >= want):
                result.steady_reached = True
                break
            time.sleep(0.25)
        result.steady_seconds = time.monotonic() - started
        result.mem["steady"] = _quiet_read(client)
        result.usage_entries["steady"] = _usage_entries(client, account_ids)
        result.markers["steady"] = _scan_count(client, SETTLED_PATTERN)
        sample = next(iter(client.scan_iter(match=SETTLED_PATTERN, count=1000)), None)
        result.settled_ttl = int(client.ttl(sample)) if sample is not None else -2
        result.census = _census(client)
        _say(
            f"{name}: steady after {result.steady_seconds:.1f}s "
            f"(usage entries {result.usage_entries['steady']}, "
            f"markers {result.markers['steady']}, TTL {result.settled_ttl}s)"
        )

        # The markers gone, as their TTL will have them (sooner): deleted, but the warm-up's.
        _delete(client, SETTLED_PATTERN, spare=warm_account)
        result.mem["markers_gone"] = _quiet_read(client, 2.5)
        result.markers["markers_gone"] = _scan_count(client, SETTLED_PATTERN)
    finally:
        for proc in (gateway, mock):
            if proc is not None:
                proc.stop()
        client.close()
        store.stop()
    return result


# -- the report ---------------------------------------------------------------------------


def _per(delta: int, count: int) -> str:
    return f"{delta / count:,.0f}" if count else "-"


def report(results: list[Result]) -> None:
    print()
    print(
        "| config | B/account (account + top-up) | B/account (+ subscription, key) "
        "| B/call right after calls | B/call steady | markers left (share of keys) "
        "| markers' share of steady delta | B/marker | B/call once markers are gone |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        m = r.mem
        if "markers_gone" not in m:
            print(f"| {r.config} | not measured |")
            continue
        per_account = m["accounts"].used - m["started"].used
        with_keys = m["keys"].used - m["started"].used
        right_after = m["after_calls"].used - m["keys"].used
        steady = m["steady"].used - m["keys"].used
        gone = m["markers_gone"].used - m["keys"].used
        left = r.markers["steady"] - r.markers["started"]  # the warm-up's are not counted
        markers = r.markers["steady"] - r.markers["markers_gone"]
        marker_bytes = m["steady"].used - m["markers_gone"].used
        share = f"{marker_bytes / steady:.0%}" if steady > 0 else "-"
        key_share = f"{left / m['steady'].keys:.0%}" if m["steady"].keys else "-"
        print(
            f"| {r.config} | {_per(per_account, r.accounts)} | {_per(with_keys, r.accounts)} "
            f"| {_per(right_after, r.calls)} | {_per(steady, r.calls)} "
            f"| {left:,} ({key_share}) | {share} "
            f"| {_per(marker_bytes, markers)} | {_per(gone, r.calls)} |"
        )
    print(
        "\nB/account: used_memory after the accounts (then their subscriptions and keys) less"
        " the baseline, per account. B/call: used_memory less that after the keys, per call;"
        " steady: usage streams complete (off) or exported and trimmed to XLEN 0 (on)."
        " Markers' share: the drop when the markers are deleted (as their TTL's expiry"
        " will), over the steady delta; B/marker: that drop per marker, the keyspace hash"
        " tables' share included. Client buffers (mem_clients_normal) move by some 10-100 KB"
        " between readings; without them:"
    )
    for r in results:
        m = r.mem
        if "markers_gone" not in m:
            continue

        def net(point: str, m: dict[str, Mem] = m) -> int:
            return m[point].used - m[point].clients

        print(
            f"  {r.config}: B/account {_per(net('accounts') - net('started'), r.accounts)}"
            f" (+ subscription, key {_per(net('keys') - net('started'), r.accounts)});"
            f" B/call right after {_per(net('after_calls') - net('keys'), r.calls)},"
            f" steady {_per(net('steady') - net('keys'), r.calls)},"
            f" markers gone {_per(net('markers_gone') - net('keys'), r.calls)}"
        )
    print()
    for r in results:
        m = r.mem
        ok = sum(v for k, v in r.statuses.items() if k == "200")
        print(
            f"{r.config}: {r.calls:,} calls in {r.call_seconds:.1f}s "
            f"({ok / max(r.call_seconds, 1e-9):,.0f}/s), statuses {r.statuses}; "
            f"steady {'reached' if r.steady_reached else 'NOT reached'} "
            f"{r.steady_seconds:.1f}s after the calls; marker TTL {r.settled_ttl}s; "
            "markers then deleted"
        )
        print(
            "  used_memory / keyspace hash tables / client buffers / keys at: "
            + "; ".join(
                f"{point} {mem.used:,} / {mem.tables:,} / {mem.clients:,} / {mem.keys:,}"
                for point, mem in m.items()
            )
        )
        print(f"  usage stream entries: {r.usage_entries}; settled markers (SCAN): {r.markers}")
        print("  key census at the steady state (pattern: keys, sum of MEMORY USAGE):")
        for pattern, count, size in r.census[:12]:
            print(f"    {pattern}: {count:,} keys, {size:,} B ({size / max(count, 1):,.0f} B/key)")


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--accounts", type=int, default=100)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--configs", default="off,on", help="comma-separated: off, on")
    parser.add_argument("--keep-in-store", default="5s", help="history.keep_in_store (on)")
    parser.add_argument("--export-interval", default="100ms", help="history.export_interval")
    parser.add_argument(
        "--settled-ttl",
        default=None,
        help="set history.settled_ttl (on) to this duration; unset by default",
    )
    parser.add_argument("--steady-timeout", type=float, default=90.0)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    args = parser.parse_args()
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    if not set(configs) <= {"off", "on"}:
        parser.error("--configs takes off and/or on")
    if args.settled_ttl:
        parse_duration(args.settled_ttl)

    started = time.monotonic()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="store-memory-") as tmp:
        for name in configs:
            results.append(run_config(name, args, Path(tmp)))
    report(results)
    print(f"\nwhole run: {time.monotonic() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    failed = any(not r.steady_reached or set(r.statuses) != {"200"} for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
