"""The benchmark's request and a minimal keep-alive HTTP/1.1 client on asyncio protocols.

Why its own client: it writes prebuilt request bytes and stamps `time.perf_counter_ns()` in
`data_received`, so arrival times carry far less client overhead than a full HTTP client
would add, and it sees every SSE event as it arrives (time to first token, gaps).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import cast

HOST = "127.0.0.1"
PATH = "/v1/chat/completions"
MAX_TOKENS = 64
DONE_EVENT = b"data: [DONE]"
TOKEN_EVENT = re.compile(rb'"content":\s*"(?!")')
EVENT_END = re.compile(rb"\r?\n\r?\n")
PACED_MARKER = "BENCH-PACED-STREAM"  # in the user message of paced calls: nginx routes on it
PROMPT_SIZES = (1024, 10 * 1024, 100 * 1024)  # user-message sizes of the latency rows
REQUEST_TIMEOUT = 10.0  # no call of this benchmark takes 1 s at 1 in flight; a stuck peer does


# -- the request ---------------------------------------------------------------------------


def user_message(min_bytes: int = 1024, paced: bool = False) -> str:
    """A deterministic prose message of at least `min_bytes` bytes.

    Paced calls start with PACED_MARKER: the native upstream reads the body to tell them
    apart, since a peer forwards every call to the one upstream URL it was given.
    """
    sentence = (
        "The gateway forwards each call to the model server, counts the tokens of the "
        "prompt and of the answer, and writes the cost to the account of the caller. "
    )
    text = (PACED_MARKER + " " if paced else "") + "Summarize these notes in one line. "
    while len(text.encode()) < min_bytes:
        text += sentence
    return text.strip()


def body_bytes(model: str, stream: bool, prompt_bytes: int = 1024, paced: bool = False) -> bytes:
    """The benchmark's chat completion body: the same bytes for every target but `model`."""
    return json.dumps(
        {
            "model": model,
            "messages": [
                {"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": user_message(prompt_bytes, paced)},
            ],
            "max_tokens": MAX_TOKENS,
            "stream": stream,
        },
        separators=(",", ":"),
    ).encode()


FRAMING = frozenset({"host", "content-length"})  # this client writes these itself


@lru_cache(maxsize=128)
def request_bytes(
    port: int,
    path: str,
    model: str,
    headers: tuple[tuple[str, str], ...],
    stream: bool,
    prompt_bytes: int = 1024,
    paced: bool = False,
) -> bytes:
    """A complete HTTP/1.1 POST of the benchmark's chat completion (cached: 100 KB bodies)."""
    body = body_bytes(model, stream, prompt_bytes, paced)
    names = {name.lower() for name, _ in headers}
    lines = [f"POST {path} HTTP/1.1", f"Host: {HOST}:{port}"]
    if "content-type" not in names:
        lines.append("Content-Type: application/json")
    if "accept" not in names:
        lines.append("Accept: */*")
    lines += [f"{name}: {value}" for name, value in headers if name.lower() not in FRAMING]
    lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


@dataclass(frozen=True)
class Target:
    """One way to reach a model: directly at the upstream, through a gateway or a peer.

    `headers` are what each request carries besides the framing ones: the bench key for the
    upstream and this project's gateways, a peer's own auth and routing headers for a peer.
    """

    label: str  # a key of the report's LABELS (direct, proxy, gateway, litellm, ...)
    port: int
    model: str
    headers: tuple[tuple[str, str], ...]
    path: str = PATH

    def payload(self, stream: bool, prompt_bytes: int = 1024, paced: bool = False) -> bytes:
        return request_bytes(
            self.port, self.path, self.model, self.headers, stream, prompt_bytes, paced
        )

    def body(self, stream: bool, prompt_bytes: int = 1024, paced: bool = False) -> bytes:
        return self.payload(stream, prompt_bytes, paced).split(b"\r\n\r\n", 1)[1]


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("Authorization", f"Bearer {key}"),)


# -- response framing ------------------------------------------------------------------------


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
    """Arrival times of the SSE events that carry a non-empty `content` (the tokens).

    Events may end with LF LF or CRLF CRLF (peers differ); both are understood.
    """

    def __init__(self) -> None:
        self._pending = b""
        self.token_ns: list[int] = []

    def feed(self, body: bytes, now_ns: int) -> None:
        pending = self._pending + body
        pos = 0
        while (end := EVENT_END.search(pending, pos)) is not None:
            event = pending[pos : end.start()]
            pos = end.end()
            if event.startswith(b"data:") and TOKEN_EVENT.search(event):
                self.token_ns.append(now_ns)
        self._pending = pending[pos:]


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


class Connection(asyncio.Protocol):
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

    def expire(self) -> None:
        """The response took too long: fail the waiter (a TimeoutError) and drop the line."""
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(TimeoutError("no complete response in time"))
        self._abort()

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


async def connect(port: int) -> Connection:
    _, conn = await asyncio.get_running_loop().create_connection(Connection, HOST, port)
    return conn


class Client:
    """A reconnecting keep-alive client of one target; it tallies its failures."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.errors: Counter[str] = Counter()
        self._conn: Connection | None = None

    async def exchange(self, payload: bytes, clock: SseClock | None = None) -> Exchange | None:
        """Send one request; None (and an error tallied) if no complete response came back.

        A response not complete within REQUEST_TIMEOUT counts as a TimeoutError (a timer,
        not wait_for: no task per request).
        """
        try:
            if self._conn is None or self._conn.lost:
                self._conn = await connect(self.target.port)
            conn = self._conn
            timer = asyncio.get_running_loop().call_later(REQUEST_TIMEOUT, conn.expire)
            try:
                result = await conn.send(payload, clock)
            finally:
                timer.cancel()
        except (OSError, ProtocolError) as exc:  # TimeoutError is an OSError
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
    if stream and not result.tail.rstrip().endswith(DONE_EVENT):
        return "stream without [DONE]"
    if check_tokens and len(result.token_ns) != MAX_TOKENS:
        return f"{len(result.token_ns)} token events, not {MAX_TOKENS}"
    return None
