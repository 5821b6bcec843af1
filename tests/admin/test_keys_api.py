"""The admin API of keys' settings: what POST, PATCH, GET and rotate take and show (issue 17).

Bad input is a 400 in OpenAI's error shape naming the field, and changes nothing; a key's
spend and holds are shown for its current period, whose bounds are checked against Python's
own calendar.
"""

from __future__ import annotations

import asyncio
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import orjson
import pytest

from tests.admin_client import Admin
from tests.billing.checks import micros
from tests.procs import Proc


def _keys_path(account_id: str, key: str | None = None) -> str:
    path = f"/admin/accounts/{account_id}/keys"
    return path if key is None else f"{path}/{key.split('.')[1]}"


def _bad(reply: Any, param: str) -> str:
    assert reply.status == 400, (reply.status, reply.body)
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["param"] == param, error
    return str(error["message"])


def test_a_key_is_created_with_its_settings_and_shown_with_its_spend(admin: Admin) -> None:
    """POST takes every setting and answers them normalized with the secret; GET shows them
    (never the secret) with the spend of the current day, which starts at UTC midnight."""
    account_id, _ = admin.funded(["mock-model"], amount="5.00")
    settings = {
        "name": "ci job",
        "budget": {"amount": "2.5", "period": "day"},
        "expires_at": "2031-05-06T07:08:09+02:00",
        "models": ["mock-model", "mapped"],
        "rate_limits": {"requests": "10/second;600/minute", "tokens": None},
    }
    created = admin.ok("POST", _keys_path(account_id), settings)
    assert created["key"].startswith(created["prefix"] + ".")
    assert created["name"] == "ci job"
    assert created["budget"] == {"amount": "2.500000", "period": "day"}
    assert created["expires_at"] == "2031-05-06T05:08:09.000Z"
    assert created["models"] == ["mock-model", "mapped"]
    assert created["rate_limits"] == {"requests": "10/second;600/minute", "tokens": None}

    shown = admin.key(account_id, created["key"])
    assert "key" not in shown
    assert {k: shown[k] for k in settings} == {k: created[k] for k in settings}
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    spend = shown["spend"]
    assert spend["spent"] == spend["held"] == spend["spent_total"] == "0.000000"
    assert spend["remaining"] == "2.500000"
    assert spend["period_start"] == today.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    tomorrow = today + timedelta(days=1)
    assert spend["period_end"] == tomorrow.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    listed = admin.ok("GET", _keys_path(account_id))["data"]
    assert [k for k in listed if k["id"] == created["id"]] == [shown]


def test_a_key_without_settings_has_none(admin: Admin) -> None:
    """A POST without a body makes a key as before: no budget (its spend over its life is
    shown, with nothing remaining to count down), no expiry, every model, no own limits."""
    account_id, key = admin.funded(["mock-model"], amount="5.00")
    shown = admin.key(account_id, key)
    assert shown["name"] == ""
    assert shown["budget"] is None
    assert shown["expires_at"] is None
    assert shown["models"] is None
    assert shown["rate_limits"] is None
    assert shown["spend"]["remaining"] is None
    assert shown["spend"]["period_start"] is None
    assert shown["spend"]["period_end"] is None


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"budget": {"amount": "abc"}}, "budget.amount"),
        ({"budget": {"amount": "-1"}}, "budget.amount"),
        ({"budget": {"amount": 5}}, "budget.amount"),
        ({"budget": {"amount": "1.0000001"}}, "budget.amount"),
        ({"budget": {"amount": "1", "period": "fortnight"}}, "budget.period"),
        ({"budget": {"amount": "1", "period": "0s"}}, "budget.period"),
        ({"budget": {"amount": "1", "period": "500d"}}, "budget.period"),
        ({"budget": {"period": "day"}}, "budget.amount"),
        ({"budget": {"amount": "1", "reset": "day"}}, "budget.reset"),
        ({"expires_at": "tomorrow"}, "expires_at"),
        ({"models": []}, "models"),
        ({"models": ["no-such-model"]}, "models"),
        ({"models": ["two words"]}, "models"),
        ({"rate_limits": {"requests": "lots"}}, "rate_limits.requests"),
        ({"rate_limits": {"seconds": "1/second"}}, "rate_limits.seconds"),
        ({"name": 7}, "name"),
        ({"name": "tab\there"}, "name"),
        ({"owner": "me"}, "owner"),
    ],
)
def test_bad_key_settings_are_refused_and_change_nothing(
    admin: Admin, body: dict[str, Any], param: str
) -> None:
    """Each bad setting is 400 naming it, on POST (no key made) and on PATCH (the key is as
    it was)."""
    account_id, key = admin.funded(["mock-model"], amount="5.00")
    before = admin.ok("GET", _keys_path(account_id))
    _bad(admin.call("POST", _keys_path(account_id), body), param)
    _bad(admin.call("PATCH", _keys_path(account_id, key), body), param)
    assert admin.ok("GET", _keys_path(account_id)) == before


def test_patch_replaces_what_it_names_and_clears_with_null(admin: Admin) -> None:
    """PATCH changes only the fields it names; null clears one; a key that does not exist is
    404, a revoked one 409 `key_revoked`; the gateway's own fields cannot be set."""
    account_id, _ = admin.funded(["mock-model"], amount="5.00")
    key = admin.new_key(
        account_id, name="a", budget={"amount": "1"}, rate_limits={"requests": "5/minute"}
    )
    changed = admin.ok(
        "PATCH", _keys_path(account_id, key), {"budget": {"amount": "3", "period": "month"}}
    )
    assert changed["name"] == "a"
    assert changed["budget"] == {"amount": "3.000000", "period": "month"}
    assert changed["rate_limits"] == {"requests": "5/minute", "tokens": None}
    month = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    assert changed["spend"]["period_start"] == month.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    cleared = admin.ok("PATCH", _keys_path(account_id, key), {"budget": None, "rate_limits": None})
    assert cleared["budget"] is None
    assert cleared["rate_limits"] is None
    assert cleared["spend"]["remaining"] is None
    assert admin.key(account_id, key) == cleared
    _bad(admin.call("PATCH", _keys_path(account_id, key), {"id": "key_x"}), "id")
    _bad(admin.call("PATCH", _keys_path(account_id, key), {"created_at": None}), "created_at")
    missing = admin.call("PATCH", f"{_keys_path(account_id)}/key_000000000000", {"name": "b"})
    assert missing.status == 404
    admin.ok("DELETE", _keys_path(account_id, key))
    revoked = admin.call("PATCH", _keys_path(account_id, key), {"name": "b"})
    assert revoked.status == 409
    assert revoked.json()["error"]["code"] == "key_revoked"
    assert admin.key(account_id, key)["name"] == "a"


@pytest.mark.parametrize(
    ("body", "param"),
    [({"grace": "45d"}, "grace"), ({"grace": "soon"}, "grace"), ({"after": "1h"}, "after")],
)
def test_bad_rotations_are_refused(admin: Admin, body: dict[str, Any], param: str) -> None:
    """A grace past 30 days or not a duration, or an unknown field, is 400; the key keeps its
    secret."""
    account_id, key = admin.funded(["mock-model"], amount="5.00")
    _bad(admin.call("POST", _keys_path(account_id, key) + "/rotate", body), param)
    assert admin.key(account_id, key).get("rotated_at") is None
    missing = admin.call("POST", f"{_keys_path(account_id)}/key_000000000000/rotate")
    assert missing.status == 404


def test_get_shows_the_holds_of_calls_in_flight(gateway: Proc, admin: Admin) -> None:
    """While a call runs, its hold is the key's `held`, and `remaining` is the budget less it;
    once settled, the cost is `spent` and nothing is held."""
    account_id, _ = admin.funded(["mock-model"], amount="5.00")
    key = admin.new_key(account_id, budget={"amount": "1.00"})
    started = threading.Event()

    async def slow_call() -> None:
        async with aiohttp.ClientSession() as session:
            started.set()
            body = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}]}
            async with session.post(
                gateway.url + "/v1/chat/completions",
                data=orjson.dumps(body),
                headers={"Authorization": f"Bearer {key}", "x-mock-ttft": "1.5"},
            ) as resp:
                assert resp.status == 200
                await resp.read()

    caller = threading.Thread(target=lambda: asyncio.run(slow_call()))
    caller.start()
    started.wait(5)
    seen: dict[str, Any] = {}
    for _ in range(100):
        seen = admin.key(account_id, key)["spend"]
        if seen["held"] != "0.000000":
            break
        threading.Event().wait(0.02)
    caller.join(10)
    held = micros(seen["held"])
    assert held > 0
    assert micros(seen["remaining"]) == 1_000_000 - held
    for _ in range(100):
        after = admin.key(account_id, key)["spend"]
        if after["held"] == "0.000000" and after["spent"] != "0.000000":
            break
        threading.Event().wait(0.05)
    (record,) = admin.usage(account_id)
    assert after["spent"] == record["cost"]
    assert micros(after["remaining"]) == 1_000_000 - micros(record["cost"])
