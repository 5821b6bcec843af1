"""Where an event goes: operator webhooks, and an account's webhooks, email and SMS.

Each channel sends one event and says how many bytes went downstream (for the traffic part of
its price); any failure raises `DeliveryError`, which the notifier retries.
"""

from __future__ import annotations

import email.policy
import hashlib
import hmac
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any, Literal

import aiohttp
import aiosmtplib
import orjson

from gateway.config.schema import NotificationsConfig

__all__ = ["Channel", "DeliveryError", "sign"]

ChannelKind = Literal["operator_webhook", "webhook", "email", "sms"]


class DeliveryError(Exception):
    """One attempt to deliver failed; it may be retried."""


def sign(secret: str, body: bytes) -> str:
    """`X-Signature` value: `sha256=` and the hex HMAC-SHA256 of the body."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    headers: dict[str, str],
    within: float,
    who: str,
) -> None:
    """POST `body`; anything but a 2xx answer is a failed delivery."""
    async with session.post(
        url, data=body, headers=headers, timeout=aiohttp.ClientTimeout(total=within)
    ) as resp:
        await resp.read()
        if not 200 <= resp.status < 300:
            raise DeliveryError(f"{who} answered {resp.status}")


def _summary(event: dict[str, Any]) -> str:
    data = event["data"]
    parts = [f"{key} {value}" for key, value in data.items()]
    return f"{event['type']} for account {event['account']}: " + ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Channel:
    """One destination of events."""

    kind: ChannelKind
    target: str  # URL, address or number
    secret: str | None = None

    @property
    def id(self) -> str:
        """Stable id of this destination, for remembering what was delivered to it."""
        digest = hashlib.sha256(f"{self.kind}|{self.target}".encode()).hexdigest()[:16]
        return f"{self.kind}:{digest}"

    @property
    def billed(self) -> bool:
        """Deliveries to an account's own channels are charged to it; operator sinks are not."""
        return self.kind != "operator_webhook"

    async def send(
        self,
        event: dict[str, Any],
        session: aiohttp.ClientSession,
        config: NotificationsConfig,
        sms_token: str | None,
    ) -> int:
        """Deliver `event`; return the bytes sent downstream."""
        try:
            if self.kind in ("operator_webhook", "webhook"):
                return await self._webhook(event, session, config)
            if self.kind == "email":
                return await self._email(event, config)
            return await self._sms(event, session, config, sms_token)
        except DeliveryError:
            raise
        except (aiohttp.ClientError, aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise DeliveryError(f"{exc.__class__.__name__}: {exc}") from exc

    async def _webhook(
        self, event: dict[str, Any], session: aiohttp.ClientSession, config: NotificationsConfig
    ) -> int:
        body = orjson.dumps(event)
        headers = {"Content-Type": "application/json", "X-Gateway-Event": event["type"]}
        if self.secret:
            headers["X-Signature"] = sign(self.secret, body)
        await _post(session, self.target, body, headers, config.timeout, "webhook")
        return len(body)

    async def _email(self, event: dict[str, Any], config: NotificationsConfig) -> int:
        smtp = config.smtp
        if smtp is None:
            raise DeliveryError("no notifications.smtp server is configured")
        message = EmailMessage()
        message["From"] = smtp.sender
        message["To"] = self.target
        message["Subject"] = f"[inference-gateway] {event['type']} ({event['account']})"
        message.set_content(_summary(event) + "\n\n" + orjson.dumps(event).decode() + "\n")
        raw = message.as_bytes(policy=email.policy.SMTP)  # CRLF line ends, as sent
        await aiosmtplib.send(
            message,
            hostname=smtp.host,
            port=smtp.port,
            timeout=config.timeout,
            start_tls=False,
            use_tls=False,
        )
        return len(raw)

    async def _sms(
        self,
        event: dict[str, Any],
        session: aiohttp.ClientSession,
        config: NotificationsConfig,
        token: str | None,
    ) -> int:
        if config.sms is None:
            raise DeliveryError("no notifications.sms provider is configured")
        body = orjson.dumps({"to": self.target, "text": _summary(event)[:480]})
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        await _post(session, config.sms.url, body, headers, config.timeout, "SMS provider")
        return len(body)
