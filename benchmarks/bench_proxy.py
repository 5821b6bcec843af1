"""What the gateway adds to a chat completion: latency at one request in flight, and throughput.

Why: the gateway sits inline on every model call, so its cost has to be a number, not a
guess. The only honest baseline is the same upstream hit directly, in the same run, on the
same machine, with the same client: this script starts the project's mock upstream and two
gateways as real processes (exactly as the CLI starts them), pins them to separate CPUs, and
measures three paths side by side:

- direct: the mock upstream itself;
- proxy: a gateway with `billing.metering: false` (forward and relay, nothing counted);
- gateway: a gateway with metering on (key, prompt counting, hold, rate limits, settle).

The proxy separates what the extra hop costs from what metering costs. Measured:

1. non-streamed latency at one request in flight (the three targets interleaved);
2. streamed time to first token and total time, and, against a second mock that paces its
   tokens, the largest gap between consecutive chunks;
3. requests per second at N concurrent connections, non-streamed and streamed.

The client is a minimal keep-alive HTTP/1.1 client on asyncio protocols (uvloop when
installed): it timestamps bytes as they arrive, with far less overhead than a full HTTP
client. Throughput uses `wrk` when it is on PATH, else the same client with N connections.
Calls carry `Authorization: Bearer $BENCH_API_KEY`, or, when that is unset, a key the script
has the metered gateway's admin API issue to a fresh, topped-up account, so every call through
it is fully metered; the same bytes go to the mock and the proxy, which need no key. Everything
binds to 127.0.0.1. One markdown table is printed, with the cost of metering (gateway vs proxy)
under it, then the tokenizer throughput of bench_tokenizer.py; `--json` keeps the raw numbers.
benchmarks/README.md explains each row.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import http.client
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
import socket
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
from typing import Any, cast

import yaml

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
MAX_TOKENS = 64
PACED_TOKEN_DELAY = 0.02
GATEWAY_CPU = 0
CLIENT_CPU = 1
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
PHASE_TIMEOUT = 180.0  # a safety net: no phase of a full run comes near it
DONE_EVENT = b"data: [DONE]\n\n"
TOKEN_EVENT = re.compile(rb'"content":"(?!")')
ACCOUNT = "bench"
ADMIN_TOKEN_ENV = "BENCH_ADMIN_TOKEN"  # noqa: S105 - the name of a variable, not a secret
MODELS = {"bench-model": "mock", "bench-model-paced": "mock-paced"}  # model -> its mock
TARGETS = ("direct", "proxy", "gateway")  # the targets' labels, in the table's order
LABELS = {
    "direct": "direct",
    "proxy": "proxy (metering off)",
    "gateway": "gateway (metering on)",
}
TOKENIZER_SECONDS = 0.3  # bench_tokenizer.py --seconds, run after the table


# -- plan --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """How many requests and seconds each phase gets."""

    warmup: int  # requests per target before each 1-in-flight phase
    latency_requests: int  # non-streamed, per target
    stream_requests: int  # streamed, per target
    paced_streams: int  # paced streams in flight per target
    paced_rounds: int  # paced streams per connection
    connections: int
    duration: float  # seconds per throughput row
    load_warmup: float  # seconds of discarded load before each throughput row


def make_plan(args: argparse.Namespace) -> Plan:
    """The full plan (~2 min), or the quick one (~1 min); --duration/--connections override."""
    if args.quick:
        plan = Plan(50, 500, 300, 4, 3, args.connections, 5.0, 1.0)
    else:
        plan = Plan(200, 2000, 2000, 4, 12, args.connections, 10.0, 2.0)
    if args.duration is not None:
        plan = Plan(**{**asdict(plan), "duration": args.duration})
    return plan


# -- requests ----------------------------------------------------------------------------


def user_message(min_bytes: int = 1024) -> str:
    """A deterministic prose message of at least `min_bytes` bytes."""
    sentence = (
        "The gateway forwards each call to the model server, counts the tokens of the "
        "prompt and of the answer, and writes the cost to the account of the caller. "
    )
    text = "Summarize these notes in one line. "
    while len(text.encode()) < min_bytes:
        text += sentence
    return text.strip()


def request_bytes(port: int, model: str, stream: bool, api_key: str) -> bytes:
    """A complete HTTP/1.1 POST of the benchmark's chat completion."""
    body = json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": user_message()},
            ],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        },
        separators=(",", ":"),
    ).encode()
    head = (
        f"POST {PATH} HTTP/1.1\r\n"
        f"Host: {HOST}:{port}\r\n"
        f"Authorization: Bearer {api_key}\r\n"
        "Content-Type: application/json\r\n"
        "Accept: */*\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


@dataclass(frozen=True)
class Target:
    """One way to reach a model: directly at a mock upstream, or through a gateway."""

    label: str  # one of TARGETS
    port: int
    model: str
    api_key: str  # sent to all: the mock and the proxy ignore it, the gateway requires it

    def payload(self, stream: bool) -> bytes:
        return request_bytes(self.port, self.model, stream, self.api_key)


# -- a minimal HTTP/1.1 client -------------------------------------------------------------


class ProtocolError(Exception):
    """The server sent something this client cannot frame."""


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _DONE = range(7)


class ResponseParser:
    """Incremental HTTP/1.1 response framing: Content-Length or chunked bodies."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._buf = bytearray()
        self._state = _HEAD
        self._remaining = 0
        self.status = 0
        self.keep_alive = True
        self.tail = b""  # the last bytes of the body, to check how a stream ended
        self.preview = b""  # the first bytes of the body, for error messages

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bytes:
        """Consume `data`; return the body bytes it completed (de-chunked)."""
        buf = self._buf
        buf += data
        out = bytearray()
        pos = 0
        while self._state != _DONE:
            step = self._step(buf, pos, out)
            if step < 0:
                break
            pos = step
        del buf[:pos]
        if self._state == _DONE and buf:
            raise ProtocolError("bytes after the end of the response")
        body = bytes(out)
        if body:
            self.tail = (self.tail + body)[-32:]
            if len(self.preview) < 512:
                self.preview += body[: 512 - len(self.preview)]
        return body

    def _step(self, buf: bytearray, pos: int, out: bytearray) -> int:
        """Advance one state from `pos`; the new position, or -1 when more bytes are needed."""
        state = self._state
        if state in (_LENGTH, _CHUNK_DATA):
            if pos == len(buf):
                return -1
            take = min(self._remaining, len(buf) - pos)
            out += buf[pos : pos + take]
            self._remaining -= take
            if not self._remaining:
                self._state = _DONE if state == _LENGTH else _CHUNK_END
            return pos + take
        if state == _CHUNK_END:
            if len(buf) - pos < 2:
                return -1
            if buf[pos : pos + 2] != b"\r\n":
                raise ProtocolError("chunk not followed by CRLF")
            self._state = _CHUNK_SIZE
            return pos + 2
        marker = b"\r\n\r\n" if state == _HEAD else b"\r\n"
        end = buf.find(marker, pos)
        if end < 0:
            return -1
        line = bytes(buf[pos:end])
        if state == _HEAD:
            self._head(line)
        elif state == _CHUNK_SIZE:
            self._chunk_size(line)
        elif not line:  # an empty line ends the trailer section
            self._state = _DONE
        return end + len(marker)

    def _head(self, head: bytes) -> None:
        status_line, *lines = head.decode("latin-1").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1."):
            raise ProtocolError(f"bad status line {status_line!r}")
        self.status = int(parts[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self.keep_alive = headers.get("connection") != "close"
        if "chunked" in headers.get("transfer-encoding", ""):
            self._state = _CHUNK_SIZE
        elif "content-length" in headers:
            self._remaining = int(headers["content-length"])
            self._state = _LENGTH if self._remaining else _DONE
        elif self.status in (204, 304):
            self._state = _DONE
        else:
            raise ProtocolError("response has neither Content-Length nor chunked framing")

    def _chunk_size(self, line: bytes) -> None:
        try:
            size = int(line.split(b";", 1)[0], 16)
        except ValueError:
            raise ProtocolError(f"bad chunk size {line!r}") from None
        self._remaining = size
        self._state = _CHUNK_DATA if size else _TRAILER


class SseClock:
    """Arrival times of the SSE events that carry a non-empty `content` (the tokens)."""

    def __init__(self) -> None:
        self._pending = bytearray()
        self.token_ns: list[int] = []

    def feed(self, body: bytes, now_ns: int) -> None:
        pending = self._pending
        pending += body
        while (end := pending.find(b"\n\n")) >= 0:
            event = bytes(pending[:end])
            del pending[: end + 2]
            if event.startswith(b"data: {") and TOKEN_EVENT.search(event):
                self.token_ns.append(now_ns)


@dataclass(slots=True)
class Exchange:
    """One request and its complete response."""

    status: int
    start_ns: int
    end_ns: int
    keep_alive: bool
    tail: bytes
    preview: bytes
    token_ns: list[int]


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request in flight at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = ResponseParser()
        self.waiter: asyncio.Future[Exchange] | None = None
        self.clock: SseClock | None = None
        self.start_ns = 0
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter_ns()
        waiter = self.waiter
        if waiter is None or waiter.done():
            self._abort()  # bytes nobody asked for
            return
        try:
            body = self.parser.feed(data)
        except (ProtocolError, ValueError) as exc:
            waiter.set_exception(ProtocolError(str(exc)))
            self._abort()
            return
        if self.clock is not None and body:
            self.clock.feed(body, now)
        if self.parser.done:
            p = self.parser
            tokens = self.clock.token_ns if self.clock is not None else []
            waiter.set_result(
                Exchange(p.status, self.start_ns, now, p.keep_alive, p.tail, p.preview, tokens)
            )

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionResetError("connection closed mid-response"))

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def send(self, payload: bytes, clock: SseClock | None) -> asyncio.Future[Exchange]:
        assert self.transport is not None
        self.parser.reset()
        self.clock = clock
        self.waiter = asyncio.get_running_loop().create_future()
        self.start_ns = time.perf_counter_ns()
        self.transport.write(payload)
        return self.waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class Client:
    """A reconnecting keep-alive client of one target; it tallies its failures."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.errors: Counter[str] = Counter()
        self._conn: _Connection | None = None

    async def _connection(self) -> _Connection:
        if self._conn is None or self._conn.lost:
            loop = asyncio.get_running_loop()
            _, self._conn = await loop.create_connection(_Connection, HOST, self.target.port)
        return self._conn

    async def exchange(self, payload: bytes, clock: SseClock | None = None) -> Exchange | None:
        """Send one request; None (and an error tallied) if no complete response came back."""
        try:
            conn = await self._connection()
            result = await conn.send(payload, clock)
        except (OSError, ProtocolError) as exc:
            self.errors[type(exc).__name__] += 1
            self.close()
            await asyncio.sleep(0.01)  # do not spin on a refused connection
            return None
        if not result.keep_alive:
            self.close()
        return result

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def problem(result: Exchange, stream: bool, check_tokens: bool) -> str | None:
    """Why a response does not count as a success, or None."""
    if result.status != 200:
        return f"HTTP {result.status}"
    if stream and not result.tail.endswith(DONE_EVENT):
        return "stream without [DONE]"
    if check_tokens and len(result.token_ns) != MAX_TOKENS:
        return f"{len(result.token_ns)} token events, not {MAX_TOKENS}"
    return None


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


async def probe(client: Client, payload: bytes, stream: bool, samples: Samples | None) -> None:
    """One request; its timings and failures go to `samples` (None: warm-up, not counted)."""
    clock = SseClock() if stream else None
    result = await client.exchange(payload, clock)
    if samples is None:
        client.errors.clear()
        return
    samples.errors.update(client.errors)
    client.errors.clear()
    if result is None:
        return
    why = problem(result, stream, check_tokens=stream)
    if why is not None:
        samples.errors[why] += 1
        return
    samples.add(result)


async def interleaved(
    targets: Sequence[Target], stream: bool, warmup: int, count: int
) -> dict[str, Samples]:
    """`count` requests per target, one at a time, round-robin; who goes first rotates."""
    clients = [Client(t) for t in targets]
    payloads = [t.payload(stream) for t in targets]
    samples = {t.label: Samples() for t in targets}
    n = len(clients)
    try:
        for i in range(warmup + count):
            for k in ((i + j) % n for j in range(n)):
                sink = samples[targets[k].label] if i >= warmup else None
                await probe(clients[k], payloads[k], stream, sink)
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
        payload = target.payload(stream=True)
        try:
            await asyncio.sleep(offset)
            await probe(client, payload, True, None)
            for _ in range(rounds):
                await probe(client, payload, True, samples[target.label])
        finally:
            client.close()

    async with asyncio.TaskGroup() as group:
        for k, target in enumerate(workers):
            group.create_task(worker(target, k * PACED_TOKEN_DELAY / len(workers)))
    return samples


async def first_contact(targets: Sequence[Target]) -> list[str]:
    """One non-streamed and one streamed call per target; fail loudly if any is refused.

    These are the cold calls (lazy imports, tokenizer loads, first store scripts); their
    times are reported, never mixed into the measurements.
    """
    times = []
    for target in targets:
        for stream in (False, True):
            client = Client(target)
            result = await client.exchange(target.payload(stream), SseClock())
            client.close()
            if result is None:
                raise RuntimeError(f"{target.label}:{target.port} did not answer: {client.errors}")
            why = problem(result, stream, check_tokens=stream)
            if why is not None:
                preview = result.preview.decode("utf-8", "replace")
                raise RuntimeError(
                    f"{target.label} {target.model} stream={stream}: {why} {preview}"
                )
            elapsed = (result.end_ns - result.start_ns) / 1e6
            times.append(f"{target.label} {'stream' if stream else 'plain'} {elapsed:.1f} ms")
    return times


# -- throughput ----------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One throughput row."""

    tool: str
    requests: int
    seconds: float
    errors: Counter[str]
    p50_ms: float = math.nan
    p99_ms: float = math.nan
    latency_ns: list[int] = field(default_factory=list)  # every sample (asyncio only)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


async def python_load(target: Target, stream: bool, plan: Plan) -> LoadResult:
    """`plan.connections` keep-alive connections in closed loops for warm-up + duration."""
    payload = target.payload(stream)
    begin = time.perf_counter_ns() + int(plan.load_warmup * 1e9)
    end = begin + int(plan.duration * 1e9)
    result = LoadResult("asyncio", 0, plan.duration, Counter())

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
                elif begin <= exchange.end_ns < end:
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
    return result


WRK_SCRIPT = """\
local f = assert(io.open({body}, "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = {auth}

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
    body = target.payload(stream).split(b"\r\n\r\n", 1)[1]
    name = f"{target.label}-{target.model}-{'stream' if stream else 'plain'}"
    body_path = workdir / f"{name}.json"
    body_path.write_bytes(body)
    script = workdir / f"{name}.lua"
    script.write_text(
        WRK_SCRIPT.format(
            body=lua_string(str(body_path)), auth=lua_string(f"Bearer {target.api_key}")
        )
    )
    return script


def run_wrk(
    script: Path, target: Target, connections: int, seconds: float, pin: list[str]
) -> LoadResult:
    """One wrk run (one thread, on the client CPU); parse the numbers its Lua `done` prints."""
    url = f"http://{HOST}:{target.port}{PATH}"
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
    return LoadResult("wrk", n - status, us / 1e6, errors, p50 / 1000, p99 / 1000)


def wrk_load(workdir: Path, target: Target, stream: bool, plan: Plan, pin: list[str]) -> LoadResult:
    script = wrk_script(workdir, target, stream)
    run_wrk(script, target, plan.connections, plan.load_warmup, pin)
    return run_wrk(script, target, plan.connections, plan.duration, pin)


# -- processes -----------------------------------------------------------------------------


@dataclass
class Proc:
    """A started child process and where its output goes."""

    name: str
    popen: subprocess.Popen[bytes]
    port: int
    log: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pin_prefix(cpu: int, pinned: bool) -> list[str]:
    return ["taskset", "-c", str(cpu)] if pinned else []


def spawn(
    name: str, args: list[str], port: int, workdir: Path, pin: list[str], env: dict[str, str]
) -> Proc:
    """Start `python -m gateway ARGS` with its output in WORKDIR/NAME.log."""
    log = workdir / f"{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [*pin, sys.executable, "-m", "gateway", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
        )
    return Proc(name, popen, port, log)


def http_call(
    port: int, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One JSON call with http.client (which ignores proxy settings): (status, decoded body)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        data = None if body is None else json.dumps(body)
        conn.request(method, path, body=data, headers=headers or {})
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        return response.status, json.loads(raw) if raw else None
    except ValueError:
        return response.status, raw.decode("utf-8", "replace")


def healthy(port: int) -> bool:
    try:
        return http_call(port, "GET", "/healthz")[0] == 200
    except OSError:
        return False


def wait_healthy(proc: Proc) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}")
        if healthy(proc.port):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} was not healthy within {START_TIMEOUT:.0f}s")


def stop(proc: Proc) -> None:
    """SIGTERM, then SIGKILL if it lingers."""
    if proc.popen.poll() is None:
        proc.popen.send_signal(signal.SIGTERM)
        try:
            proc.popen.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait(timeout=5)


def start_mock(name: str, workdir: Path, pin: list[str], *extra: str) -> Proc:
    port = free_port()
    args = ["mock-upstream", "--host", HOST, "--port", str(port)]
    args += ["--max-tokens", str(MAX_TOKENS), *extra]
    return spawn(name, args, port, workdir, pin, {})


def gateway_config(
    port: int, data_dir: Path, upstreams: dict[str, int], metering: bool = True
) -> dict[str, Any]:
    """A gateway's config: one model per mock upstream, an embedded store of its own.

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
            "upstreams": [{"url": f"http://{HOST}:{upstream}/v1", "model": "mock-model"}],
        }
        for name, upstream in upstreams.items()
    ]
    config: dict[str, Any] = {
        "server": {"host": HOST, "port": port, "admin_token_env": ADMIN_TOKEN_ENV},
        "store": {"url": "embedded", "data_dir": str(data_dir)},
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
    upstreams: dict[str, int],
    admin_token: str,
    metering: bool,
) -> Proc:
    """`gateway serve` with WORKDIR/NAME.yaml, its store in WORKDIR/NAME-store."""
    port = free_port()
    path = workdir / f"{name}.yaml"
    config = gateway_config(port, workdir / f"{name}-store", upstreams, metering)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    env = {ADMIN_TOKEN_ENV: admin_token}
    return spawn(name, ["serve", "--config", str(path)], port, workdir, pin, env)


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


def children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (a gateway's Valkey)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(_stat_fields(str(stat))[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def _stat_fields(path: str) -> list[str]:
    """The fields of a /proc/PID/stat line after the command name (which may hold spaces)."""
    return Path(path).read_text().rsplit(")", 1)[1].split()


def _cpu_ticks(pid: int) -> int:
    """CPU ticks used by `pid` and its reaped children (utime+stime+cutime+cstime)."""
    try:
        fields = _stat_fields(f"/proc/{pid}/stat")
    except OSError:
        return 0
    return sum(int(v) for v in fields[11:15])


def _busy_ticks() -> int:
    """CPU ticks the whole machine spent in processes (user, nice, system; not irq time)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    return int(fields[0]) + int(fields[1]) + int(fields[2])


class CpuWatch:
    """CPU time that processes other than the benchmark's used while it measured.

    The benchmark's own processes (this one with its reaped `wrk` children, the mocks, the
    two gateways and their Valkeys) are subtracted from the machine's busy time; what remains is
    interference, such as a test suite started on the same CPUs.
    """

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)
        self._start = self._sample()
        self._began = time.monotonic()

    def _sample(self) -> tuple[int, int]:
        return _busy_ticks(), sum(_cpu_ticks(pid) for pid in self.pids)

    def report(self) -> str:
        busy, ours = self._sample()
        hz = os.sysconf("SC_CLK_TCK")
        other = max(0, (busy - self._start[0]) - (ours - self._start[1])) / hz
        wall = time.monotonic() - self._began
        return f"{other:.1f} CPU-s in {wall:.0f} s ({100 * other / wall:.0f}% of one CPU)"


def affinity(pid: int) -> str:
    try:
        return ",".join(str(c) for c in sorted(os.sched_getaffinity(pid)))
    except OSError:
        return "?"


# -- the run -------------------------------------------------------------------------------


@dataclass
class Stack:
    """The running processes and the targets they offer."""

    mock: Proc
    paced_mock: Proc
    gateway: Proc  # metering on
    proxy: Proc  # the same gateway with metering off
    key_source: str
    targets: list[Target]  # direct, proxy, gateway (the order of TARGETS), plain mock
    paced_targets: list[Target]  # the same three, paced mock


@contextlib.contextmanager
def running_stack(workdir: Path, pinned: bool) -> Iterator[Stack]:
    """Start the mocks and both gateways; always stop them (SIGTERM) on the way out."""
    procs: list[Proc] = []
    try:
        client_pin = pin_prefix(CLIENT_CPU, pinned)
        mock = start_mock("mock", workdir, client_pin)
        procs.append(mock)
        paced_mock = start_mock(
            "mock-paced", workdir, client_pin, "--token-delay", str(PACED_TOKEN_DELAY)
        )
        procs.append(paced_mock)
        ports = {"mock": mock.port, "mock-paced": paced_mock.port}
        upstreams = {model: ports[mock_name] for model, mock_name in MODELS.items()}
        admin_token = secrets.token_urlsafe(24)
        gateway_pin = pin_prefix(GATEWAY_CPU, pinned)
        gateway = start_gateway("gateway", workdir, gateway_pin, upstreams, admin_token, True)
        procs.append(gateway)
        proxy = start_gateway("proxy", workdir, gateway_pin, upstreams, admin_token, False)
        procs.append(proxy)
        for proc in procs:
            wait_healthy(proc)
        key, key_source = provision_key(gateway.port, admin_token)

        def trio(model_suffix: str, direct_port: int) -> list[Target]:
            return [
                Target("direct", direct_port, "mock-model", key),
                Target("proxy", proxy.port, f"bench-model{model_suffix}", key),
                Target("gateway", gateway.port, f"bench-model{model_suffix}", key),
            ]

        yield Stack(
            mock,
            paced_mock,
            gateway,
            proxy,
            key_source,
            trio("", mock.port),
            trio("-paced", paced_mock.port),
        )
    except Exception:  # not on Ctrl-C or SIGTERM: then the logs are of no interest
        for proc in procs:
            tail = proc.log.read_text(errors="replace")[-2000:] if proc.log.exists() else ""
            print(f"--- {proc.name} log (tail) ---\n{tail}", file=sys.stderr)
        raise
    finally:
        for proc in reversed(procs):
            stop(proc)


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


@dataclass
class Results:
    """Everything measured, keyed by phase and then by target label."""

    nonstream: dict[str, Samples] = field(default_factory=dict)
    stream: dict[str, Samples] = field(default_factory=dict)
    paced: dict[str, Samples] = field(default_factory=dict)
    load: dict[str, LoadResult] = field(default_factory=dict)  # "label/plain|stream"
    cold: list[str] = field(default_factory=list)  # the first calls, described


def run_phases(
    runner: asyncio.Runner, stack: Stack, plan: Plan, load_tool: str, workdir: Path, pinned: bool
) -> Results:
    """Every measurement, in order; each async phase runs with the collector paused."""
    results = Results()
    trio, paced_trio = stack.targets, stack.paced_targets
    budget = PHASE_TIMEOUT + plan.load_warmup + plan.duration

    def timed(what: str, phase: Callable[[], Awaitable[Any]]) -> Any:
        progress(what)
        with quiet_gc():
            return runner.run(asyncio.wait_for(phase(), timeout=budget))

    results.cold = timed("first contact", lambda: first_contact(trio))
    timed("first paced contact", lambda: first_contact(paced_trio))
    results.nonstream = timed(
        f"non-streamed latency: {plan.latency_requests} per target, 1 in flight",
        lambda: interleaved(trio, False, plan.warmup, plan.latency_requests),
    )
    results.stream = timed(
        f"streamed latency: {plan.stream_requests} per target, 1 in flight",
        lambda: interleaved(trio, True, plan.warmup, plan.stream_requests),
    )
    results.paced = timed(
        f"paced streams: {plan.paced_streams} in flight per target, {plan.paced_rounds} rounds",
        lambda: paced(paced_trio, plan.paced_streams, plan.paced_rounds),
    )
    for stream in (False, True):
        for target in trio:  # one load at a time, never two
            key = f"{target.label}/{'stream' if stream else 'plain'}"
            what = f"throughput {key}: {plan.connections} connections, {plan.duration:g} s"
            if load_tool == "wrk":
                progress(what + " (wrk)")
                pin = pin_prefix(CLIENT_CPU, pinned)
                results.load[key] = wrk_load(workdir, target, stream, plan, pin)
            else:
                results.load[key] = timed(what, partial(python_load, target, stream, plan))
    return results


# -- report --------------------------------------------------------------------------------


def percentile(values: Sequence[int], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of nanosecond values, in ms."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    value = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
    return value / 1e6


@dataclass
class Row:
    """One line of the table: milliseconds, requests per second, failed requests."""

    target: str
    mode: str
    p50_ms: float
    p99_ms: float
    added_p50_ms: float | None
    added_p99_ms: float | None
    rps: float | None
    errors: int


def row_group(
    mode: str,
    pct: dict[str, tuple[float, float]],
    errors: dict[str, int],
    rps: dict[str, float] | None = None,
) -> list[Row]:
    """One row per target (in the order of TARGETS), from (p50, p99) of each; added vs direct."""
    d50, d99 = pct["direct"]
    rows = []
    for label in TARGETS:
        p50, p99 = pct[label]
        base = label == "direct"
        added50, added99 = (None, None) if base else (p50 - d50, p99 - d99)
        rate = None if rps is None else rps[label]
        rows.append(Row(LABELS[label], mode, p50, p99, added50, added99, rate, errors[label]))
    return rows


def p50_p99(values: Sequence[int]) -> tuple[float, float]:
    return percentile(values, 50), percentile(values, 99)


def build_rows(results: Results, plan: Plan) -> list[Row]:
    ns, st, pc = results.nonstream, results.stream, results.paced

    def latency(mode: str, phase: dict[str, Samples], metric: str) -> list[Row]:
        pct = {label: p50_p99(getattr(phase[label], metric)) for label in TARGETS}
        errors = {label: sum(phase[label].errors.values()) for label in TARGETS}
        return row_group(mode, pct, errors)

    def load(mode: str, kind: str) -> list[Row]:
        runs = {label: results.load[f"{label}/{kind}"] for label in TARGETS}
        pct = {label: (r.p50_ms, r.p99_ms) for label, r in runs.items()}
        errors = {label: sum(r.errors.values()) for label, r in runs.items()}
        return row_group(mode, pct, errors, {label: r.rps for label, r in runs.items()})

    conns = f"{plan.connections} conns"
    return [
        *latency("non-stream, 1 in flight", ns, "total"),
        *latency("stream TTFT, 1 in flight", st, "ttft"),
        *latency("stream total, 1 in flight", st, "total"),
        *latency("paced stream, max chunk gap", pc, "max_gap"),
        *load(f"non-stream, {conns}", "plain"),
        *load(f"stream, {conns}", "stream"),
    ]


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
        proxy, gateway = group[LABELS["proxy"]], group[LABELS["gateway"]]
        text = (
            f"metering cost: {signed(gateway.p50_ms - proxy.p50_ms)} ms p50, "
            f"{signed(gateway.p99_ms - proxy.p99_ms)} ms p99"
        )
        if gateway.rps is not None and proxy.rps:
            text += f", throughput {signed(100 * (gateway.rps / proxy.rps - 1), 1)}%"
        lines.append(f"- {mode}: {text} vs proxy")
    return lines


def fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


def signed(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:+.{digits}f}"


def table(rows: Sequence[Row]) -> str:
    lines = [
        "| target | mode | p50 ms | p99 ms | added p50 | added p99 | req/s | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [r.target, r.mode, fmt(r.p50_ms), fmt(r.p99_ms), fmt(r.added_p50_ms)]
        cells += [fmt(r.added_p99_ms), fmt(r.rps, 1), str(r.errors)]
        lines.append("| " + " | ".join(cells) + " |")
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


def gateway_pids(proc: Proc) -> list[int]:
    """A gateway and its children (its Valkey)."""
    return [proc.popen.pid, *children(proc.popen.pid)]


def stack_pids(stack: Stack) -> list[int]:
    """The mocks, both gateways and their children (their Valkeys)."""
    mocks = [p.popen.pid for p in (stack.mock, stack.paced_mock)]
    return [*mocks, *gateway_pids(stack.gateway), *gateway_pids(stack.proxy)]


def describe(plan: Plan, stack: Stack, pinning: str, load_tool: str) -> dict[str, str]:
    """The run's context, as label -> text."""

    def placed(proc: Proc) -> str:
        return ", ".join(f"{pid}:CPU{affinity(pid)}" for pid in gateway_pids(proc))

    mocks = ", ".join(
        f"{p.popen.pid}:CPU{affinity(p.popen.pid)}" for p in (stack.mock, stack.paced_mock)
    )
    loader = "built-in asyncio client, this process"
    if load_tool == "wrk":
        loader = f"{wrk_version()}, one thread, on CPU {CLIENT_CPU} when pinned"
    client_loop = "uvloop" if version("uvloop") != "not installed" else "asyncio"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": f"{os.cpu_count()} CPUs (nproc), {cpu_model()}, Linux {platform.release()}",
        "software": (
            f"Python {platform.python_version()}, aiohttp {version('aiohttp')}, "
            f"uvloop {version('uvloop')}, inference-gateway {version('inference-gateway')}"
        ),
        "pinning": (
            f"{pinning}; pid:CPU gateway+Valkey {placed(stack.gateway)}, "
            f"proxy+Valkey {placed(stack.proxy)}, mocks {mocks}, "
            f"this process {os.getpid()}:CPU{affinity(0)}"
        ),
        "request": (
            f"POST {PATH}, {len(user_message().encode())}-byte user message, "
            f"max_tokens {MAX_TOKENS}; Authorization: Bearer <key {stack.key_source}> "
            "(the same bytes to every target; only the metered gateway reads the key)"
        ),
        "targets": (
            "direct = the mock; proxy = `gateway serve` with billing.metering false (forward "
            "and relay only); gateway = `gateway serve` with metering on (key, prompt "
            "counting, hold, rate limits, settle); each gateway with its own embedded store"
        ),
        "1 in flight": (
            f"raw keep-alive HTTP/1.1 client on {client_loop}, one connection per target, "
            f"targets round-robin, who goes first rotating; {plan.warmup} warm-up + "
            f"{plan.latency_requests} non-streamed and {plan.stream_requests} streamed "
            "requests per target"
        ),
        "paced stream": (
            f"second mock with --token-delay {PACED_TOKEN_DELAY}; largest gap between "
            f"consecutive token chunks of each stream; {plan.paced_streams} streams in flight "
            f"per target (starts staggered over one token interval), "
            f"{plan.paced_streams * plan.paced_rounds} streams per target"
        ),
        "throughput": (
            f"{plan.connections} connections, {plan.load_warmup:g} s warm-up + "
            f"{plan.duration:g} s per row, one target at a time; load generator: {loader}; "
            "latency is per full response"
        ),
    }


def error_notes(results: Results) -> list[str]:
    notes = []
    phases: dict[str, dict[str, Samples]] = {
        "non-stream": results.nonstream,
        "stream": results.stream,
        "paced": results.paced,
    }
    for phase, by_target in phases.items():
        for label, samples in by_target.items():
            if samples.errors:
                notes.append(f"{phase} {label}: {dict(samples.errors)}")
    for key, load in results.load.items():
        if load.errors:
            notes.append(f"throughput {key}: {dict(load.errors)}")
    return notes


def report(context: dict[str, str], rows: Sequence[Row], notes: Sequence[str]) -> str:
    lines = [f"## Gateway benchmark, {context['date']}", ""]
    lines += [f"- {label}: {text}" for label, text in context.items() if label != "date"]
    lines += ["", table(rows), ""]
    lines += metering_costs(rows)
    lines += [""]
    lines += [f"- errors: {note}" for note in notes] or ["- errors: none"]
    return "\n".join(lines)


def no_nan(value: Any) -> Any:
    """NaN (a percentile of no samples) as JSON null."""
    return None if isinstance(value, float) and math.isnan(value) else value


def raw_json(context: dict[str, str], plan: Plan, rows: Sequence[Row], results: Results) -> str:
    def samples(phase: dict[str, Samples]) -> dict[str, Any]:
        return {label: {**asdict(s), "errors": dict(s.errors)} for label, s in phase.items()}

    doc = {
        "context": context,
        "plan": asdict(plan),
        "rows": [{k: no_nan(v) for k, v in asdict(r).items()} for r in rows],
        "metering_cost": [line.removeprefix("- ") for line in metering_costs(rows)],
        "units": "rows in ms and req/s; samples in ns",
        "samples": {
            "nonstream": samples(results.nonstream),
            "stream": samples(results.stream),
            "paced": samples(results.paced),
            "load": {
                key: {**{k: no_nan(v) for k, v in asdict(r).items()}, "rps": r.rps}
                for key, r in results.load.items()
            },
        },
    }
    return json.dumps(doc, indent=1, allow_nan=False, default=str)


# -- entry point ---------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a ~1 min run with fewer requests")
    parser.add_argument(
        "--duration", type=float, help="seconds per throughput row (default 10; 5 with --quick)"
    )
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--json", type=Path, help="also write the raw numbers to this file")
    parser.add_argument(
        "--load-generator",
        choices=["auto", "wrk", "python"],
        default="auto",
        help="auto: wrk if on PATH, else the built-in asyncio generator",
    )
    parser.add_argument(
        "--install-wrk", action="store_true", help="apt-get install -y wrk when it is missing"
    )
    parser.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="skip the tokenizer throughput (bench_tokenizer.py) printed after the table",
    )
    args = parser.parse_args(argv)
    if args.connections < 1 or (args.duration is not None and args.duration < 1):
        parser.error("--connections and --duration must be at least 1")
    return args


def install_wrk() -> None:
    """apt-get install wrk; refresh the package lists once if the first try fails."""
    progress("installing wrk with apt-get")
    install = ["apt-get", "install", "-y", "wrk"]
    if subprocess.run(install, check=False, timeout=PHASE_TIMEOUT).returncode != 0:
        subprocess.run(["apt-get", "update"], check=False, timeout=PHASE_TIMEOUT)
        subprocess.run(install, check=False, timeout=PHASE_TIMEOUT)


def choose_load_tool(args: argparse.Namespace) -> str:
    if args.load_generator == "python":
        return "python"
    if shutil.which("wrk") is None and args.install_wrk:
        install_wrk()
    if shutil.which("wrk") is not None:
        return "wrk"
    if args.load_generator == "wrk":
        raise SystemExit("wrk is not on PATH (try --install-wrk)")
    return "python"


def choose_pinning() -> tuple[bool, str]:
    """Pin when taskset exists and both CPUs are ours; pin this process (the client) too."""
    cpus = os.sched_getaffinity(0)
    if shutil.which("taskset") is None:
        return False, "unpinned: taskset not found"
    if not {GATEWAY_CPU, CLIENT_CPU} <= cpus:
        return False, f"unpinned: CPUs {GATEWAY_CPU} and {CLIENT_CPU} are not both available"
    os.sched_setaffinity(0, {CLIENT_CPU})
    return True, (
        f"taskset: both gateways (metered and proxy, each with its Valkey child) on CPU "
        f"{GATEWAY_CPU}; mock upstreams and load generator on CPU {CLIENT_CPU}"
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
    signal.signal(signal.SIGTERM, _sigterm)  # so `finally` stops the children
    load_tool = choose_load_tool(args)
    pinned, pinning = choose_pinning()
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    try:
        progress(f"starting mock upstreams, gateway and proxy in {workdir}")
        with (
            running_stack(workdir, pinned) as stack,
            asyncio.Runner(loop_factory=new_loop) as runner,
        ):
            context = describe(plan, stack, pinning, load_tool)
            load_before = os.getloadavg()[0]
            watch = CpuWatch([os.getpid(), *stack_pids(stack)])
            results = run_phases(runner, stack, plan, load_tool, workdir, pinned)
            context["first calls (cold, not in the table)"] = "; ".join(results.cold)
            context["other processes' CPU during the run"] = watch.report()
            context["load average"] = (
                f"{load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after (1 min; the "
                "run itself adds up to 2; anything else on these CPUs shows in the numbers)"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    rows = build_rows(results, plan)
    print(report(context, rows, error_notes(results)), flush=True)
    if args.json is not None:
        args.json.write_text(raw_json(context, plan, rows, results))
        progress(f"raw numbers written to {args.json}")
    if args.no_tokenizer:
        return 0
    ok, text = tokenizer_report()
    print(f"\n{text}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
