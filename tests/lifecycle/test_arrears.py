"""The seed's arrears rules, end to end through the HTTP API, with 2-second periods.

Seed: "If you are in arrears when using a model service, the resource is frozen and enters the
grace period ... the frozen resources cannot be used, and new models that have not been
subscribed to will not be supported for subscription. Both the grace and retention periods
are 15 days. After the retention period expires ... the related resources and order records
... will be cleared ... To use the model service again, pay off the outstanding amount and
subscribe to the model service again."
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import micros
from tests.conftest import model_entry
from tests.procs import Proc

GRACE = 2.0
RETENTION = 2.0


def _models(mock_url: str) -> list[dict[str, Any]]:
    # `hold_output_tokens: 1` while the mock answers 16 tokens when no max_tokens is given:
    # the hold covers less than the call costs, so one call overdraws a small balance.
    billed = model_entry("m", mock_url, upstream_model="mock-model")
    billed["pricing"] = {"input_per_million": "1000", "output_per_million": "2000"}
    billed["hold_output_tokens"] = 1
    other = model_entry("other", mock_url, upstream_model="mock-model")
    pool = model_entry("pool", mock_url, upstream_model="mock-model")
    pool["billing"] = "dedicated"
    del pool["pricing"]
    return [billed, other, pool]


@pytest.fixture
def arrears_gateway(
    make_gateway: Callable[..., Proc], mock_a: Proc, own_store: EmbeddedStore
) -> Proc:
    """A gateway with second-long arrears periods, on a store of its own: every instance on a
    store runs the arrears timer with its own periods, and the session's other gateways (15 d)
    would move this one's accounts' next step out by 15 days whenever they swept first."""
    return make_gateway(
        _models(mock_a.url),
        store={"url": own_store.url},
        billing={
            "grace_period": f"{GRACE}s",
            "retention_period": f"{RETENTION}s",
            "sweep_interval": "100ms",
        },
    )


async def _call(gw: Proc, key: str, model: str, **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


def _code(answer: dict[str, Any]) -> str:
    return str(answer["error"]["code"])


def _wait_for(
    admin: Admin, account_id: str, want: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        account = admin.account(account_id)
        if want(account):
            return account  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"account never reached the state: {admin.account(account_id)}")


def _settled(admin: Admin, account_id: str) -> None:
    """Wait, through the admin API only, until no hold is open."""
    _wait_for(admin, account_id, lambda a: a["held"] == "0.000000")


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


async def test_whole_lifecycle_through_the_api(arrears_gateway: Proc) -> None:
    """call into arrears -> frozen (403s, no new subscriptions) -> retention -> cleared (usage
    and subscriptions gone, debt kept) -> top-up -> active with no subscriptions -> subscribe
    again -> calls work."""
    gw = arrears_gateway
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m", "pool"], amount="0.020000")

    # 1. A call whose actual cost exceeds the balance puts the account in arrears.
    status, answer = await _call(gw, key, "m")
    assert status == 200, answer
    _settled(admin, account_id)
    frozen = admin.account(account_id)
    assert micros(frozen["balance"]) < 0
    assert frozen["state"] == "frozen"
    assert frozen["period"] == "grace"
    since = _ts(frozen["arrears_since"])
    assert abs(since - time.time()) < 5
    assert _ts(frozen["grace_ends_at"]) == pytest.approx(since + GRACE, abs=0.002)
    assert _ts(frozen["retention_ends_at"]) == pytest.approx(since + GRACE + RETENTION, abs=0.002)
    debt = frozen["balance"]
    assert len(admin.usage(account_id)) == 1

    # 2. Frozen: calls refused, no new subscriptions, existing ones kept.
    status, answer = await _call(gw, key, "m")
    assert (status, _code(answer)) == (403, "account_frozen")
    reply = admin.call("POST", f"/admin/accounts/{account_id}/subscriptions", {"model": "other"})
    assert reply.status == 403
    assert reply.json()["error"]["code"] == "account_in_arrears"
    assert (
        admin.call("POST", f"/admin/accounts/{account_id}/subscriptions", {"model": "m"}).status
        == 200
    )
    # A dedicated (prepaid pool) model stays usable while frozen, recorded at cost zero.
    status, answer = await _call(gw, key, "pool")
    assert status == 200, answer

    # 3. After the grace period: retention.
    retention = _wait_for(admin, account_id, lambda a: a["period"] == "retention")
    assert retention["state"] == "frozen"
    assert time.time() >= since + GRACE
    status, answer = await _call(gw, key, "m")
    assert (status, _code(answer)) == (403, "account_frozen")

    # 4. After the retention period: cleared. Subscriptions and usage records deleted; the
    # debt stays.
    cleared = _wait_for(admin, account_id, lambda a: a["state"] == "cleared")
    assert time.time() >= since + GRACE + RETENTION
    assert cleared["subscriptions"] == []
    assert cleared["balance"] == debt
    assert admin.usage(account_id) == []
    for model in ("m", "pool"):
        status, answer = await _call(gw, key, model)
        assert (status, _code(answer)) == (403, "account_cleared")

    # 5. Paying off the debt reactivates the account with no subscriptions.
    admin.topup(account_id, "1.00")
    active = admin.account(account_id)
    assert active["state"] == "active"
    assert active["period"] is None
    assert active["arrears_since"] is None
    assert active["subscriptions"] == []
    status, answer = await _call(gw, key, "m", max_tokens=2)
    assert (status, _code(answer)) == (403, "model_not_subscribed")

    # 6. Subscribe again: calls work.
    admin.subscribe(account_id, "m")
    status, answer = await _call(gw, key, "m", max_tokens=2)
    assert status == 200, answer
    assert micros(admin.account(account_id)["balance"]) == micros(debt) + micros("1.00") - micros(
        admin.usage(account_id)[-1]["cost"]
    )


async def test_topup_during_grace_unfreezes_with_subscriptions(arrears_gateway: Proc) -> None:
    """A top-up to zero or above while frozen makes the account active again, subscriptions
    kept; a top-up that leaves it below zero does not."""
    gw = arrears_gateway
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="0.020000")
    assert (await _call(gw, key, "m"))[0] == 200
    _settled(admin, account_id)
    frozen = admin.account(account_id)
    assert frozen["state"] == "frozen"
    debt = -micros(frozen["balance"])
    # One micro-unit short of the debt: still frozen.
    short = debt - 1
    admin.topup(account_id, f"{short // 1_000_000}.{short % 1_000_000:06d}")
    assert admin.account(account_id)["state"] == "frozen"
    admin.topup(account_id, "0.000001")
    account = admin.account(account_id)
    assert account["balance"] == "0.000000"
    assert account["state"] == "active"
    assert account["subscriptions"] == ["m"]
    assert (await _call(gw, key, "m", max_tokens=1))[0] in (200, 402)


async def test_dedicated_model_is_metered_at_zero_cost(arrears_gateway: Proc) -> None:
    """A dedicated model needs no balance and records usage at cost zero."""
    admin = Admin(arrears_gateway.url)
    account_id, key = admin.funded(["pool"], amount="")
    status, answer = await _call(arrears_gateway, key, "pool", max_tokens=5)
    assert status == 200, answer
    (record,) = admin.usage(account_id)
    assert record["cost"] == "0.000000"
    assert record["completion_tokens"] == 5
    assert record["prompt_tokens"] == answer["usage"]["prompt_tokens"]
    assert admin.account(account_id)["balance"] == "0.000000"
