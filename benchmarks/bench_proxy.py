"""What the gateway adds to a chat completion, what metering costs, and how it compares.

Why: the gateway sits inline on every model call, so its cost has to be a number, not a
guess. The only honest baseline is the same upstream hit directly, in the same run, on the
same machine, with the same client; the only honest comparison is other gateways measured
the same way. This script starts, as real processes, a native upstream (Debian's nginx
serving the project's mock answers from memory; the python mock when nginx cannot be had),
this project's gateway twice and, when `benchmarks/peers.py` can prepare them, LiteLLM's
proxy and Portkey's gateway. It pins the processes under test to CPU 0 and the upstream and
load generators to CPU 1, and measures side by side:

- direct: the upstream itself;
- proxy: this gateway with `billing.metering: false` (forward and relay, nothing counted);
- gateway: this gateway with metering on (key, prompt counting, hold, rate limits, settle);
- LiteLLM, Portkey: the peers, each with the one upstream URL it was given.

The proxy separates what the extra hop costs from what metering costs. Measured:

1. non-streamed latency at one request in flight (targets interleaved), 1, 10 and 100 KB
   prompts;
2. streamed time to first token and total time, and, against the python mock pacing its
   tokens 20 ms apart, the largest gap between consecutive chunks;
3. requests per second at N concurrent connections (wrk), non-streamed and streamed, with
   the CPU seconds and peak memory each target's process tree spends per 1,000 calls, and
   the metered gateway again with `server.workers: 2`;
4. the highest fixed request rate at which the added p99 stays under 10 ms without errors
   (an open-loop sweep).

One markdown table is printed, with the cost of metering (gateway vs proxy), the ratios to
the peers and the upstream's headroom under it, then the tokenizer throughput of
bench_tokenizer.py; `--json` keeps the raw numbers. benchmarks/README.md explains each row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import importlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from rig.client import (
    HOST,
    MAX_TOKENS,
    PROMPT_SIZES,
    Client,
    Exchange,
    SseClock,
    Target,
    bearer,
    problem,
    user_message,
)
from rig.nginx import PACKAGE as NGINX_PACKAGE
from rig.nginx import canned_answers, find_nginx, nginx_version, start_nginx
from rig.openloop import FixedRate, Step, Sweep, percentile, rates
from rig.procs import (
    CpuWatch,
    Proc,
    TreeMeter,
    TreeUsage,
    affinity,
    comm,
    cpu_ticks,
    descendants,
    free_port,
    http_call,
    pin_prefix,
    spawn,
    stop,
    tree,
    wait_healthy,
)

PACED_TOKEN_DELAY = 0.02
GATEWAY_CPU = 0
CLIENT_CPU = 1
PEER_START_TIMEOUT = 180.0  # LiteLLM imports for a long while before it answers
PHASE_TIMEOUT = 180.0  # a safety net: no phase of a full run comes near it
GIVE_UP = 3  # failed calls in a row after which a 1-in-flight phase stops calling a target
ACCOUNT = "bench"
ADMIN_TOKEN_ENV = "BENCH_ADMIN_TOKEN"  # noqa: S105 - the name of a variable, not a secret
MODELS = ("bench-model", "bench-model-paced")  # the gateways' models: plain and paced
UPSTREAM_MODEL = "mock-model"  # the model name every gateway and peer sends upstream
PEERS = ("litellm", "portkey", "rolter")
TARGETS = ("direct", "proxy", "gateway", *PEERS)  # the targets' labels, in the table's order
WORKERS = 2  # server.workers of the scaling row
WORKERS_LABEL = f"gateway-{WORKERS}w"
LABELS = {
    "direct": "direct",
    "proxy": "proxy (metering off)",
    "gateway": "gateway (metering on)",
    WORKERS_LABEL: f"gateway (metering on), {WORKERS} workers",
    "litellm": "LiteLLM proxy",
    "portkey": "Portkey gateway",
    "rolter": "rolter gateway",
}
CACHE = Path(__file__).with_name(".cache")  # where peers.py keeps what it installs
TOKENIZER_SECONDS = 0.3  # bench_tokenizer.py --seconds, run after the table


# -- plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How many requests and seconds each phase gets."""

    warmup: int  # requests per target before each 1-in-flight phase
    latency_requests: tuple[int, ...]  # non-streamed, per target, one per PROMPT_SIZES
    stream_requests: int  # streamed, per target
    paced_streams: int  # paced streams in flight per target
    paced_rounds: int  # paced streams per connection
    connections: int
    duration: float  # seconds per throughput row
    load_warmup: float  # seconds of discarded load before each throughput row
    sweep_seconds: float  # seconds per rate of the sweep (at least)
    sweep_samples: int  # calls per rate of the sweep (at least): p99 of a few is noise
    sweep_start: int = 50  # calls per second of the sweep's first step
    sweep_factor: float = 1.4  # each step's rate over the last one's
    sweep_top: int = 20000  # no step above this rate
    added_limit_ms: float = 10.0  # a step passes while the added p99 stays under this


def make_plan(args: argparse.Namespace) -> Plan:
    """The full plan (~10 min with peers), or the quick one (~4 min); options override."""
    if args.quick:
        plan = Plan(50, (500, 150, 60), 200, 4, 2, args.connections, 3.0, 1.0, 1.2, 100)
    else:
        plan = Plan(200, (2000, 500, 200), 1000, 4, 12, args.connections, 10.0, 2.0, 3.0, 300)
    if args.duration is not None:
        plan = Plan(**{**asdict(plan), "duration": args.duration})
    return plan


# -- 1-in-flight measurements ------------------------------------------------------------


@dataclass
class Samples:
    """Per-request timings of one target in one phase, in nanoseconds."""

    total: list[int] = field(default_factory=list)
    ttft: list[int] = field(default_factory=list)
    max_gap: list[int] = field(default_factory=list)
    gaps: list[int] = field(default_factory=list)  # every inter-token gap, pooled
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, result: Exchange) -> None:
        self.total.append(result.end_ns - result.start_ns)
        tokens = result.token_ns
        if tokens:
            self.ttft.append(tokens[0] - result.start_ns)
            gaps = [b - a for a, b in itertools.pairwise(tokens)]
            self.gaps.extend(gaps)
            self.max_gap.append(max(gaps, default=0))


async def probe(client: Client, payload: bytes, stream: bool, samples: Samples | None) -> bool:
    """One request; its timings and failures go to `samples` (None: warm-up, not counted).

    True when it succeeded.
    """
    clock = SseClock() if stream else None
    result = await client.exchange(payload, clock)
    errors = Counter(client.errors)
    client.errors.clear()
    why = None if result is None else problem(result, stream, check_tokens=stream)
    if why is not None:
        errors[why] += 1
    if samples is not None:
        samples.errors.update(errors)
        if result is not None and why is None:
            samples.add(result)
    return result is not None and why is None


async def interleaved(
    targets: Sequence[Target], stream: bool, warmup: int, count: int, prompt_bytes: int = 1024
) -> dict[str, Samples]:
    """`count` requests per target, one at a time, round-robin; who goes first rotates.

    A target that fails GIVE_UP calls in a row gets no more (a stuck peer would stall the
    phase for everyone); its row then shows the errors.
    """
    clients = [Client(t) for t in targets]
    payloads = [t.payload(stream, prompt_bytes) for t in targets]
    samples = {t.label: Samples() for t in targets}
    failed = [0] * len(targets)
    n = len(clients)
    try:
        for i in range(warmup + count):
            for k in ((i + j) % n for j in range(n)):
                if failed[k] >= GIVE_UP:
                    continue
                sink = samples[targets[k].label] if i >= warmup else None
                ok = await probe(clients[k], payloads[k], stream, sink)
                failed[k] = 0 if ok else failed[k] + 1
    finally:
        for client in clients:
            client.close()
    return samples


async def paced(targets: Sequence[Target], streams: int, rounds: int) -> dict[str, Samples]:
    """`streams` concurrent paced streams per target, `rounds` each (after one warm-up).

    Starts are staggered across one token interval: streams in lockstep would have their
    chunks arrive at the same instant and queue behind each other, which measures the burst,
    not the relay.
    """
    samples = {t.label: Samples() for t in targets}
    workers = [t for _ in range(streams) for t in targets]

    async def worker(target: Target, offset: float) -> None:
        client = Client(target)
        payload = target.payload(stream=True, paced=True)
        try:
            await asyncio.sleep(offset)
            await probe(client, payload, True, None)
            failed = 0
            for _ in range(rounds):
                ok = await probe(client, payload, True, samples[target.label])
                failed = 0 if ok else failed + 1
                if failed >= GIVE_UP:
                    break
        finally:
            client.close()

    async with asyncio.TaskGroup() as group:
        for k, target in enumerate(workers):
            group.create_task(worker(target, k * PACED_TOKEN_DELAY / len(workers)))
    return samples


async def first_contact(target: Target, paced: bool = False) -> tuple[list[str], str | None]:
    """One non-streamed and one streamed call (paced: one paced stream): (times, failure).

    These are the cold calls (lazy imports, tokenizer loads, first store scripts); their
    times are reported, never mixed into the measurements.
    """
    times: list[str] = []
    for stream in (True,) if paced else (False, True):
        client = Client(target)
        result = await client.exchange(target.payload(stream, paced=paced), SseClock())
        client.close()
        kind = "paced" if paced else "stream" if stream else "plain"
        if result is None:
            return times, f"{kind} call got no answer: {dict(client.errors)}"
        why = problem(result, stream, check_tokens=stream)
        if why is not None:
            preview = " ".join(result.preview.decode("utf-8", "replace").split())[:160]
            return times, f"{kind} call: {why}: {preview}"
        times.append(f"{target.label} {kind} {(result.end_ns - result.start_ns) / 1e6:.1f} ms")
    return times, None


# -- throughput ----------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One throughput row, with what the target's process tree used during it."""

    tool: str
    requests: int
    seconds: float
    errors: Counter[str]
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    latency_ns: list[int] = field(default_factory=list)  # every sample (asyncio only)
    usage: TreeUsage | None = None

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_1k(self) -> float | None:
        """CPU seconds of the target's process tree per 1,000 calls."""
        if self.usage is None or not self.requests:
            return None
        return self.usage.cpu_seconds / self.requests * 1000


async def python_load(target: Target, stream: bool, plan: Plan, seconds: float) -> LoadResult:
    """`plan.connections` keep-alive connections in closed loops for `seconds`."""
    payload = target.payload(stream)
    end = time.perf_counter_ns() + int(seconds * 1e9)
    result = LoadResult("asyncio", 0, seconds, Counter())

    async def worker() -> None:
        client = Client(target)
        try:
            while time.perf_counter_ns() < end:
                exchange = await client.exchange(payload)
                if exchange is None:
                    continue  # tallied in client.errors
                why = problem(exchange, stream, check_tokens=False)
                if why is not None:
                    result.errors[why] += 1
                elif exchange.end_ns < end:
                    result.requests += 1
                    result.latency_ns.append(exchange.end_ns - exchange.start_ns)
            result.errors.update(client.errors)
        finally:
            client.close()

    async with asyncio.TaskGroup() as group:
        for _ in range(plan.connections):
            group.create_task(worker())
    result.p50_ms = percentile(result.latency_ns, 50)
    result.p99_ms = percentile(result.latency_ns, 99)
    if not result.requests:
        result.errors["no call completed within the row"] += 1
    return result


WRK_SCRIPT = """\
local f = assert(io.open({body}, "rb"))
wrk.method = "POST"
wrk.path = {path}
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
{headers}

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_WRK %d %d %d %d %d %d %d %d %d\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def lua_string(text: str) -> str:
    """A double-quoted Lua string literal of printable ASCII `text`."""
    if not text.isascii() or not text.isprintable():
        raise ValueError(f"only printable ASCII is supported here: {text!r}")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def wrk_script(workdir: Path, target: Target, stream: bool) -> Path:
    """Write the request body and a Lua script that POSTs it; return the script's path."""
    name = f"{target.label}-{'stream' if stream else 'plain'}"
    body_path = workdir / f"{name}.json"
    body_path.write_bytes(target.body(stream))
    headers = "\n".join(
        f"wrk.headers[{lua_string(k)}] = {lua_string(v)}" for k, v in target.headers
    )
    script = workdir / f"{name}.lua"
    script.write_text(
        WRK_SCRIPT.format(
            body=lua_string(str(body_path)), path=lua_string(target.path), headers=headers
        )
    )
    return script


def run_wrk(
    script: Path, target: Target, connections: int, seconds: float, pin: list[str]
) -> LoadResult:
    """One wrk run (one thread, on the client CPU); parse the numbers its Lua `done` prints."""
    url = f"http://{HOST}:{target.port}{target.path}"
    duration = f"{max(1, round(seconds))}s"
    command = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{duration}", "--timeout", "10s"]
    command += ["-s", str(script), url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    match = re.search(r"^BENCH_WRK ((?:\d+ ?){9})$", done.stdout, re.MULTILINE)
    if done.returncode != 0 or match is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}{done.stderr}")
    n, us, connect, read, write, status, timeout, p50, p99 = map(int, match.group(1).split())
    kinds = {"connect": connect, "read": read, "write": write, "timeout": timeout}
    errors = Counter({k: v for k, v in kinds.items() if v})
    if status:
        errors["non-2xx"] = status
    if not n:  # wrk's percentiles of nothing are 0, which would read as instant answers
        errors["no call completed within the row"] = 1
        return LoadResult("wrk", 0, us / 1e6, errors)
    return LoadResult("wrk", n - status, us / 1e6, errors, p50 / 1000, p99 / 1000)


# -- processes -----------------------------------------------------------------------------


def gateway_cli(
    name: str, args: list[str], port: int, workdir: Path, pin: list[str], env: dict[str, str]
) -> Proc:
    """Start `python -m gateway ARGS` with its output in WORKDIR/NAME.log."""
    return spawn(name, [*pin, sys.executable, "-m", "gateway", *args], port, workdir, env)


def start_mock(name: str, workdir: Path, pin: list[str], *extra: str) -> Proc:
    port = free_port()
    args = ["mock-upstream", "--host", HOST, "--port", str(port)]
    args += ["--max-tokens", str(MAX_TOKENS), *extra]
    return gateway_cli(name, args, port, workdir, pin, {})


def gateway_config(
    port: int,
    data_dir: Path,
    upstreams: dict[str, str],
    metering: bool = True,
    workers: int = 1,
    appendfsync: str = "everysec",
) -> dict[str, Any]:
    """A gateway's config: one model per upstream base URL, an embedded store of its own.

    Rate limits are set far above any rate this machine reaches, so they are checked (their
    cost is part of the gateway's) but never refuse a call. The admin API's token is read from
    ADMIN_TOKEN_ENV; `provision_key` uses it to make the account and key the calls carry.
    `metering=False` adds `billing: {metering: false}` and changes nothing else: the proxy,
    which needs no key and neither counts, holds, limits nor settles.
    """
    models = [
        {
            "name": name,
            "tokenizer": "o200k_base",
            "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
            "upstreams": [{"url": url, "model": UPSTREAM_MODEL}],
        }
        for name, url in upstreams.items()
    ]
    server: dict[str, Any] = {"host": HOST, "port": port, "admin_token_env": ADMIN_TOKEN_ENV}
    if workers != 1:
        server["workers"] = workers
    config: dict[str, Any] = {
        "server": server,
        "store": {"url": "embedded", "data_dir": str(data_dir), "appendfsync": appendfsync},
        "rate_limits": {"requests": "1000000/minute", "tokens": "1000000000/minute"},
        "models": models,
    }
    if not metering:
        config["billing"] = {"metering": False}
    return config


def start_gateway(
    name: str,
    workdir: Path,
    pin: list[str],
    upstreams: dict[str, str],
    admin_token: str,
    metering: bool = True,
    workers: int = 1,
    appendfsync: str = "everysec",
) -> Proc:
    """`gateway serve` with WORKDIR/NAME.yaml, its store in WORKDIR/NAME-store."""
    port = free_port()
    path = workdir / f"{name}.yaml"
    store = workdir / f"{name}-store"
    config = gateway_config(port, store, upstreams, metering, workers, appendfsync)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {ADMIN_TOKEN_ENV: admin_token}
    return gateway_cli(name, ["serve", "--config", str(path)], port, workdir, pin, env)


def provision_key(port: int, admin_token: str) -> tuple[str, str]:
    """The API key the calls carry, and where it came from.

    BENCH_API_KEY, when set, is used as it is. Otherwise the gateway's admin API (SPEC
    section 6) makes an account, tops it up far beyond what a run spends, subscribes it to
    the benchmark's models and issues a key. A gateway without an admin API (404) gets the
    placeholder "bench".
    """
    given = os.environ.get("BENCH_API_KEY")
    if given:
        return given, "BENCH_API_KEY"
    auth = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    status, answer = http_call(port, "POST", "/admin/accounts", {"id": ACCOUNT}, auth)
    if status == 404:
        return "bench", 'placeholder "bench" (the gateway has no admin API)'
    steps: list[tuple[str, dict[str, str], dict[str, str]]] = [
        ("topups", {"amount": "1000000.00"}, {"Idempotency-Key": "bench-topup"}),
        *[("subscriptions", {"model": model}, {}) for model in MODELS],
        ("keys", {}, {}),
    ]
    for resource, body, extra in steps:
        if status not in (200, 201):
            raise RuntimeError(f"admin API refused the benchmark's setup: {status} {answer}")
        path = f"/admin/accounts/{ACCOUNT}/{resource}"
        status, answer = http_call(port, "POST", path, body, {**auth, **extra})
    if status != 201 or not isinstance(answer, dict) or "key" not in answer:
        raise RuntimeError(f"admin API issued no key: {status} {answer}")
    return str(answer["key"]), f"issued by the admin API to account '{ACCOUNT}'"


def settle(pid: int, timeout: float = 5.0) -> None:
    """Wait until a target's process tree is idle (a backlog left by a load, worked off).

    So the next row's target does not share CPU 0 with the last one's leftovers.
    """
    pids = tree(pid)
    deadline = time.monotonic() + timeout
    before = sum(cpu_ticks(p, reaped=False) for p in pids)
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = sum(cpu_ticks(p, reaped=False) for p in pids)
        if now - before <= 1:  # at most one tick (10 ms) in 200 ms: timers, not work
            return
        before = now


def one_line(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def load_peers() -> ModuleType | str:
    """benchmarks/peers.py, imported only now; or why it cannot be."""
    try:
        return importlib.import_module("peers")
    except ModuleNotFoundError as exc:
        if exc.name == "peers":
            return "benchmarks/peers.py not found"
        return one_line(f"peers.py failed to import: {exc}")
    except Exception as exc:
        return one_line(f"peers.py failed to import: {type(exc).__name__}: {exc}")


@dataclass
class Peer:
    """A peer to measure: its spec once prepared, its process once started."""

    label: str
    spec: Any = None  # a peers.PeerSpec
    proc: Proc | None = None


def prepare_peer(module: ModuleType, label: str, workdir: Path, upstream_url: str) -> Peer | str:
    """peers.prepare_<label>(...): the prepared peer, or a one-line reason it cannot run."""
    peer_dir = workdir / label
    peer_dir.mkdir(exist_ok=True)
    CACHE.mkdir(exist_ok=True)
    try:
        prepare = getattr(module, f"prepare_{label}")
        spec = prepare(CACHE, peer_dir, free_port(), upstream_url, UPSTREAM_MODEL)
    except Exception as exc:
        unavailable = getattr(module, "PeerUnavailable", ())
        if isinstance(exc, unavailable):
            return one_line(str(exc))
        return one_line(f"prepare_{label} failed: {type(exc).__name__}: {exc}")
    return Peer(label, spec)


def start_peer(peer: Peer, workdir: Path, pin: list[str]) -> Proc:
    """The peer's argv, pinned like the gateway, in its own process group (stopped whole).

    Loopback calls must not go through a proxy the environment may name.
    """
    spec = peer.spec
    env = {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **spec.env}
    return spawn(peer.label, [*pin, *spec.argv], spec.port, workdir, env, spec.cwd, group=True)


def peer_target(peer: Peer) -> Target:
    spec = peer.spec
    return Target(peer.label, spec.port, spec.model, tuple(spec.headers.items()), spec.path)


def install(packages: Sequence[str]) -> bool:
    """apt-get install PACKAGES; refresh the package lists once if the first try fails."""
    command = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}

    def run(argv: list[str]) -> bool:
        done = subprocess.run(argv, env=env, capture_output=True, check=False, timeout=600)
        return done.returncode == 0

    return run(command) or (run(["apt-get", "update"]) and run(command))


# -- the stack -----------------------------------------------------------------------------


@dataclass
class Stack:
    """The running processes and the targets they offer."""

    upstream: str  # how the direct target is served, for the report
    upstream_url: str  # the base URL the gateways and peers forward to
    procs: dict[str, Proc]  # by name: upstream (nginx or mock), mock-paced, gateways, peers
    key: str
    key_source: str
    admin_token: str
    requested: list[str]  # the peers asked for: they get rows, run or not
    skipped: dict[str, str]  # by label: why that target's (remaining) rows were not run
    roots: dict[str, int] = field(default_factory=dict)  # by label: root pid serving it
    targets: list[Target] = field(default_factory=list)  # in TARGETS order, those that run
    paced: dict[str, Target] = field(default_factory=dict)  # by label: paced streams' target
    names: dict[str, str] = field(default_factory=dict)  # by label: the name in the table
    paced_skipped: dict[str, str] = field(default_factory=dict)  # by label: why not paced
    peers: dict[str, Any] = field(default_factory=dict)  # by label: its PeerSpec
    appendfsync: str = "everysec"  # the gateways' embedded stores' fsync policy

    def drop(self, label: str, why: str) -> None:
        """Stop measuring a target: its remaining rows say `not run: why`."""
        self.targets = [t for t in self.targets if t.label != label]
        self.paced.pop(label, None)
        self.skipped.setdefault(label, why)

    def check_peers(self, phase: str) -> None:
        """Drop a peer whose process has exited, with the phase it was found before."""
        for label in PEERS:
            proc = self.procs.get(label)
            if proc is not None and label not in self.skipped and proc.popen.poll() is not None:
                self.drop(label, f"exited with {proc.popen.returncode} before {phase}")


def start_upstream(
    workdir: Path, pin: list[str], choice: str, may_install: bool, paced_port: int
) -> tuple[Proc, str, str]:
    """(the upstream process, what it is, its base URL): nginx if it can be had, else the mock.

    `choice` is `auto`, `nginx` or `mock`; with `auto`, a missing nginx is installed (when
    allowed) and, if it still cannot be had, the mock is used and the report says why.
    """
    why_not = ""
    binary = None
    if choice != "mock":
        binary = find_nginx()
        why_not = "nginx not found (installing is off)"
        if binary is None and may_install:
            progress(f"nginx not found: installing {NGINX_PACKAGE} with apt-get (as root)")
            installed = install([NGINX_PACKAGE])
            binary = find_nginx()
            why_not = f"nginx not found; apt-get install {NGINX_PACKAGE} " + (
                "succeeded but gave no nginx" if installed else "failed"
            )
    if binary is not None:
        plain, sse = canned_answers(paced_port)
        proc = start_nginx(binary, workdir, pin, paced_port, plain, sse)
        what = (
            f"{nginx_version(binary)} (native; canned answers of the mock in memory, one "
            "worker process, two hops: a body-sniffing proxy in front of the answers)"
        )
        return proc, what, f"http://{HOST}:{proc.port}/v1"
    if choice == "nginx":
        raise SystemExit(f"--upstream nginx: {why_not}")
    proc = start_mock("mock", workdir, pin)
    url = f"http://{HOST}:{proc.port}/v1"
    if choice == "mock":
        return proc, "python mock (--upstream mock)", url
    progress(f"{why_not}: falling back to the python mock as the upstream")
    return proc, f"python mock (fallback: {why_not})", url


def move_store(gateway: Proc, cpu: int) -> None:
    """Pin a gateway's embedded Valkey and its embedded PostgreSQL (the usage history; every
    thread and process of them) to `cpu`: in production the store and the history database
    are services of their own, so by default they run beside the upstream, not on the
    gateway's core. Their CPU still counts in the gateway's CPU column (they are in the
    process tree)."""
    for pid in descendants(gateway.popen.pid):
        if comm(pid).startswith(("valkey", "postgres")):
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(cpu), str(pid)],
                check=True,
                stdout=subprocess.DEVNULL,
            )


@contextlib.contextmanager
def running_stack(
    workdir: Path, pinned: bool, args: argparse.Namespace, may_install: bool
) -> Iterator[Stack]:
    """Start the upstreams, both gateways and the peers; always stop them on the way out."""
    procs: dict[str, Proc] = {}
    try:
        client_pin = pin_prefix(str(CLIENT_CPU), pinned)
        gateway_pin = pin_prefix(str(GATEWAY_CPU), pinned)
        paced_mock = start_mock(
            "mock-paced", workdir, client_pin, "--token-delay", str(PACED_TOKEN_DELAY)
        )
        procs["mock-paced"] = paced_mock
        wait_healthy(paced_mock)
        upstream, what, url = start_upstream(
            workdir, client_pin, args.upstream, may_install, paced_mock.port
        )
        procs[upstream.name] = upstream
        native = upstream.name == "nginx"
        paced_url = url if native else f"http://{HOST}:{paced_mock.port}/v1"
        upstreams = {MODELS[0]: url, MODELS[1]: paced_url}
        admin_token = secrets.token_urlsafe(24)
        for name, metering in (("gateway", True), ("proxy", False)):
            procs[name] = start_gateway(
                name, workdir, gateway_pin, upstreams, admin_token, metering, 1, args.appendfsync
            )
        skipped: dict[str, str] = {}
        peers = start_peers(args.peers, workdir, url, gateway_pin, procs, skipped)
        for name in ("mock-paced", upstream.name, "gateway", "proxy"):
            wait_healthy(procs[name])
        if pinned and args.store_cpu == "upstream":
            for name in ("gateway", "proxy"):
                move_store(procs[name], CLIENT_CPU)
        key, key_source = provision_key(procs["gateway"].port, admin_token)
        for peer in peers:
            wait_peer(peer, skipped)
        stack = Stack(what, url, procs, key, key_source, admin_token, args.peers, skipped)
        stack.appendfsync = args.appendfsync
        add_targets(stack, peers, native)
        yield stack
    except Exception:  # not on Ctrl-C or SIGTERM: then the logs are of no interest
        for proc in procs.values():
            print(f"--- {proc.name} log (tail) ---\n{proc.log_tail()}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs.values()):
            stop(proc)


def start_peers(
    wanted: Sequence[str],
    workdir: Path,
    url: str,
    pin: list[str],
    procs: dict[str, Proc],
    skipped: dict[str, str],
) -> list[Peer]:
    """Prepare and start each wanted peer; the reason of each that cannot go to `skipped`."""
    if not wanted:
        return []
    module = load_peers()
    if isinstance(module, str):
        skipped.update(dict.fromkeys(wanted, module))
        return []
    started = []
    for label in wanted:
        progress(f"preparing {LABELS[label]} (peers.py; may install into {CACHE} once)")
        peer = prepare_peer(module, label, workdir, url)
        if isinstance(peer, str):
            skipped[label] = peer
            progress(f"{LABELS[label]}: not run: {peer}")
            continue
        peer.proc = procs[label] = start_peer(peer, workdir, pin)
        started.append(peer)
    return started


def wait_peer(peer: Peer, skipped: dict[str, str]) -> None:
    """Wait for a peer's health path; on failure, stop it and record a one-line reason."""
    assert peer.proc is not None
    spec = peer.spec
    try:
        wait_healthy(peer.proc, spec.health_path, dict(spec.headers), PEER_START_TIMEOUT)
    except RuntimeError as exc:
        lines = [line for line in peer.proc.log_tail().splitlines() if line.strip()]
        last = f"; log: {lines[-1]}" if lines else ""
        skipped[peer.label] = one_line(f"did not start: {exc}{last}")
        progress(f"{LABELS[peer.label]}: {skipped[peer.label]}")
        print(f"--- {peer.label} log (tail) ---\n{peer.proc.log_tail()}", file=sys.stderr)
        stop(peer.proc)


def add_targets(stack: Stack, peers: Sequence[Peer], native: bool) -> None:
    """The targets of the running processes, in the table's order."""
    procs = stack.procs
    upstream = procs.get("nginx") or procs["mock"]
    auth = bearer(stack.key)
    stack.targets = [
        Target("direct", upstream.port, UPSTREAM_MODEL, auth),
        Target("proxy", procs["proxy"].port, MODELS[0], auth),
        Target("gateway", procs["gateway"].port, MODELS[0], auth),
    ]
    paced_port = upstream.port if native else procs["mock-paced"].port
    stack.paced = {
        "direct": Target("direct", paced_port, UPSTREAM_MODEL, auth),
        "proxy": Target("proxy", procs["proxy"].port, MODELS[1], auth),
        "gateway": Target("gateway", procs["gateway"].port, MODELS[1], auth),
    }
    stack.names = {label: LABELS[label] for label in TARGETS}
    stack.roots = {"direct": upstream.popen.pid}
    stack.roots |= {name: procs[name].popen.pid for name in ("proxy", "gateway")}
    for peer in peers:
        assert peer.proc is not None
        stack.names[peer.label] = f"{LABELS[peer.label]} {peer.spec.version}"
        stack.peers[peer.label] = peer.spec
        if peer.label in stack.skipped:
            continue
        target = peer_target(peer)
        stack.targets.append(target)
        stack.roots[peer.label] = peer.proc.popen.pid
        if native:
            stack.paced[peer.label] = target
        else:
            stack.paced_skipped[peer.label] = "needs the nginx upstream to reach the paced mock"


# -- the run -------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    """No collector pauses inside a timed phase (they would land on either target at random)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def latency_key(prompt_bytes: int) -> str:
    return f"plain-{prompt_bytes // 1024}k"


@dataclass
class Results:
    """Everything measured, keyed by phase and then by target label."""

    latency: dict[str, dict[str, Samples]] = field(default_factory=dict)  # plain-1k.., stream
    # (latency key, peer label): the direct calls interleaved with that peer's
    peer_direct: dict[tuple[str, str], Samples | None] = field(default_factory=dict)
    paced: dict[str, Samples] = field(default_factory=dict)
    load: dict[str, LoadResult] = field(default_factory=dict)  # "label/plain|stream"
    sweeps: dict[str, Sweep] = field(default_factory=dict)
    baseline: dict[int, Step] = field(default_factory=dict)  # the direct upstream, by rate
    cold: list[str] = field(default_factory=list)  # the first calls, described
    workers_note: str = ""  # how the WORKERS gateway ran, or why it did not


class Runner:
    """Runs the phases in order on one event loop; each async phase with the collector off."""

    def __init__(
        self,
        loop: asyncio.Runner,
        stack: Stack,
        plan: Plan,
        load_tool: str,
        workdir: Path,
        pinned: bool,
    ) -> None:
        self.loop = loop
        self.stack = stack
        self.plan = plan
        self.load_tool = load_tool
        self.workdir = workdir
        self.pinned = pinned
        self.results = Results()
        self.own_ticks = 0  # CPU ticks of processes started and stopped during the phases

    def timed(self, what: str, phase: Callable[[], Awaitable[Any]]) -> Any:
        progress(what)
        budget = PHASE_TIMEOUT + self.plan.load_warmup + self.plan.duration
        with quiet_gc():
            return self.loop.run(asyncio.wait_for(phase(), timeout=budget))

    def contact(self) -> None:
        """First calls to each target; a peer that fails them is dropped, others stop the run."""
        for target in list(self.stack.targets):
            for paced_call in (False, True):
                aim = self.stack.paced.get(target.label) if paced_call else target
                if aim is None:
                    continue
                what = f"first {'paced ' if paced_call else ''}contact: {target.label}"
                times, why = self.timed(what, partial(first_contact, aim, paced_call))
                self.results.cold += times
                if why is None:
                    continue
                if target.label not in PEERS:
                    raise RuntimeError(f"{target.label} {aim.model}: {why}")
                progress(f"{target.label}: not run: {why}")
                self.stack.drop(target.label, f"first call failed: {why}")
                break

    def latency(self) -> None:
        """This project's targets interleaved, then each peer interleaved with direct alone:
        a slow peer run between the gateway's calls on the same core would evict the
        gateway's caches and measure the peer's footprint, not the gateway (as in `paced`).
        A peer's `added` is against the direct calls of its own group."""
        plan, results = self.plan, self.results
        targets = self.stack.targets
        ours = [t for t in targets if t.label not in PEERS]
        direct = [t for t in targets if t.label == "direct"]
        groups = [ours] + [[*direct, t] for t in targets if t.label in PEERS]

        def run(key: str, what: str, phase: Callable[[list[Target]], Any]) -> None:
            merged: dict[str, Samples] = {}
            for group in groups:
                names = ", ".join(t.label for t in group)
                found = self.timed(f"{what} ({names})", partial(phase, group))
                if group is not ours:  # its peer's added figures use this group's direct
                    direct_here = found.pop("direct", None)
                    for label in found:
                        results.peer_direct[(key, label)] = direct_here
                merged |= {label: samples for label, samples in found.items()}
            results.latency[key] = merged

        for size, count in zip(PROMPT_SIZES, plan.latency_requests, strict=True):
            self.stack.check_peers(f"the {size // 1024} KB latency row")
            warmup = min(plan.warmup, max(10, count // 5))
            run(
                latency_key(size),
                f"non-streamed latency, {size // 1024} KB prompt: {count} per target, 1 in flight",
                partial(interleaved, stream=False, warmup=warmup, count=count, prompt_bytes=size),
            )
        self.stack.check_peers("the streamed latency rows")
        run(
            "stream",
            f"streamed latency: {plan.stream_requests} per target, 1 in flight",
            partial(interleaved, stream=True, warmup=plan.warmup, count=plan.stream_requests),
        )

    def paced(self) -> None:
        """This project's targets together (as before), then each peer alone on CPU 0."""
        plan = self.plan
        self.stack.check_peers("the paced rows")
        ours = [self.stack.paced[label] for label in ("direct", "proxy", "gateway")]
        groups = [ours] + [[t] for label, t in self.stack.paced.items() if label in PEERS]
        for group in groups:
            names = ", ".join(t.label for t in group)
            self.results.paced |= self.timed(
                f"paced streams ({names}): {plan.paced_streams} in flight per target, "
                f"{plan.paced_rounds} rounds",
                partial(paced, group, plan.paced_streams, plan.paced_rounds),
            )

    def load(self, target: Target, stream: bool, key: str | None = None) -> LoadResult:
        """One throughput row; the non-streamed ones also meter the target's process tree."""
        plan = self.plan
        key = key or f"{target.label}/{'stream' if stream else 'plain'}"
        what = f"throughput {key}: {plan.connections} connections, {plan.duration:g} s"
        root = self.stack.roots[target.label]
        if self.load_tool == "wrk":
            progress(what + " (wrk)")
            pin = pin_prefix(str(CLIENT_CPU), self.pinned)
            script = wrk_script(self.workdir, target, stream)
            run_wrk(script, target, plan.connections, plan.load_warmup, pin)
            settle(root)  # calls the warm-up left in flight must not load the timed run
            with TreeMeter(root) as meter:
                result = run_wrk(script, target, plan.connections, plan.duration, pin)
        else:
            self.timed(what + " (warm-up)", partial(python_load, target, stream, plan, 1.0))
            settle(root)
            with TreeMeter(root) as meter:
                result = self.timed(what, partial(python_load, target, stream, plan, plan.duration))
        if not stream:
            result.usage = meter.usage()
        settle(root)
        self.results.load[key] = result
        return result

    def throughput(self) -> None:
        for stream in (False, True):
            self.stack.check_peers(f"the {'streamed' if stream else 'non-streamed'} load rows")
            for target in self.stack.targets:  # one load at a time, never two
                try:
                    self.load(target, stream)
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    if target.label not in PEERS:
                        raise
                    self.stack.drop(target.label, one_line(f"load failed: {exc}"))
            if not stream:
                try:
                    self.workers_row()
                except (RuntimeError, subprocess.TimeoutExpired) as exc:
                    self.results.workers_note = one_line(f"not run: {exc}")
                    progress(f"{WORKERS} workers: {self.results.workers_note}")

    def workers_row(self) -> None:
        """The metered gateway with server.workers: WORKERS, on both CPUs, for one row."""
        stack = self.stack
        cpus = f"{GATEWAY_CPU},{CLIENT_CPU}"
        progress(f"starting the metered gateway with server.workers: {WORKERS}")
        upstreams = {MODELS[0]: stack.upstream_url, MODELS[1]: stack.upstream_url}
        pin = pin_prefix(cpus, self.pinned)
        proc = start_gateway(
            WORKERS_LABEL,
            self.workdir,
            pin,
            upstreams,
            stack.admin_token,
            workers=WORKERS,
            appendfsync=stack.appendfsync,
        )
        try:
            wait_healthy(proc)
            key, _ = provision_key(proc.port, stack.admin_token)
            target = Target(WORKERS_LABEL, proc.port, MODELS[0], bearer(key))
            stack.roots[WORKERS_LABEL] = proc.popen.pid
            _, why = self.timed("first contact: workers", partial(first_contact, target))
            if why is not None:
                raise RuntimeError(f"{WORKERS_LABEL}: {why}")
            self.load(target, False, f"{WORKERS_LABEL}/plain")
            where = f"taskset -c {cpus}" if self.pinned else "unpinned"
            self.results.workers_note = (
                f"supervisor + {WORKERS} workers + Valkey, {where}: the workers share both "
                "CPUs with the load generator and the upstream"
            )
        finally:
            # its CPU is the benchmark's, not interference: count it before it is gone
            self.own_ticks += sum(cpu_ticks(pid) for pid in tree(proc.popen.pid))
            stop(proc)

    def sweep(self) -> None:
        """The open-loop rate sweep of every target but direct (direct is the baseline)."""
        plan, stack, baseline = self.plan, self.stack, self.results.baseline
        steps = rates(plan.sweep_start, plan.sweep_factor, plan.sweep_top)
        direct = stack.targets[0]
        base = FixedRate(direct, direct.payload(False), False)
        self.timed("rate sweep: warming up", partial(base.step, plan.sweep_start, 0.5))
        stack.check_peers("the rate sweep")
        for target in stack.targets[1:]:
            pool = FixedRate(target, target.payload(False), False)
            self.timed(f"rate sweep {target.label}: warm-up", partial(pool.step, steps[0], 0.5))
            sweep = Sweep(target.label)
            for rate in steps:
                if rate not in baseline:
                    baseline[rate] = self.attempt(base, rate, None)[-1]
                if (why := baseline[rate].failure(None, plan.added_limit_ms)) is not None:
                    sweep.stop = f"generator limit: direct fails {rate}/s ({why})"
                    break
                tries = self.attempt(pool, rate, baseline[rate])
                sweep.steps += tries
                if (why := tries[-1].failure(baseline[rate], plan.added_limit_ms)) is not None:
                    sweep.stop = f"fails {rate}/s twice: {why}"
                    break
                sweep.passed = tries[-1]
            else:
                sweep.stop = f"passed every rate up to the top, {steps[-1]}/s"
            pool.close()
            settle(stack.roots[target.label])
            self.results.sweeps[target.label] = sweep
        base.close()
        self.results.sweeps["direct"] = direct_sweep(baseline, plan.added_limit_ms)

    def attempt(self, pool: FixedRate, rate: int, reference: Step | None) -> list[Step]:
        """One sweep step, repeated once if it fails: a lone stall (another process on the
        CPU, a collector pass) must not end a sweep; a real limit fails twice."""
        plan = self.plan
        seconds = max(plan.sweep_seconds, plan.sweep_samples / rate)
        tries: list[Step] = []
        for _ in range(2):
            tries.append(
                self.timed(
                    f"rate sweep {pool.target.label}: {rate}/s for {seconds:.1f} s",
                    partial(pool.step, rate, seconds),
                )
            )
            why = tries[-1].failure(reference, plan.added_limit_ms)
            if why is None:
                break
            progress(f"  {why}")
        return tries


def direct_sweep(baseline: dict[int, Step], limit_ms: float) -> Sweep:
    """The direct upstream's steps as a sweep: it passed every rate up to its `passed` one."""
    sweep = Sweep("direct")
    for rate in sorted(baseline):
        step = baseline[rate]  # the last try at that rate
        sweep.steps.append(step)
        if (why := step.failure(None, limit_ms)) is not None:
            sweep.stop = f"fails {rate}/s: {why}"
            break
        sweep.passed = step
    else:
        top = max(baseline, default=0)
        sweep.stop = f"passed every rate the targets needed (up to {top}/s)"
    return sweep


def run_phases(runner: Runner) -> Results:
    """Every measurement, in order."""
    runner.contact()
    runner.latency()
    runner.paced()
    runner.throughput()
    runner.sweep()
    return runner.results


# -- report --------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table: milliseconds, requests per second, CPU s, MiB, failed requests.

    `note` replaces the numbers when the target was not run (`not run: why`); `rate_text`
    replaces the req/s cell of a sweep row that did not end on a passing rate.
    """

    target: str
    mode: str
    p50_ms: float | None = None
    p99_ms: float | None = None
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    rps: float | None = None
    cpu_s_per_1k: float | None = None
    peak_mib: float | None = None
    errors: int = 0
    note: str | None = None
    rate_text: str | None = None


MODE_LATENCY = "non-stream {size} KB, 1 in flight"
MODE_TTFT = "stream TTFT, 1 in flight"
MODE_TOTAL = "stream total, 1 in flight"
MODE_PACED = "paced stream, max chunk gap"
MODE_SWEEP = "max rate, added p99 < {limit:g} ms"


def p50_p99(values: Sequence[int]) -> tuple[float, float]:
    return percentile(list(values), 50), percentile(list(values), 99)


def build_rows(results: Results, stack: Stack, plan: Plan) -> list[Row]:
    """Every row of the table, mode by mode, target by target (TARGETS order)."""
    labels = ["direct", "proxy", "gateway", *stack.requested]
    rows: list[Row] = []

    def group(mode: str, found: dict[str, Row], why_not: dict[str, str] | None = None) -> None:
        """Rows for `mode`: measured ones with added vs direct, `not run` for the rest."""
        direct = found.get("direct")
        for label in [*labels, *(k for k in found if k not in labels)]:
            row = found.get(label)
            if row is None:
                why = stack.skipped.get(label) or (why_not or {}).get(label, "not measured")
                rows.append(Row(stack.names.get(label, label), mode, note=f"not run: {why}"))
                continue
            if label != "direct" and direct is not None and row.added_p50_ms is None:
                if row.p50_ms is not None and direct.p50_ms is not None:
                    row.added_p50_ms = row.p50_ms - direct.p50_ms
                if row.p99_ms is not None and direct.p99_ms is not None:
                    row.added_p99_ms = row.p99_ms - direct.p99_ms
            rows.append(row)

    def sampled(
        mode: str, phase: dict[str, Samples], metric: str, key: str | None = None
    ) -> dict[str, Row]:
        """Rows of a phase; a peer measured beside its own direct calls (`key` given) gets
        its added figures from those."""
        found = {}
        for label, samples in phase.items():
            p50, p99 = p50_p99(getattr(samples, metric))
            errors = sum(samples.errors.values())
            row = found[label] = Row(stack.names[label], mode, p50, p99, errors=errors)
            own = results.peer_direct.get((key, label)) if key is not None else None
            if own is not None and getattr(own, metric):
                direct_p50, direct_p99 = p50_p99(getattr(own, metric))
                row.added_p50_ms = None if p50 is None else p50 - direct_p50
                row.added_p99_ms = None if p99 is None else p99 - direct_p99
        return found

    for size in PROMPT_SIZES:
        mode = MODE_LATENCY.format(size=size // 1024)
        key = latency_key(size)
        group(mode, sampled(mode, results.latency.get(key, {}), "total", key))
    stream = results.latency.get("stream", {})
    group(MODE_TTFT, sampled(MODE_TTFT, stream, "ttft", "stream"))
    group(MODE_TOTAL, sampled(MODE_TOTAL, stream, "total", "stream"))
    group(MODE_PACED, sampled(MODE_PACED, results.paced, "max_gap"), stack.paced_skipped)
    for kind in ("plain", "stream"):
        mode = f"{'non-stream' if kind == 'plain' else 'stream'}, {plan.connections} conns"
        found = {}
        for key, load in results.load.items():
            label, _, of = key.partition("/")
            if of != kind:
                continue
            name = LABELS[WORKERS_LABEL] if label == WORKERS_LABEL else stack.names[label]
            found[label] = Row(
                name, mode, load.p50_ms, load.p99_ms, rps=load.rps, errors=sum(load.errors.values())
            )
            if load.usage is not None:
                found[label].cpu_s_per_1k = load.cpu_per_1k
                found[label].peak_mib = load.usage.peak_rss_mib
        group(mode, found)
    group(MODE_SWEEP.format(limit=plan.added_limit_ms), sweep_rows(results, stack, plan))
    return rows


def sweep_rows(results: Results, stack: Stack, plan: Plan) -> dict[str, Row]:
    """Per target: the last passing rate, with its p50/p99 and added vs direct at that rate."""
    mode = MODE_SWEEP.format(limit=plan.added_limit_ms)
    found = {}
    for label, sweep in results.sweeps.items():
        row = Row(stack.names[label], mode, errors=sum(sum(s.errors.values()) for s in sweep.steps))
        step = sweep.passed
        if step is None:
            row.rate_text = f"< {plan.sweep_start}"
        else:
            row.p50_ms, row.p99_ms, row.rps = step.p50_ms, step.p99_ms, float(step.rate)
            base = results.baseline.get(step.rate)
            if label != "direct" and base is not None:
                row.added_p50_ms = step.p50_ms - base.p50_ms
                row.added_p99_ms = step.p99_ms - base.p99_ms
            if sweep.stop.startswith(("generator", "passed every")):
                row.rate_text = f">= {step.rate}"
        found[label] = row
    return found


def metering_costs(rows: Sequence[Row]) -> list[str]:
    """Per mode, the metered gateway minus the proxy: what metering itself costs.

    Like `added`, a difference of percentiles; throughput as the gateway's req/s relative to
    the proxy's (only for the rows that have one).
    """
    by_mode: dict[str, dict[str, Row]] = {}
    for row in rows:
        by_mode.setdefault(row.mode, {})[row.target] = row
    lines = []
    for mode, group in by_mode.items():
        proxy, gateway = group.get(LABELS["proxy"]), group.get(LABELS["gateway"])
        if proxy is None or gateway is None or proxy.p50_ms is None or gateway.p50_ms is None:
            continue
        assert proxy.p99_ms is not None
        assert gateway.p99_ms is not None
        parts = [
            f"{signed(gateway.p50_ms - proxy.p50_ms)} ms p50",
            f"{signed(gateway.p99_ms - proxy.p99_ms)} ms p99",
        ]
        if mode.startswith("max rate"):
            parts = []  # latencies at two different rates: not a cost
        if gateway.rps is not None and proxy.rps:
            parts.append(f"throughput {signed(100 * (gateway.rps / proxy.rps - 1), 1)}%")
        lines.append(f"- {mode}: metering cost: {', '.join(parts)} vs proxy")
    return lines


def comparisons(rows: Sequence[Row], stack: Stack, results: Results, plan: Plan) -> list[str]:
    """The lines that answer the comparisons: upstream headroom, peers, workers, generator."""
    by: dict[tuple[str, str], Row] = {(r.mode, r.target): r for r in rows}
    plain = f"non-stream, {plan.connections} conns"
    stream = f"stream, {plan.connections} conns"
    sweep = MODE_SWEEP.format(limit=plan.added_limit_ms)

    def rps(mode: str, label: str) -> float | None:
        row = by.get((mode, stack.names.get(label, LABELS.get(label, label))))
        return None if row is None else row.rps

    def ratio(a: float | None, b: float | None) -> str:
        return "n/a" if not a or not b else f"{a / b:.1f}x"

    lines = []
    direct, gateway = rps(plain, "direct"), rps(plain, "gateway")
    if direct and gateway:
        verdict = "ok" if direct >= 3 * gateway else "NOT MET: the upstream may be the limit"
        lines.append(
            f"- upstream headroom ({plain}): direct {direct:.0f} req/s = "
            f"{ratio(direct, gateway)} the gateway's {gateway:.0f} req/s (needs >= 3x: {verdict})"
        )
    for label in PEERS:
        if label not in stack.roots:
            continue
        parts = [
            f"{ratio(rps(mode, 'gateway'), rps(mode, label))} ({what})"
            for mode, what in ((plain, plain), (stream, stream), (sweep, "max rate"))
        ]
        lines.append(f"- gateway req/s / {stack.names[label]} req/s: " + "; ".join(parts))
    workers = rps(plain, WORKERS_LABEL)
    if results.workers_note.startswith("not run"):
        lines.append(f"- workers: {WORKERS} workers {results.workers_note}")
    elif workers and gateway:
        lines.append(
            f"- workers: {WORKERS} workers {workers:.0f} req/s vs 1 worker {gateway:.0f} "
            f"({ratio(workers, gateway)}; {results.workers_note})"
        )
    direct_sweep_row = results.sweeps.get("direct")
    if direct_sweep_row is not None:
        lines.append(f"- open-loop generator: direct {direct_sweep_row.stop}")
    for label, found in results.sweeps.items():
        if label != "direct":
            lines.append(f"- sweep {stack.names[label]}: {found.stop}")
    return lines


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| target | mode | p50 ms | p99 ms | added p50 | added p99 | req/s "
        "| CPU s/1k calls | peak MiB | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if r.note is not None:
            cells = [r.target, r.mode, r.note, *["-"] * 7]
        else:
            rate = r.rate_text or fmt(r.rps, 1)
            cells = [r.target, r.mode, fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.added_p50_ms)]
            cells += [fmt(r.added_p99_ms), rate, fmt(r.cpu_s_per_1k), fmt(r.peak_mib, 0)]
            cells += [str(r.errors)]
        lines.append("| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |")
    return "\n".join(lines)


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    words = (done.stdout + done.stderr).split()
    return " ".join(words[:2]) if words else "wrk"


def all_pids(stack: Stack) -> list[int]:
    """Every process of the benchmark's, with their children (Valkeys, peers' workers)."""
    return [pid for proc in stack.procs.values() for pid in tree(proc.popen.pid)]


def describe(plan: Plan, stack: Stack, pinning: str, load_tool: str) -> dict[str, str]:
    """The run's context, as label -> text."""

    def placed(proc: Proc) -> str:
        return ", ".join(f"{pid}:CPU{affinity(pid)}" for pid in tree(proc.popen.pid))

    loader = "built-in asyncio client, this process"
    if load_tool == "wrk":
        loader = f"{wrk_version()}, one thread, on CPU {CLIENT_CPU} when pinned"
    client_loop = "uvloop" if version("uvloop") != "not installed" else "asyncio"
    peers = [
        f"{stack.names[label]}: {shlex.join(spec.argv)}" for label, spec in stack.peers.items()
    ] + [f"{LABELS[label]}: not run: {why}" for label, why in stack.skipped.items()]
    sizes = ", ".join(f"{len(user_message(size).encode())}" for size in PROMPT_SIZES)
    counts = "/".join(str(n) for n in plan.latency_requests)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, Linux {platform.release()}",
        "software": (
            f"Python {platform.python_version()}, aiohttp {version('aiohttp')}, "
            f"uvloop {version('uvloop')}, inference-gateway {version('inference-gateway')}"
        ),
        "upstream": f"{stack.upstream} at {stack.upstream_url}",
        "store": (
            f"each gateway's embedded Valkey (a Unix socket), appendfsync {stack.appendfsync}"
        ),
        "peers": "; ".join(peers) or "none (--no-peers)",
        "pinning": (
            f"{pinning}; pid:CPU "
            + "; ".join(f"{name} {placed(proc)}" for name, proc in stack.procs.items())
            + f"; this process {os.getpid()}:CPU{affinity(0)}"
        ),
        "request": (
            f"POST /v1/chat/completions, user message of {sizes} bytes, max_tokens "
            f"{MAX_TOKENS}; the same body to every target but `model`; headers: "
            f"Authorization: Bearer <key {stack.key_source}> (only the metered gateway reads "
            "it), a peer's own headers for a peer"
        ),
        "1 in flight": (
            f"raw keep-alive HTTP/1.1 client on {client_loop}, one connection per target, "
            f"targets round-robin, who goes first rotating; {plan.warmup} warm-up (fewer for "
            f"the larger prompts) + {counts} non-streamed (1/10/100 KB) and "
            f"{plan.stream_requests} streamed requests per target"
        ),
        "paced stream": (
            f"python mock with --token-delay {PACED_TOKEN_DELAY}; largest gap between "
            f"consecutive token chunks of each stream; {plan.paced_streams} streams in flight "
            f"per target (starts staggered over one token interval), "
            f"{plan.paced_streams * plan.paced_rounds} streams per target; direct, proxy and "
            "gateway together, each peer alone"
        ),
        "throughput": (
            f"{plan.connections} connections, {plan.load_warmup:g} s warm-up + "
            f"{plan.duration:g} s per row, one target at a time; load generator: {loader}; "
            "latency is per full response; CPU s/1k calls and peak MiB: the target's process "
            "tree (utime+stime delta; largest RSS sum, sampled every 100 ms) during its "
            "non-streamed row"
        ),
        "rate sweep": (
            f"open loop from this process (CPU {CLIENT_CPU} when pinned): {plan.sweep_start}/s "
            f"x{plan.sweep_factor:g} per step, {plan.sweep_seconds:g} s and at least "
            f"{plan.sweep_samples} calls per step, latency from when each call was due; a step "
            f"passes with no error and an added p99 (vs direct at the same rate) under "
            f"{plan.added_limit_ms:g} ms; a failed step is repeated once"
        ),
    }


def error_notes(results: Results) -> list[str]:
    notes = []
    phases = {**results.latency, "paced": results.paced}
    for phase, by_target in phases.items():
        for label, samples in by_target.items():
            if samples.errors:
                notes.append(f"{phase} {label}: {dict(samples.errors)}")
    for key, load in results.load.items():
        if load.errors:
            notes.append(f"throughput {key}: {dict(load.errors)}")
    for label, sweep in results.sweeps.items():
        for step in sweep.steps:
            if step.errors:
                notes.append(f"sweep {label} {step.rate}/s: {dict(step.errors)}")
    return notes


def report(
    context: dict[str, str], rows: Sequence[Row], lines: Sequence[str], notes: Sequence[str]
) -> str:
    out = [f"## Gateway benchmark, {context['date']}", ""]
    out += [f"- {label}: {text}" for label, text in context.items() if label != "date"]
    out += ["", table(rows), ""]
    out += metering_costs(rows)
    out += lines
    out += [""]
    out += [f"- errors: {note}" for note in notes] or ["- errors: none"]
    return "\n".join(out)


def no_nan(value: Any) -> Any:
    """NaN (a percentile of no samples) as JSON null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def raw_json(
    context: dict[str, str], plan: Plan, rows: Sequence[Row], results: Results, lines: list[str]
) -> str:
    def samples(phase: dict[str, Samples]) -> dict[str, Any]:
        return {label: {**asdict(s), "errors": dict(s.errors)} for label, s in phase.items()}

    def step(s: Step) -> dict[str, Any]:
        summary = {"p50_ms": no_nan(s.p50_ms), "p99_ms": no_nan(s.p99_ms)}
        return {**asdict(s), "errors": dict(s.errors), **summary}

    doc = {
        "context": context,
        "plan": asdict(plan),
        "rows": [{k: no_nan(v) for k, v in asdict(r).items()} for r in rows],
        "metering_cost": [line.removeprefix("- ") for line in metering_costs(rows)],
        "comparisons": [line.removeprefix("- ") for line in lines],
        "units": "rows in ms, req/s, CPU seconds per 1,000 calls, MiB; samples in ns",
        "samples": {
            **{phase: samples(by) for phase, by in results.latency.items()},
            "paced": samples(results.paced),
            "load": {
                key: {
                    **{k: no_nan(v) for k, v in asdict(r).items()},
                    "rps": r.rps,
                    "cpu_s_per_1k": r.cpu_per_1k,
                }
                for key, r in results.load.items()
            },
            "sweeps": {
                label: {"stop": s.stop, "rate": s.rate, "steps": [step(x) for x in s.steps]}
                for label, s in results.sweeps.items()
            },
        },
    }
    return json.dumps(doc, indent=1, allow_nan=False, default=str)


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a ~4 min run with fewer requests")
    parser.add_argument(
        "--duration", type=float, help="seconds per throughput row (default 10; 3 with --quick)"
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk if on PATH (installed when missing and root), else the asyncio one",
    )
    parser.add_argument(
        "--upstream",
        choices=["auto", "nginx", "mock"],
        default="auto",
        help="auto: nginx (installed when missing and root), else the python mock",
    )
    install_group = parser.add_mutually_exclusive_group()
    install_group.add_argument(
        "--install",
        "--install-wrk",
        dest="install",
        action="store_true",
        default=None,
        help="apt-get install missing tools (nginx-light, wrk); the default when root",
    )
    install_group.add_argument(
        "--no-install", dest="install", action="store_false", help="never install anything"
    )
    peers = parser.add_mutually_exclusive_group()
    peers.add_argument(
        "--peers",
        default=",".join(PEERS),
        help=f"comma-separated peers to compare with (default {','.join(PEERS)})",
    )
    peers.add_argument("--no-peers", action="store_true", help="measure this project only")
    parser.add_argument(
        "--appendfsync",
        choices=("always", "everysec"),
        default="everysec",
        help="the gateways' embedded Valkey fsync policy (default: the gateway's own default, "
        "everysec, with settlements and top-ups confirmed on disk by WAITAOF; always: every "
        "write waits for the disk, admissions included)",
    )
    parser.add_argument(
        "--store-cpu",
        choices=("upstream", "gateway"),
        default="upstream",
        help="where the gateways' embedded Valkey runs when pinned: beside the upstream (as an "
        "external store would, the default) or on the gateway's CPU",
    )
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="skip the tokenizer throughput (bench_tokenizer.py) printed after the table",
    )
    args = parser.parse_args(argv)
    if args.connections < 1 or (args.duration is not None and args.duration < 1):
        parser.error("--connections and --duration must be at least 1")
    wanted = [] if args.no_peers else [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PEERS))
    if unknown:
        parser.error(f"unknown peers {unknown}; known: {', '.join(PEERS)}")
    args.peers = [p for p in PEERS if p in wanted]
    return args


def may_install(args: argparse.Namespace) -> bool:
    """Install missing tools: when asked, or by default when running as root (apt works)."""
    if args.install is not None:
        return bool(args.install)
    return os.geteuid() == 0 and shutil.which("apt-get") is not None


def choose_load_tool(args: argparse.Namespace, allowed: bool) -> str:
    if args.load_generator == "python":
        return "python"
    if shutil.which("wrk") is None and allowed:
        progress("wrk not found: installing it with apt-get (as root; --no-install prevents it)")
        install(["wrk"])
    if shutil.which("wrk") is not None:
        return "wrk"
    if args.load_generator == "wrk":
        raise SystemExit("wrk is not on PATH (try --install as root)")
    progress("wrk not available: the throughput rows use the built-in asyncio generator")
    return "python"


def choose_pinning(store_cpu: str) -> tuple[bool, str]:
    """Pin when taskset exists and both CPUs are ours; pin this process (the client) too."""
    cpus = os.sched_getaffinity(0)
    if shutil.which("taskset") is None:
        return False, "unpinned: taskset not found"
    if not {GATEWAY_CPU, CLIENT_CPU} <= cpus:
        return False, f"unpinned: CPUs {GATEWAY_CPU} and {CLIENT_CPU} are not both available"
    os.sched_setaffinity(0, {CLIENT_CPU})
    return True, (
        f"taskset: the gateways and peers under test (with their children) on CPU "
        f"{GATEWAY_CPU}; the upstreams, this process and wrk on CPU {CLIENT_CPU}; the "
        f"{WORKERS}-worker gateway on both; the 1-worker gateways' embedded Valkeys (and the "
        f"metered one's embedded PostgreSQL, the usage history) on CPU "
        + (
            f"{CLIENT_CPU} beside the upstream, as an external store (--store-cpu upstream)"
            if store_cpu == "upstream"
            else f"{GATEWAY_CPU} with their gateway (--store-cpu gateway)"
        )
    )


def tokenizer_report() -> tuple[bool, str]:
    """Run bench_tokenizer.py (after the gateways have stopped); (succeeded, its report).

    It inherits this process's affinity: CPU 1 when pinned.
    """
    script = Path(__file__).with_name("bench_tokenizer.py")
    command = [sys.executable, str(script), "--seconds", f"{TOKENIZER_SECONDS:g}"]
    progress(f"tokenizer throughput: {script.name} --seconds {TOKENIZER_SECONDS:g}")
    heading = f"## Tokenizer throughput (`{script.name} --seconds {TOKENIZER_SECONDS:g}`)\n\n"
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=PHASE_TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        return False, heading + f"- failed: no result within {PHASE_TIMEOUT:.0f}s"
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip()[-2000:]
        return False, heading + f"- failed with exit code {done.returncode}:\n\n{tail}"
    return True, heading + done.stdout.strip()


def _sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    began = time.monotonic()
    signal.signal(signal.SIGTERM, _sigterm)  # so `finally` stops the children
    allowed = may_install(args)
    load_tool = choose_load_tool(args, allowed)
    pinned, pinning = choose_pinning(args.store_cpu)
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    try:
        progress(f"starting the upstreams, gateways and peers in {workdir}")
        with (
            running_stack(workdir, pinned, args, allowed) as stack,
            asyncio.Runner(loop_factory=new_loop) as loop,
        ):
            context = describe(plan, stack, pinning, load_tool)
            load_before = os.getloadavg()[0]
            watch = CpuWatch([os.getpid(), *all_pids(stack)])
            runner = Runner(loop, stack, plan, load_tool, workdir, pinned)
            results = run_phases(runner)
            context["first calls (cold, not in the table)"] = "; ".join(results.cold)
            context["other processes' CPU during the run"] = watch.report(runner.own_ticks)
            context["load average"] = (
                f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after (1 min; the "
                "run itself adds up to 2; anything else on these CPUs shows in the numbers)"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = build_rows(results, stack, plan)
    lines = comparisons(rows, stack, results, plan)
    context["run time"] = f"{time.monotonic() - began:.0f} s before the tokenizer benchmark"
    print(report(context, rows, lines, error_notes(results)), flush=True)
    if args.json is not None:
        args.json.write_text(raw_json(context, plan, rows, results, lines))
        progress(f"raw numbers written to {args.json}")
    if args.no_tokenizer:
        return 0
    ok, text = tokenizer_report()
    print(f"\n{text}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
