"""SPEC section 5, end to end: events reach real receivers on loopback, signed, once each.

Seed: "Event notification (billed only when enabled) ... Pay by actual usage: SMS: SMS
notifications; Email: Email notifications + Downstream Internet traffic; HTTP or HTTPS: HTTP or
HTTPS notifications + Downstream Internet traffic."

The gateways run as real processes; the receivers (webhooks, SMTP, SMS provider) run inside each
test's event loop, so every blocking admin call is made from a thread (`_sync`) to keep them
answering. The tests use a Valkey of their own: any other gateway on the shared store (the
session's gateway has no notification sinks) would otherwise take these accounts' outboxes and
deliver them with its own, different config.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
import pytest
import redis

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros, wait_no_holds
from tests.conftest import model_entry
from tests.lifecycle.receivers import (
    SmsReceiver,
    SmtpReceiver,
    WebhookReceiver,
    WebhookRequest,
)
from tests.procs import Proc

T = TypeVar("T")

OPS_SECRET_ENV = "NOTIFY_TEST_OPS_SECRET"
OPS_SECRET = "ops-secret-" + uuid.uuid4().hex
SMS_TOKEN_ENV = "NOTIFY_TEST_SMS_TOKEN"
SMS_TOKEN = "sms-token-" + uuid.uuid4().hex
ACCOUNT_SECRET = "account-secret-" + uuid.uuid4().hex
ENV = {OPS_SECRET_ENV: OPS_SECRET, SMS_TOKEN_ENV: SMS_TOKEN}
SENDER = "billing@gateway.test"
EMAIL = "owner@customer.test"
PHONE = "+15551234567"

MONEY = re.compile(r"^-?[0-9]+\.[0-9]{6}$")
PAYLOAD_KEYS = {"id", "type", "account", "created_at", "data"}


# ------------------------------------------------------------------------------------ fixtures


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    """A Valkey only this test's gateways use: the session's gateway, on the shared store,
    would otherwise deliver these accounts' events under its own config."""
    valkey = EmbeddedStore(tmp_path / "valkey", appendfsync="everysec")
    valkey.start()
    yield valkey
    valkey.stop()


@pytest.fixture
def store_client(store: EmbeddedStore) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(store.url)
    yield client
    client.close()


def _models(mock_url: str) -> list[dict[str, Any]]:
    # As in test_arrears: one output token held while the mock answers 16 when no max_tokens
    # is given, at high prices, so one call overdraws a small balance (about 0.04 a call).
    billed = model_entry("m", mock_url, upstream_model="mock-model")
    billed["pricing"] = {"input_per_million": "1000", "output_per_million": "2000"}
    billed["hold_output_tokens"] = 1
    return [billed]


def _start(
    make_gateway: Callable[..., Proc],
    mock: Proc,
    store: EmbeddedStore,
    *,
    notifications: dict[str, Any],
    billing: dict[str, Any] | None = None,
) -> Proc:
    return make_gateway(
        _models(mock.url),
        env=ENV,
        store={"url": store.url},
        billing={"sweep_interval": "100ms", **(billing or {})},
        notifications={
            "poll_interval": "50ms",
            "retry_base": "100ms",
            "retry_max": "1s",
            "timeout": "5s",
            **notifications,
        },
    )


def _ops_sink(receiver: WebhookReceiver) -> dict[str, str]:
    return {"url": receiver.url, "secret_env": OPS_SECRET_ENV}


# ------------------------------------------------------------------------------------- helpers


async def _sync(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking call (the admin client) off the loop the receivers answer on."""
    return await asyncio.to_thread(fn, *args, **kwargs)


async def _until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    """Poll a cheap, non-blocking condition until it holds, with a deadline."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for: {what}")
        await asyncio.sleep(0.02)


async def _until_admin(
    admin: Admin, account_id: str, want: Callable[[dict[str, Any]], bool], what: str
) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        account: dict[str, Any] = await _sync(admin.account, account_id)
        if want(account):
            return account
        if time.monotonic() > deadline:
            raise AssertionError(f"account never reached: {what}: {account}")
        await asyncio.sleep(0.05)


async def _quiet() -> None:
    """A short pause (many poll intervals) in which a duplicate delivery would show up."""
    await asyncio.sleep(0.5)


async def _call(gw: Proc, key: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], **extra}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def _settled_call(
    gw: Proc, admin: Admin, client: redis.Redis, account_id: str, key: str, **extra: Any
) -> dict[str, Any]:
    """One call that succeeds; the account afterwards (hold settled)."""
    status, answer = await _call(gw, key, **extra)
    assert status == 200, answer
    await _sync(wait_no_holds, client, account_id)
    return await _sync(admin.account, account_id)  # type: ignore[no-any-return]


def _fmt(amount: int) -> str:
    sign = "-" if amount < 0 else ""
    return f"{sign}{abs(amount) // 1_000_000}.{abs(amount) % 1_000_000:06d}"


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _types(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def _check_payload(event: dict[str, Any], account_id: str) -> None:
    assert set(event) == PAYLOAD_KEYS, event
    assert event["account"] == account_id
    assert isinstance(event["id"], str)
    assert event["id"]
    assert abs(_ts(event["created_at"]) - time.time()) < 120, event
    assert isinstance(event["data"], dict)
    for name in ("balance", "amount", "threshold"):
        if name in event["data"]:
            assert MONEY.match(event["data"][name]), event


def _traffic(nbytes: int, per_gb: int) -> int:
    """ceil(bytes * traffic_per_gb / 1e9) micro-units, in integers."""
    return -(-nbytes * per_gb // 1_000_000_000)


def _event_of_mail(body: bytes) -> dict[str, Any]:
    """The event JSON an email carries (its last non-empty line)."""
    line = [x for x in body.decode().splitlines() if x.strip()][-1]
    event: dict[str, Any] = orjson.loads(line)
    return event


def _mail_events(smtp: SmtpReceiver, address: str) -> list[dict[str, Any]]:
    out = []
    for mail in smtp.to(address):
        payload = mail.message.get_payload(decode=True)
        assert isinstance(payload, bytes)
        out.append(_event_of_mail(payload))
    return out


def _requests_for(receiver: WebhookReceiver, event_id: str) -> list[WebhookRequest]:
    return [r for r in receiver.requests if r.event and r.event.get("id") == event_id]


def _notification_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["kind"] == "notification"]


# --------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(
    "low_balance",
    [
        pytest.param(False, id="five-types"),
        pytest.param(True, id="with-balance-low"),
    ],
)
async def test_every_event_reaches_operator_webhook_signed_once_in_order(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    store: EmbeddedStore,
    store_client: redis.Redis,
    low_balance: bool,
) -> None:
    """The operator webhook of the config receives every event type of one account driven
    through the whole cycle (top-up, low balance, arrears, retention, clearing, top-up), each
    exactly once, in the order it happened, signed with the secret from `secret_env`, as
    {id, type, account, created_at, data} with money as six-decimal strings. (`five-types`
    sets no low-balance threshold, so it has no balance.low.)"""
    async with WebhookReceiver(OPS_SECRET) as ops:
        gw = _start(
            make_gateway,
            mock_a,
            store,
            notifications={"webhooks": [_ops_sink(ops)]},
            billing={"grace_period": "1s", "retention_period": "1s"},
        )
        admin = Admin(gw.url)
        account_id, key = await _sync(admin.funded, ["m"], amount="0.070000")
        if low_balance:
            await _sync(
                admin.ok,
                "PUT",
                f"/admin/accounts/{account_id}/notifications",
                {"low_balance_threshold": "0.050000"},
            )

        # The first call stays at or above zero but below 0.05 (balance.low when a threshold
        # is set); the second overdraws (frozen); then the timer (retention, cleared).
        low = await _settled_call(gw, admin, store_client, account_id, key)
        low_balance_now = micros(low["balance"])
        assert 0 <= low_balance_now < 50_000, low
        assert low["state"] == "active"
        frozen = await _settled_call(gw, admin, store_client, account_id, key)
        debt = micros(frozen["balance"])
        assert debt < 0
        assert frozen["state"] == "frozen"
        await _until_admin(admin, account_id, lambda a: a["state"] == "cleared", "cleared")
        await _sync(admin.topup, account_id, "1.00")
        assert (await _sync(admin.account, account_id))["state"] == "active"

        count = 7 if low_balance else 6
        await _until(lambda: len(ops.events(account_id)) >= count, f"{count} events")
        await _quiet()

    events = ops.events(account_id)
    expected = [
        "topup.succeeded",
        "balance.low",
        "account.frozen",
        "account.retention_started",
        "account.cleared",
        "topup.succeeded",
        "account.unfrozen",
    ]
    if not low_balance:
        expected.remove("balance.low")
    assert _types(events) == expected
    # Exactly once: one request per event, every one acknowledged and correctly signed.
    mine = [r for r in ops.requests if r.event and r.event.get("account") == account_id]
    assert len(mine) == count
    assert ops.bad_signatures() == []
    assert all(r.headers.get("X-Signature", "").startswith("sha256=") for r in mine)
    assert len({e["id"] for e in events}) == count
    for event in events:
        _check_payload(event, account_id)
    by_type = {e["type"]: e for e in events}
    times = [_ts(e["created_at"]) for e in events]
    assert times == sorted(times)
    # The timer's steps come after their periods (1 s each), measured on the events.
    frozen_at = _ts(by_type["account.frozen"]["created_at"])
    assert _ts(by_type["account.retention_started"]["created_at"]) - frozen_at >= 0.999
    assert _ts(by_type["account.cleared"]["created_at"]) - frozen_at >= 1.999

    topups = [e for e in events if e["type"] == "topup.succeeded"]
    assert [e["data"] for e in topups] == [
        {"amount": "0.070000", "balance": "0.070000"},
        {"amount": "1.000000", "balance": _fmt(debt + 1_000_000)},
    ]
    if low_balance:
        assert by_type["balance.low"]["data"] == {
            "balance": _fmt(low_balance_now),
            "threshold": "0.050000",
        }
    for step in ("account.frozen", "account.retention_started", "account.cleared"):
        assert by_type[step]["data"] == {"balance": _fmt(debt)}
    assert by_type["account.unfrozen"]["data"] == {
        "balance": _fmt(debt + 1_000_000),
        "from": "cleared",
    }


async def test_low_balance_threshold_round_trips(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """Settings with a `low_balance_threshold` that PUT accepted are shown by GET."""
    gw = _start(make_gateway, mock_a, store, notifications={})
    admin = Admin(gw.url)
    account_id = await _sync(admin.create_account)
    path = f"/admin/accounts/{account_id}/notifications"
    shown = await _sync(admin.ok, "PUT", path, {"low_balance_threshold": "0.05"})
    assert shown["low_balance_threshold"] == "0.050000"
    reply = await _sync(admin.call, "GET", path)
    assert (reply.status, reply.json()) == (200, shown)


async def test_one_accounts_threshold_does_not_stop_other_accounts_events(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """An account that set a low-balance threshold, with an event pending, does not keep
    another account's events from the operator webhook."""
    async with WebhookReceiver(OPS_SECRET) as ops:
        gw = _start(make_gateway, mock_a, store, notifications={"webhooks": [_ops_sink(ops)]})
        admin = Admin(gw.url)
        first = await _sync(admin.create_account)
        await _sync(
            admin.ok,
            "PUT",
            f"/admin/accounts/{first}/notifications",
            {"low_balance_threshold": "0.05"},
        )
        await _sync(admin.topup, first, "1.00")
        second = await _sync(admin.create_account)
        await _sync(admin.topup, second, "1.00")
        await _until(lambda: len(ops.events(second)) >= 1, "the other account's event", 5)
    assert _types(ops.events(second)) == ["topup.succeeded"]


BAD_PREFERENCES: list[tuple[Any, str]] = [
    ({"events": ["account.deleted"]}, "events"),
    ({"events": "topup.succeeded"}, "events"),
    ({"emails": ["not-an-address"]}, "not-an-address"),
    ({"sms": ["5551234567"]}, "E.164"),
    ({"webhooks": [{"url": "ftp://hooks.test/x", "secret": "long-enough-secret"}]}, "url"),
    ({"webhooks": [{"url": "http://hooks.test/x", "secret": "short"}]}, "secret"),
    ({"webhooks": [{"url": "http://hooks.test/x"}]}, "secret"),
    ({"low_balance_threshold": "-1"}, "low_balance_threshold"),
    ({"low_balance_threshold": 0.5}, "low_balance_threshold"),
    ({"surprise": True}, "surprise"),
    ([], "JSON object"),
]


async def test_account_channels_get_only_their_chosen_events(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore, store_client: redis.Redis
) -> None:
    """PUT /admin/accounts/{id}/notifications enables the account's own webhook (signed with
    its own secret), email (real SMTP) and SMS (HTTP provider, with the configured token), each
    receiving only the chosen events, while the operator webhook receives all of them. Bad
    bodies are 400 with a message naming the field and change nothing; GET masks secrets."""
    async with (
        WebhookReceiver(OPS_SECRET) as ops,
        WebhookReceiver(ACCOUNT_SECRET) as hook,
        SmtpReceiver() as smtp,
        SmsReceiver() as sms,
    ):
        gw = _start(
            make_gateway,
            mock_a,
            store,
            notifications={
                "webhooks": [_ops_sink(ops)],
                "smtp": {"host": "127.0.0.1", "port": smtp.port, "sender": SENDER},
                "sms": {"url": sms.url, "token_env": SMS_TOKEN_ENV},
            },
        )
        admin = Admin(gw.url)
        account_id = await _sync(admin.create_account)
        await _sync(admin.subscribe, account_id, "m")
        key = await _sync(admin.new_key, account_id)
        path = f"/admin/accounts/{account_id}/notifications"

        default = await _sync(admin.ok, "GET", path)
        assert default["webhooks"] == default["emails"] == default["sms"] == []

        prefs = {
            "events": ["topup.succeeded", "account.frozen"],
            "webhooks": [{"url": hook.url, "secret": ACCOUNT_SECRET}],
            "emails": [EMAIL],
            "sms": [PHONE],
        }
        shown = {
            "events": ["topup.succeeded", "account.frozen"],
            "webhooks": [{"url": hook.url, "secret": "********"}],
            "emails": [EMAIL],
            "sms": [PHONE],
            "low_balance_threshold": None,
        }
        assert await _sync(admin.ok, "PUT", path, prefs) == shown
        reply = await _sync(admin.call, "GET", path)
        assert reply.status == 200
        assert reply.json() == shown
        assert ACCOUNT_SECRET.encode() not in reply.body

        for body, mention in BAD_PREFERENCES:
            bad = await _sync(admin.call, "PUT", path, body)
            assert bad.status == 400, (body, bad.status, bad.body)
            error = bad.json()["error"]
            assert error["code"] == "invalid_request"
            assert mention in error["message"], (body, error)
        bad = await _sync(admin.call, "PUT", path, raw=b"{not json")
        assert bad.status == 400
        assert "JSON" in bad.json()["error"]["message"]
        assert (await _sync(admin.ok, "GET", path)) == shown  # the bad bodies changed nothing
        missing = await _sync(admin.call, "PUT", "/admin/accounts/no-such-acct/notifications", {})
        assert missing.status == 404

        # topup (chosen) -> frozen (chosen) -> topup (chosen) + unfrozen (not chosen).
        await _sync(admin.topup, account_id, "0.07")
        await _settled_call(gw, admin, store_client, account_id, key)
        frozen = await _settled_call(gw, admin, store_client, account_id, key)
        assert frozen["state"] == "frozen"
        await _sync(admin.topup, account_id, "1.00")

        await _until(lambda: len(ops.events(account_id)) >= 4, "operator: four events")
        await _until(lambda: len(hook.events(account_id)) >= 3, "account webhook: 3 events")
        await _until(lambda: len(smtp.to(EMAIL)) >= 3, "three emails")
        await _until(lambda: len(sms.to(PHONE)) >= 3, "three SMS")
        await _quiet()

    all_events = ops.events(account_id)
    assert _types(all_events) == [
        "topup.succeeded",
        "account.frozen",
        "topup.succeeded",
        "account.unfrozen",
    ]
    chosen = [e for e in all_events if e["type"] in prefs["events"]]
    chosen_types = ["topup.succeeded", "account.frozen", "topup.succeeded"]

    # The account's webhook: its own secret, only the chosen events, once each, in order.
    assert hook.bad_signatures() == []
    assert hook.events(account_id) == chosen
    assert len(hook.requests) == 3

    # Email, through the real SMTP server.
    assert len(smtp.messages) == 3
    mail_events = _mail_events(smtp, EMAIL)
    assert mail_events == chosen
    for mail, event in zip(smtp.messages, chosen, strict=True):
        assert mail.mail_from == SENDER
        assert mail.rcpt_tos == [EMAIL]
        assert event["type"] in mail.message["Subject"]
        assert account_id in mail.message["Subject"]

    # SMS, through the HTTP provider, with the token from `token_env`.
    assert len(sms.messages) == 3
    for message, event_type in zip(sms.messages, chosen_types, strict=True):
        assert message.to == PHONE
        assert message.authorization == f"Bearer {SMS_TOKEN}"
        assert event_type in message.text
        assert account_id in message.text


PRICES = {"sms": "0.01", "email": "0.002", "http": "0.001", "traffic_per_gb": "1000"}


@pytest.mark.parametrize("prices", [PRICES, None], ids=["priced", "default-prices"])
async def test_deliveries_to_account_channels_are_charged_exactly(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    store: EmbeddedStore,
    store_client: redis.Redis,
    prices: dict[str, str] | None,
) -> None:
    """ "Billed only when enabled": every delivery to an account's own channel is a usage record
    of kind `notification` (channel, event) costing the channel's price plus, for HTTP and
    email, ceil(bytes * traffic_per_gb / 1e9) for the bytes the receiver got; SMS carries no
    traffic; the operator webhook is free; balance == top-ups - sum(record costs) exactly.
    With the default prices (zero) each delivery is still recorded, at cost 0.000000."""
    notifications: dict[str, Any] = {}
    price = {name: micros(value) for name, value in (prices or {}).items()}
    per_gb = price.get("traffic_per_gb", 0)
    async with (
        WebhookReceiver(OPS_SECRET) as ops,
        WebhookReceiver(ACCOUNT_SECRET) as hook,
        SmtpReceiver() as smtp,
        SmsReceiver() as sms,
    ):
        notifications = {
            "webhooks": [_ops_sink(ops)],
            "smtp": {"host": "127.0.0.1", "port": smtp.port, "sender": SENDER},
            "sms": {"url": sms.url, "token_env": SMS_TOKEN_ENV},
        }
        if prices is not None:
            notifications["prices"] = prices
        gw = _start(make_gateway, mock_a, store, notifications=notifications)
        admin = Admin(gw.url)
        account_id = await _sync(admin.create_account)
        await _sync(admin.subscribe, account_id, "m")
        key = await _sync(admin.new_key, account_id)
        await _sync(
            admin.ok,
            "PUT",
            f"/admin/accounts/{account_id}/notifications",
            {
                "webhooks": [{"url": hook.url, "secret": ACCOUNT_SECRET}],
                "emails": [EMAIL],
                "sms": [PHONE],
            },
        )
        await _sync(admin.topup, account_id, "1.00")
        await _settled_call(gw, admin, store_client, account_id, key, max_tokens=5)
        await _sync(admin.topup, account_id, "0.50")

        async def six_records() -> None:
            deadline = time.monotonic() + 10
            while len(_notification_records(await _sync(admin.usage, account_id))) < 6:
                assert time.monotonic() < deadline, "six notification records"
                await asyncio.sleep(0.05)

        await six_records()
        await _until(lambda: len(ops.events(account_id)) >= 2, "operator: two events")
        await _quiet()
        account, records = await _sync(assert_invariant, admin, store_client, account_id, 1_500_000)

    notes = _notification_records(records)
    assert len(notes) == 6, notes
    assert {(r["channel"], r["event"]) for r in notes} == {
        ("webhook", "topup.succeeded"),
        ("email", "topup.succeeded"),
        ("sms", "topup.succeeded"),
    }
    assert Counter(r["channel"] for r in notes) == {"webhook": 2, "email": 2, "sms": 2}
    inference = [r for r in records if r["kind"] == "inference"]
    assert len(inference) == 1

    def costs(channel: str) -> list[int]:
        return sorted(micros(r["cost"]) for r in notes if r["channel"] == channel)

    # Webhooks: per HTTP notification + traffic, for the body the receiver actually got.
    bodies = hook.bodies(account_id)
    assert len(bodies) == 2
    assert costs("webhook") == sorted(
        price.get("http", 0) + _traffic(len(b), per_gb) for b in bodies
    )
    # SMS: per message, no traffic.
    assert costs("sms") == [price.get("sms", 0)] * 2
    # Email: per email + traffic of the message as sent (CRLF line ends); exact count below.
    assert len(smtp.messages) == 2
    for cost, mail in zip(
        costs("email"), sorted(smtp.messages, key=lambda m: len(m.content)), strict=True
    ):
        lf_bytes = len(mail.content.replace(b"\r\n", b"\n"))
        assert price.get("email", 0) + _traffic(lf_bytes, per_gb) <= cost
        assert cost <= price.get("email", 0) + _traffic(len(mail.content), per_gb)
    if prices is None:
        assert all(r["cost"] == "0.000000" for r in notes)
    else:
        assert all(micros(r["cost"]) > 0 for r in notes)
    # The operator webhook got both events and cost nothing (no record names it).
    assert _types(ops.events(account_id)) == ["topup.succeeded"] * 2
    assert sum(micros(r["cost"]) for r in records) == 1_500_000 - micros(account["balance"])


async def test_balance_low_fires_once_per_crossing(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore, store_client: redis.Redis
) -> None:
    """`balance.low` fires when a settlement takes the balance below the account's threshold,
    once per crossing: a second call that stays below sends nothing; after a top-up back above
    the threshold, a call that stays above sends nothing and the next fall below sends the
    second event."""
    async with WebhookReceiver(OPS_SECRET) as ops:
        gw = _start(make_gateway, mock_a, store, notifications={"webhooks": [_ops_sink(ops)]})
        admin = Admin(gw.url)
        account_id, key = await _sync(admin.funded, ["m"], amount="1.00")

        async def call() -> int:
            account = await _settled_call(gw, admin, store_client, account_id, key, max_tokens=5)
            return micros(account["balance"])

        def lows() -> list[dict[str, Any]]:
            return [e for e in ops.events(account_id) if e["type"] == "balance.low"]

        b0 = await call()  # a probe: what one call costs
        cost = 1_000_000 - b0
        assert cost > 0
        threshold = b0 - cost // 2
        await _sync(
            admin.ok,
            "PUT",
            f"/admin/accounts/{account_id}/notifications",
            {"low_balance_threshold": _fmt(threshold)},
        )
        assert await call() == b0 - cost  # below: the first event
        await _until(lambda: len(lows()) == 1, "the first balance.low", within=5)
        assert await call() == b0 - 2 * cost  # still below: nothing
        await _sync(admin.topup, account_id, _fmt(3 * cost))  # back above the threshold
        assert await call() == b0  # above (>= threshold): nothing
        await _until(lambda: len(ops.events(account_id)) >= 3, "the second top-up")
        await _quiet()
        assert len(lows()) == 1
        assert await call() == b0 - cost  # below again: the second event
        await _until(lambda: len(lows()) == 2, "the second balance.low")
        await _quiet()

    assert _types(ops.events(account_id)) == [
        "topup.succeeded",
        "balance.low",
        "topup.succeeded",
        "balance.low",
    ]
    for event in lows():
        assert event["data"] == {"balance": _fmt(b0 - cost), "threshold": _fmt(threshold)}


async def test_failed_delivery_is_retried_and_acknowledged_once(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """A receiver that answers 500 twice then 200 gets the event on the third attempt, after
    backoff (retry_base 100ms, doubling), signed the same each time; it is acknowledged and
    billed once, and nothing is dead-lettered."""
    async with WebhookReceiver(ACCOUNT_SECRET, fail_first=2) as hook:
        gw = _start(make_gateway, mock_a, store, notifications={"max_attempts": 5})
        admin = Admin(gw.url)
        account_id = await _sync(admin.create_account)
        await _sync(
            admin.ok,
            "PUT",
            f"/admin/accounts/{account_id}/notifications",
            {
                "events": ["topup.succeeded"],
                "webhooks": [{"url": hook.url, "secret": ACCOUNT_SECRET}],
            },
        )
        await _sync(admin.topup, account_id, "1.00")
        await _until(lambda: len(hook.acknowledged) >= 1, "an acknowledged delivery")
        await _quiet()
        dead = await _sync(admin.ok, "GET", f"/admin/accounts/{account_id}/dead-letters")
        records = await _sync(admin.usage, account_id)

    (event,) = hook.events(account_id)
    attempts = _requests_for(hook, event["id"])
    assert [r.status for r in attempts] == [500, 500, 200]
    assert len(hook.requests) == 3
    assert all(r.signature_ok for r in attempts)
    assert len({r.body for r in attempts}) == 1  # the same event, the same bytes, each time
    gaps = [b.received_at - a.received_at for a, b in itertools.pairwise(attempts)]
    assert gaps[0] >= 0.09, gaps
    assert gaps[1] >= 0.19, gaps  # exponential backoff: 100 ms, then 200 ms
    assert dead == {"data": []}
    (note,) = _notification_records(records)
    assert (note["channel"], note["event"]) == ("webhook", "topup.succeeded")


async def test_failing_delivery_is_dead_lettered_and_blocks_nothing(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """A receiver that always fails gets `max_attempts` (3) tries, then the delivery is listed
    by GET /admin/accounts/{id}/dead-letters with its event, channel, target, error and
    attempts, and is not charged; the account's later events still reach every channel (the
    operator webhook at once, the account's webhook once it answers again)."""
    async with (
        WebhookReceiver(OPS_SECRET) as ops,
        WebhookReceiver(ACCOUNT_SECRET, always_fail=True) as hook,
    ):
        gw = _start(
            make_gateway,
            mock_a,
            store,
            notifications={"webhooks": [_ops_sink(ops)], "max_attempts": 3},
        )
        admin = Admin(gw.url)
        account_id = await _sync(admin.create_account)
        path = f"/admin/accounts/{account_id}/dead-letters"
        await _sync(
            admin.ok,
            "PUT",
            f"/admin/accounts/{account_id}/notifications",
            {"webhooks": [{"url": hook.url, "secret": ACCOUNT_SECRET}]},
        )

        async def dead_letters(count: int) -> list[dict[str, Any]]:
            deadline = time.monotonic() + 10
            while True:
                data: list[dict[str, Any]] = (await _sync(admin.ok, "GET", path))["data"]
                if len(data) >= count:
                    return data
                assert time.monotonic() < deadline, f"{count} dead letters: {data}"
                await asyncio.sleep(0.05)

        await _sync(admin.topup, account_id, "1.00")
        (first,) = await dead_letters(1)
        await _sync(admin.topup, account_id, "2.00")  # the account's webhook still fails
        await _until(lambda: len(ops.events(account_id)) >= 2, "operator: the second event")
        first_two = await dead_letters(2)
        hook.always_fail = False
        await _sync(admin.topup, account_id, "3.00")
        await _until(lambda: len(hook.acknowledged) >= 1, "the account webhook answers again")
        await _until(lambda: len(ops.events(account_id)) >= 3, "operator: the third event")
        await _quiet()
        records = await _sync(admin.usage, account_id)
        final = await _sync(admin.ok, "GET", path)

    events = ops.events(account_id)
    assert [e["data"]["amount"] for e in events] == ["1.000000", "2.000000", "3.000000"]
    assert first["event"] == events[0]
    assert first["channel"] == "webhook"
    assert first["target"] == hook.url
    assert first["attempts"] == 3
    assert "500" in first["error"]
    assert first["time"]
    assert [d["event"] for d in first_two] == events[:2]
    assert final["data"] == first_two  # nothing more dead-lettered
    for event in events[:2]:
        assert [r.status for r in _requests_for(hook, event["id"])] == [500, 500, 500]
    assert [r.status for r in _requests_for(hook, events[2]["id"])] == [200]
    assert hook.events(account_id) == [events[2]]
    # Only the one successful delivery to the account's channel is billed.
    (note,) = _notification_records(records)
    assert (note["channel"], note["event"]) == ("webhook", "topup.succeeded")


async def test_two_instances_deliver_each_event_once(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore, store_client: redis.Redis
) -> None:
    """Two gateway instances on one store, same config: five accounts driven into arrears,
    through retention to cleared, then paid up. The operator webhook receives each account's
    events exactly once: one frozen, one retention_started, one cleared, one unfrozen, and one
    topup.succeeded per top-up (so each lifecycle step happened once and each event was
    delivered once)."""
    async with WebhookReceiver(OPS_SECRET) as ops:
        config: dict[str, Any] = {
            "notifications": {"webhooks": [_ops_sink(ops)]},
            "billing": {"grace_period": "1s", "retention_period": "1s"},
        }
        gateways = [_start(make_gateway, mock_a, store, **config) for _ in range(2)]
        admins = [Admin(gw.url) for gw in gateways]
        accounts: list[tuple[str, str]] = []
        for i in range(5):
            accounts.append(await _sync(admins[i % 2].funded, ["m"], amount="0.020000"))
        results = await asyncio.gather(
            *(_call(gateways[i % 2], key) for i, (_, key) in enumerate(accounts))
        )
        assert all(status == 200 for status, _ in results), results
        for i, (account_id, _) in enumerate(accounts):
            await _sync(wait_no_holds, store_client, account_id)
            await _until_admin(
                admins[(i + 1) % 2], account_id, lambda a: a["state"] == "cleared", "cleared"
            )
        for i, (account_id, _) in enumerate(accounts):
            await _sync(admins[(i + 1) % 2].topup, account_id, "1.00")
        ids = {account_id for account_id, _ in accounts}
        await _until(
            lambda: sum(1 for e in ops.events() if e["account"] in ids) >= 30, "thirty events"
        )
        await _quiet()

    assert ops.bad_signatures() == []
    events = [e for e in ops.events() if e["account"] in ids]
    assert len({(e["account"], e["id"]) for e in events}) == len(events) == 30
    assert all(r.status == 200 for r in ops.requests)
    counts = Counter((e["account"], e["type"]) for e in events)
    for account_id in ids:
        assert {t: n for (a, t), n in counts.items() if a == account_id} == {
            "topup.succeeded": 2,
            "account.frozen": 1,
            "account.retention_started": 1,
            "account.cleared": 1,
            "account.unfrozen": 1,
        }
        assert _types(ops.events(account_id)) == [
            "topup.succeeded",
            "account.frozen",
            "account.retention_started",
            "account.cleared",
            "topup.succeeded",
            "account.unfrozen",
        ]


async def test_event_ids_are_unique_across_accounts(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """The operator webhook gets every account's events; no two of them share an id (the key
    a receiver deduplicates at-least-once deliveries by)."""
    async with WebhookReceiver(OPS_SECRET) as ops:
        gw = _start(make_gateway, mock_a, store, notifications={"webhooks": [_ops_sink(ops)]})
        admin = Admin(gw.url)
        ids = [await _sync(admin.create_account) for _ in range(60)]
        headers = {"Authorization": f"Bearer {admin.token}"}
        async with aiohttp.ClientSession(headers=headers) as session:

            async def topup(account_id: str) -> int:
                async with session.post(
                    f"{gw.url}/admin/accounts/{account_id}/topups", json={"amount": "1.00"}
                ) as resp:
                    return resp.status

            assert set(await asyncio.gather(*(topup(a) for a in ids))) == {201}
        wanted = set(ids)
        await _until(lambda: sum(e["account"] in wanted for e in ops.events()) >= 60, "60 events")

    events = [e for e in ops.events() if e["account"] in wanted]
    assert len({e["account"] for e in events}) == 60
    assert len({e["id"] for e in events}) == len(events)


async def test_slow_receivers_never_block_calls(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """With an operator webhook that takes 2 s to answer each delivery, data-plane calls and
    top-ups still complete at once while deliveries are pending; the deliveries complete."""
    async with WebhookReceiver(OPS_SECRET, delay=2.0) as ops:
        gw = _start(make_gateway, mock_a, store, notifications={"webhooks": [_ops_sink(ops)]})
        admin = Admin(gw.url)
        account_id, key = await _sync(admin.funded, ["m"], amount="5.00")
        await _until(lambda: ops.in_flight >= 1, "a delivery in flight", within=5)
        for _ in range(3):
            started = time.monotonic()
            status, answer = await _call(gw, key, max_tokens=4)
            elapsed = time.monotonic() - started
            assert status == 200, answer
            assert elapsed < 0.5, elapsed
            started = time.monotonic()
            await _sync(admin.topup, account_id, "1.00")  # another event to deliver
            assert time.monotonic() - started < 0.5
        assert ops.in_flight >= 1  # the calls completed while a delivery was pending
        await _until(lambda: len(ops.events(account_id)) >= 1, "the first delivery", within=5)
    assert ops.events(account_id)[0]["type"] == "topup.succeeded"


async def test_email_traffic_is_the_bytes_sent(
    make_gateway: Callable[..., Proc], mock_a: Proc, store: EmbeddedStore
) -> None:
    """An email's charge is the per-email price plus the traffic of the message exactly as the
    SMTP server received it."""
    async with SmtpReceiver() as smtp:
        gw = _start(
            make_gateway,
            mock_a,
            store,
            notifications={
                "smtp": {"host": "127.0.0.1", "port": smtp.port, "sender": SENDER},
                "prices": PRICES,
            },
        )
        admin = Admin(gw.url)
        account_id = await _sync(admin.create_account)
        await _sync(
            admin.ok,
            "PUT",
            f"/admin/accounts/{account_id}/notifications",
            {"events": ["topup.succeeded"], "emails": [EMAIL]},
        )
        await _sync(admin.topup, account_id, "1.00")
        deadline = time.monotonic() + 10
        while not _notification_records(records := await _sync(admin.usage, account_id)):
            assert time.monotonic() < deadline, "a notification record"
            await asyncio.sleep(0.05)

    (note,) = _notification_records(records)
    (mail,) = smtp.messages
    assert micros(note["cost"]) == micros(PRICES["email"]) + _traffic(
        len(mail.content), micros(PRICES["traffic_per_gb"])
    )
