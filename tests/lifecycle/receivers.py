"""Real notification receivers on loopback, run inside the test's own event loop.

- `WebhookReceiver`: an aiohttp server that checks `X-Signature: sha256=<hex HMAC-SHA256 of the
  raw body>` with its secret, records every request, and can be told to answer 500 to the first
  N requests (or to all) and to take its time answering.
- `SmsReceiver`: an aiohttp server standing in for an HTTP SMS provider: records the
  `{"to", "text"}` JSON and the `Authorization` header.
- `SmtpReceiver`: an `aiosmtpd` server (its own thread) recording every message it accepts.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from dataclasses import dataclass, field
from email import message_from_bytes
from email.message import Message
from types import TracebackType
from typing import Any, Self

import orjson
from aiohttp import web
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.procs import free_port

__all__ = [
    "Mail",
    "SmsReceiver",
    "SmtpReceiver",
    "WebhookReceiver",
    "WebhookRequest",
    "signature",
]


def signature(secret: str, body: bytes) -> str:
    """The `X-Signature` a correct sender puts on `body` (computed here, independently)."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class _HttpReceiver:
    """An aiohttp app on 127.0.0.1 and a free port, started and stopped with `async with`."""

    def __init__(self) -> None:
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@dataclass
class WebhookRequest:
    """One request the webhook receiver got, whatever it answered."""

    body: bytes
    headers: dict[str, str]
    status: int  # what the receiver answered
    signature_ok: bool
    received_at: float  # time.monotonic()
    event: dict[str, Any] | None = None


class WebhookReceiver(_HttpReceiver):
    """Records every request; acknowledges (200) a correctly signed event unless told to fail.

    `fail_first`: answer 500 to that many requests first. `always_fail`: answer 500 to all
    (may be switched off during a test). `delay`: seconds to wait before answering.
    """

    def __init__(
        self,
        secret: str | None,
        *,
        fail_first: int = 0,
        always_fail: bool = False,
        delay: float = 0.0,
    ) -> None:
        super().__init__()
        self.secret = secret
        self.fail_first = fail_first
        self.always_fail = always_fail
        self.delay = delay
        self.requests: list[WebhookRequest] = []
        self.in_flight = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            body = await request.read()
            given = request.headers.get("X-Signature", "")
            ok = self.secret is None or hmac.compare_digest(given, signature(self.secret, body))
            try:
                event = orjson.loads(body)
            except orjson.JSONDecodeError:
                event = None
            if self.delay:
                await asyncio.sleep(self.delay)
            failed_so_far = sum(1 for r in self.requests if r.status == 500)
            if not ok:
                status = 401
            elif self.always_fail or failed_so_far < self.fail_first:
                status = 500
            else:
                status = 200
            self.requests.append(
                WebhookRequest(body, dict(request.headers), status, ok, time.monotonic(), event)
            )
            return web.Response(status=status, text="ok" if status == 200 else "no")
        finally:
            self.in_flight -= 1

    @property
    def acknowledged(self) -> list[WebhookRequest]:
        """Requests answered 200 (correctly signed events), in arrival order."""
        return [r for r in self.requests if r.status == 200]

    def events(self, account: str | None = None) -> list[dict[str, Any]]:
        """Acknowledged events, in arrival order, optionally only those of one account."""
        out = [r.event for r in self.acknowledged if r.event is not None]
        return [e for e in out if account is None or e.get("account") == account]

    def bodies(self, account: str) -> list[bytes]:
        """Raw bodies of the acknowledged events of `account`, in arrival order."""
        return [
            r.body
            for r in self.acknowledged
            if r.event is not None and r.event.get("account") == account
        ]

    def bad_signatures(self) -> list[WebhookRequest]:
        return [r for r in self.requests if not r.signature_ok]


@dataclass
class Sms:
    to: str
    text: str
    authorization: str | None
    body: bytes


class SmsReceiver(_HttpReceiver):
    """An HTTP SMS provider: records `{"to", "text"}` and the Authorization header."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[Sms] = []

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        data = orjson.loads(body)
        if not isinstance(data, dict) or set(data) != {"to", "text"}:
            return web.json_response({"error": "expected {to, text}"}, status=400)
        self.messages.append(
            Sms(str(data["to"]), str(data["text"]), request.headers.get("Authorization"), body)
        )
        return web.json_response({"status": "queued"})

    def to(self, number: str) -> list[Sms]:
        return [m for m in self.messages if m.to == number]


@dataclass
class Mail:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes  # the message as received in DATA (CRLF line ends, dots unstuffed)
    message: Message = field(repr=False)


class _Handler:
    def __init__(self, sink: list[Mail]) -> None:
        self.sink = sink

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        self.sink.append(
            Mail(
                str(envelope.mail_from),
                list(envelope.rcpt_tos),
                content,
                message_from_bytes(content),
            )
        )
        return "250 Message accepted for delivery"


class SmtpReceiver:
    """A real SMTP server (aiosmtpd, in its own thread) on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.messages: list[Mail] = []
        self._controller = Controller(_Handler(self.messages), hostname="127.0.0.1", port=self.port)

    def to(self, address: str) -> list[Mail]:
        return [m for m in self.messages if address in m.rcpt_tos]

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self._controller.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self._controller.stop)
