"""Ids and amounts as clients send them: one pattern for every id, amounts exactly as written.

An id is 1-64 ASCII letters, digits, '_' or '-' (accounts, API key ids, Idempotency-Keys);
an amount is a decimal string of ASCII digits with at most 6 decimals and nothing around it,
at most 1000000000.000000. Anything else is 400 `invalid_request` naming the param, and
changes nothing.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway.ledger.keys import account_keys
from tests.admin_client import Admin
from tests.procs import Proc

ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
AMOUNT = re.compile(r"[0-9]{1,10}(\.[0-9]{1,6})?")
MAX_BALANCE = "1000000000.000000"
_FUZZ = settings(
    max_examples=80,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
# Near-misses of an id: valid ones with something added, and text of any kind.
_ids = st.one_of(
    st.text(max_size=70),
    st.from_regex(ID, fullmatch=True).flatmap(
        lambda ok: st.sampled_from(
            ["\n", " ", "\t", "\r", ".", "{", "}", "\x00", "é", "\u0661"]
        ).map(lambda extra: ok + extra)
    ),
    st.from_regex(ID, fullmatch=True),
)
_amounts = st.one_of(
    st.text(alphabet="0123456789. +-_,e\n\t\u0661", max_size=20),
    st.from_regex(AMOUNT, fullmatch=True),
    st.from_regex(AMOUNT, fullmatch=True).map(lambda ok: " " + ok),
    st.from_regex(AMOUNT, fullmatch=True).map(lambda ok: ok + "\n"),
)


def _refused(reply: Any, param: str) -> None:
    assert reply.status == 400, (reply.status, reply.body)
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error", error
    assert error["param"] == param, error


@_FUZZ
@given(account_id=_ids)
@example("zz\n")
@example("zz ")
@example(" zz")
@example("z" * 65)
@example("\u0661\u0662")
def test_account_ids_match_the_one_pattern_or_are_refused(
    admin: Admin, redis_client: redis.Redis, account_id: str
) -> None:
    reply = admin.call("POST", "/admin/accounts", {"id": account_id})
    if ID.fullmatch(account_id) is None:
        _refused(reply, "id")
        assert not redis_client.exists(account_keys(account_id).account)
    else:
        assert reply.status in (201, 409), (reply.status, reply.body)


def test_zz_newline_is_not_a_second_account_and_keys_fit_in_a_header(admin: Admin) -> None:
    """The reported case: `zz\\n` made an account beside `zz` whose key held a newline."""
    base = "zz" + uuid.uuid4().hex[:8]
    admin.create_account(base)
    _refused(admin.call("POST", "/admin/accounts", {"id": base + "\n"}), "id")
    key = admin.new_key(base)
    assert ID.fullmatch(key.split(".")[0].removeprefix("sk-gw-"))
    assert key.isprintable()
    assert " " not in key


@pytest.fixture(scope="module")
def target(gateway: Proc) -> dict[str, Any]:
    admin = Admin(gateway.url)
    account_id = admin.create_account()
    return {"admin": admin, "account": account_id}


@_FUZZ
@given(amount=_amounts)
@example(" 1")
@example("1 ")
@example("1\n")
@example("+1")
@example("1e3")
@example("\uff11")
@example("0x10")
@example("1_000")
@example("1,5")
@example("1.")
@example(".5")
def test_amounts_are_exact_decimal_strings_or_refused(target: dict[str, Any], amount: str) -> None:
    admin: Admin = target["admin"]
    path = f"/admin/accounts/{target['account']}/topups"
    before = admin.account(target["account"])["balance"]
    reply = admin.call("POST", path, {"amount": amount}, headers={"Idempotency-Key": _key()})
    well_formed = AMOUNT.fullmatch(amount) is not None
    if not well_formed or _micros(amount) == 0:
        _refused(reply, "amount")
        assert admin.account(target["account"])["balance"] == before
        return
    assert reply.status in (201, 400), (reply.status, reply.body)
    if reply.status == 201:  # not above the maximum balance
        assert _micros(reply.json()["balance"]) == _micros(before) + _micros(amount)


@_FUZZ
@given(idem=st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80))
@example("idem key")
@example("a" * 65)
@example("")
@example("order:123")
def test_idempotency_keys_match_the_one_pattern_or_are_refused(
    target: dict[str, Any], idem: str
) -> None:
    admin: Admin = target["admin"]
    path = f"/admin/accounts/{target['account']}/topups"
    before = admin.account(target["account"])["balance"]
    reply = admin.call("POST", path, {"amount": "0.000001"}, headers={"Idempotency-Key": idem})
    # HTTP drops the spaces around a header's value; an empty key is refused too (a client
    # whose key variable was unset would believe itself protected against replays).
    if ID.fullmatch(idem.strip(" ")) is None:
        _refused(reply, "Idempotency-Key")
        assert admin.account(target["account"])["balance"] == before
    else:
        assert reply.status == 201, (reply.status, reply.body)


def test_largest_balances_are_answered_exactly(target: dict[str, Any]) -> None:
    """Amounts and balances above 2**53 micro-units are refused before any Lua arithmetic,
    and the balance a top-up answers is the stored one, to the micro-unit, up to the
    maximum."""
    admin: Admin = target["admin"]
    account_id = admin.create_account()
    path = f"/admin/accounts/{account_id}/topups"
    above_2_53 = "9007199254.740993"  # 2**53 + 1 micro-units
    _refused(admin.call("POST", path, {"amount": above_2_53}), "amount")
    first = admin.topup(account_id, "999999999.999999")
    assert first["balance"] == "999999999.999999"
    last = admin.topup(account_id, "0.000001")
    assert last["balance"] == MAX_BALANCE == admin.account(account_id)["balance"]
    over = admin.call("POST", path, {"amount": "0.000001"}, headers={"Idempotency-Key": _key()})
    assert over.status == 400
    assert over.json()["error"]["code"] == "balance_limit_exceeded"
    assert admin.account(account_id)["balance"] == MAX_BALANCE


@pytest.mark.parametrize(
    "key_id", ["key\n1", "key 1", "k{1}", "k" * 65, ""], ids=["nl", "sp", "brace", "65", "empty"]
)
def test_api_keys_with_an_id_off_the_pattern_are_401(gateway: Proc, key_id: str) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", int(gateway.url.rsplit(":", 1)[1]), timeout=10)
    token = f"sk-gw-acct1.{key_id}.secret".replace("\n", "%0A")
    conn.request(
        "POST",
        "/v1/chat/completions",
        body=b'{"model":"mock-model","messages":[]}',
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    reply = conn.getresponse()
    assert reply.status == 401
    conn.close()


def _key() -> str:
    return uuid.uuid4().hex


def _micros(amount: str) -> int:
    whole, _, frac = amount.partition(".")
    return int(whole) * 1_000_000 + int(frac.ljust(6, "0") or 0)


@pytest.mark.parametrize(
    ("requests", "tokens", "param"),
    [
        ("0/minute", None, "requests"),
        (None, "0/second", "tokens"),
        ("5/minute;0/second", None, "requests"),
        ("1/0seconds", None, "requests"),
        ("2/second; x", None, "requests"),
    ],
)
def test_account_limits_off_the_rules_are_400_and_change_nothing(
    target: dict[str, Any], requests: str | None, tokens: str | None, param: str
) -> None:
    """The admin API holds an account's limits to the config loader's own rules."""
    admin: Admin = target["admin"]
    path = f"/admin/accounts/{target['account']}/rate_limits"
    before = admin.ok("GET", path)
    _refused(admin.call("PUT", path, {"requests": requests, "tokens": tokens}), param)
    assert admin.ok("GET", path) == before
