"""The maximum balance: a top-up that would pass it is refused inside topup.lua, credits
nothing, and concurrent top-ups cannot pass it together (gateway/money.py: why 10**15)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import aiohttp
import orjson
import redis

from gateway.ledger.keys import account_keys
from gateway.money import format_micros
from tests.admin_client import ADMIN_TOKEN, Admin
from tests.billing.checks import assert_invariant, micros

MAX_BALANCE_MICROS = 10**15  # the documented maximum balance (README, gateway/money.py)
MAX_BALANCE = format_micros(MAX_BALANCE_MICROS)  # "1000000000.000000"


def _topup(admin: Admin, account_id: str, amount: str, key: str | None = None) -> tuple[int, Any]:
    reply = admin.call(
        "POST",
        f"/admin/accounts/{account_id}/topups",
        {"amount": amount},
        headers={"Idempotency-Key": key or uuid.uuid4().hex},
    )
    return reply.status, reply.json()


def test_topup_beyond_the_maximum_balance_is_refused(
    admin: Admin, redis_client: redis.Redis
) -> None:
    """Topping up to exactly the maximum balance works; one micro-unit more is 400
    `balance_limit_exceeded` (param `amount`) and credits nothing: no balance change, no
    top-up record, no change to the account; the first top-up still replays as it answered."""
    account_id = admin.create_account()
    first_key = uuid.uuid4().hex
    status, first = _topup(admin, account_id, MAX_BALANCE, first_key)
    assert status == 201, first
    assert first["balance"] == MAX_BALANCE
    before = admin.account(account_id)
    status, refused = _topup(admin, account_id, "0.000001")
    assert status == 400, refused
    error = refused["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "balance_limit_exceeded",
        "amount",
    )
    assert MAX_BALANCE in error["message"]
    account, _ = assert_invariant(admin, redis_client, account_id, MAX_BALANCE_MICROS)
    assert account == before
    keys = account_keys(account_id)
    assert redis_client.xlen(keys.topups) == 1
    assert int(redis_client.hget(keys.account, "topped_up") or 0) == MAX_BALANCE_MICROS
    status, replay = _topup(admin, account_id, MAX_BALANCE, first_key)
    assert (status, replay) == (201, first)
    assert admin.account(account_id)["balance"] == MAX_BALANCE


async def test_concurrent_topups_cannot_pass_the_maximum_together(
    admin: Admin, redis_client: redis.Redis
) -> None:
    """Ten units below the maximum, twenty concurrent top-ups of one unit: exactly ten are
    credited, the other ten are refused, and the balance is exactly the maximum."""
    account_id = admin.create_account()
    start = MAX_BALANCE_MICROS - micros("10.00")
    admin.topup(account_id, format_micros(start))
    url = f"{admin.base_url}/admin/accounts/{account_id}/topups"

    async def one(session: aiohttp.ClientSession) -> int:
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}", "Idempotency-Key": uuid.uuid4().hex}
        body = orjson.dumps({"amount": "1.00"})
        async with session.post(url, data=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    async with aiohttp.ClientSession() as session:
        statuses = await asyncio.gather(*(one(session) for _ in range(20)))
    assert sorted(statuses) == [201] * 10 + [400] * 10
    assert redis_client.xlen(account_keys(account_id).topups) == 11
    account, _ = assert_invariant(admin, redis_client, account_id, MAX_BALANCE_MICROS)
    assert account["balance"] == MAX_BALANCE
