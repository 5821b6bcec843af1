"""Delivers outbox events at least once, in order per account, with retries and backoff.

Every gateway instance runs one. An account's outbox is worked by one instance at a time (a
lock with a TTL, so a crashed instance holds nothing back for long); what each destination
has acknowledged is remembered, so when nothing fails each destination gets each event once.
A delivery that keeps failing goes to the account's dead-letter list, never silently away.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import aiohttp
import orjson

from gateway.accounts.channels import Channel, DeliveryError
from gateway.accounts.preferences import NotificationPreferences
from gateway.config.schema import NotificationsConfig, Settings
from gateway.errors import LedgerUnavailable
from gateway.ledger import Ledger
from gateway.ledger.keys import OUTBOX_DUE, account_keys
from gateway.money import format_micros
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.pricing import delivery_price
from gateway.state import ConfigHolder
from gateway.timefmt import iso_ms, now_ms
from gateway.usage_record import UsageRecord

__all__ = ["Notifier", "event_payload", "load_preferences"]

log = get_logger("gateway.notifier")

EVENTS_PER_PASS = 50
LOCK_TTL_MS = 120_000
_MONEY_FIELDS = ("balance", "amount", "threshold")


def event_payload(event_id: str, fields: dict[str, str]) -> dict[str, Any]:
    """The JSON every destination receives for one outbox entry."""
    data: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("type", "account", "time"):
            continue
        data[name] = format_micros(int(value)) if name in _MONEY_FIELDS else value
    return {
        "id": f"evt_{fields['account']}_{event_id}",  # stream ids repeat across accounts
        "type": fields["type"],
        "account": fields["account"],
        "created_at": iso_ms(int(fields["time"])),
        "data": data,
    }


async def load_preferences(ledger: Ledger, account_id: str) -> NotificationPreferences | None:
    """The account's own channels, or None when it has set none."""
    raw = await ledger.get_notifications(account_id)
    if raw is None:
        return None
    return NotificationPreferences.model_validate_json(raw)


def _operator_channels(config: NotificationsConfig) -> list[Channel]:
    return [
        Channel(
            "operator_webhook",
            sink.url,
            os.environ.get(sink.secret_env) if sink.secret_env else None,
        )
        for sink in config.webhooks
    ]


def _account_channels(prefs: NotificationPreferences | None, event_type: str) -> list[Channel]:
    if prefs is None or event_type not in prefs.events:
        return []
    channels = [Channel("webhook", w.url, w.secret) for w in prefs.webhooks]
    channels += [Channel("email", address) for address in prefs.emails]
    channels += [Channel("sms", number) for number in prefs.sms]
    return channels


class Notifier:
    """The delivery loop of one instance."""

    def __init__(
        self,
        ledger: Ledger,
        config: ConfigHolder,
        session: aiohttp.ClientSession,
        metrics: Metrics | None = None,
    ) -> None:
        self.metrics = metrics
        self.ledger = ledger
        self.config = config
        self.session = session
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"

    async def run(self) -> None:
        """Deliver forever (a background task of the app)."""
        while True:
            worked = 0
            try:
                worked = await self.deliver_due()
            except LedgerUnavailable as exc:
                log.warning("notification pass skipped: store unavailable", error=str(exc))
            except Exception:
                log.exception("notification pass failed")
            if not worked:
                await asyncio.sleep(self.config.snapshot.settings.notifications.poll_interval)

    async def deliver_due(self) -> int:
        """One pass over the accounts with events due; returns how many were worked."""
        worked = 0
        for account_id, score in await self.ledger.due(OUTBOX_DUE, now_ms(), 20):
            keys = account_keys(account_id)
            if not await self.ledger.lock(keys.outbox_lock, self.owner, LOCK_TTL_MS):
                continue
            try:
                try:
                    retry_at: int | None = await self._deliver_account(account_id)
                except LedgerUnavailable:
                    raise  # the store's fault, not the account's: the pass stops, it stays due
                except Exception:
                    # One account's fault must not hold back everyone else's events.
                    log.exception("notification delivery failed for an account", account=account_id)
                    retry_at = now_ms() + 30_000
                if retry_at is not None:
                    await self.ledger.mark_due(OUTBOX_DUE, account_id, retry_at)
                elif await self.ledger.outbox_waiting(account_id):
                    await self.ledger.mark_due(OUTBOX_DUE, account_id, now_ms())
                else:
                    await self.ledger.unmark(OUTBOX_DUE, account_id, score)
                worked += 1
            finally:
                await self.ledger.unlock(keys.outbox_lock, self.owner)
        return worked

    async def _deliver_account(self, account_id: str) -> int | None:
        """Work the account's outbox in order; the time of the next retry if one is pending."""
        settings = self.config.snapshot.settings
        entries = await self.ledger.outbox(account_id, EVENTS_PER_PASS)
        if not entries:
            return None
        prefs = await load_preferences(self.ledger, account_id)
        operator = _operator_channels(settings.notifications)
        for event_id, fields in entries:
            event = event_payload(event_id, fields)
            channels = operator + _account_channels(prefs, event["type"])
            retry_at = await self._deliver_event(account_id, event_id, event, channels, settings)
            if retry_at is not None:
                return retry_at  # later events wait: each account's events arrive in order
            done = [f"{event_id}|{c.id}" for c in channels]
            await self.ledger.drop_event(account_id, event_id, done)
        return None

    async def _deliver_event(
        self,
        account_id: str,
        event_id: str,
        event: dict[str, Any],
        channels: list[Channel],
        settings: Settings,
    ) -> int | None:
        config = settings.notifications
        sms_token = None
        if config.sms is not None and config.sms.token_env:
            sms_token = os.environ.get(config.sms.token_env)
        retry_at: int | None = None
        for channel in channels:
            field = f"{event_id}|{channel.id}"
            state = await self.ledger.delivery_state(account_id, field)
            if state in ("done", "dead"):
                continue
            attempts, next_try = (0, 0)
            if state:
                attempts, next_try = (int(x) for x in state.split(":"))
            if next_try > now_ms():
                retry_at = next_try if retry_at is None else min(retry_at, next_try)
                continue
            try:
                nbytes = await channel.send(event, self.session, config, sms_token)
            except DeliveryError as exc:
                attempts += 1
                self._count(channel, "failed")
                if attempts >= config.max_attempts:
                    self._count(channel, "dead_lettered")
                    await self._dead_letter(account_id, event, channel, str(exc), attempts)
                    await self.ledger.set_delivery_state(account_id, field, "dead")
                    continue
                delay = min(config.retry_base * 2 ** (attempts - 1), config.retry_max)
                next_try = now_ms() + int(delay * 1000)
                await self.ledger.set_delivery_state(account_id, field, f"{attempts}:{next_try}")
                log.info(
                    "notification delivery failed; will retry",
                    account=account_id,
                    event_type=event["type"],
                    channel=channel.kind,
                    attempts=attempts,
                    error=str(exc),
                )
                retry_at = next_try if retry_at is None else min(retry_at, next_try)
                continue
            self._count(channel, "delivered")
            if channel.billed:
                await self._charge(account_id, event_id, event, channel, nbytes, config)
            await self.ledger.set_delivery_state(account_id, field, "done")
        return retry_at

    def _count(self, channel: Channel, result: str) -> None:
        if self.metrics is not None:
            self.metrics.notifications.labels(channel.kind, result).inc()

    async def _charge(
        self,
        account_id: str,
        event_id: str,
        event: dict[str, Any],
        channel: Channel,
        nbytes: int,
        config: NotificationsConfig,
    ) -> None:
        """Bill one delivery as a usage record of kind `notification` (once per delivery)."""
        cost = delivery_price(channel.kind, nbytes, config)
        now = now_ms()
        request_id = f"ntf_{event_id}_{channel.id}"
        record = UsageRecord(
            request_id=request_id,
            time=now,
            kind="notification",
            cost=cost,
            channel=channel.kind,
            event=event["type"],
            bytes=nbytes,
        ).fields()
        await self.ledger.settle(account_id, request_id, cost, now, record)

    async def _dead_letter(
        self, account_id: str, event: dict[str, Any], channel: Channel, error: str, attempts: int
    ) -> None:
        await self.ledger.add_dead_letter(
            account_id,
            {
                "event": orjson.dumps(event),
                "channel": channel.kind,
                "target": channel.target,
                "error": error[:500],
                "attempts": attempts,
                "time": now_ms(),
            },
        )
        log.warning(
            "notification dead-lettered",
            account=account_id,
            event_type=event["type"],
            channel=channel.kind,
            attempts=attempts,
        )
