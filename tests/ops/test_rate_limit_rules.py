"""Multi-limit strings ("2/second;5/minute"): every rule enforced by the admission script.

The script-level tests drive `Ledger.reserve` / `Ledger.settle` on the session's real store
with chosen admission times, so window boundaries are exact; tests/ops/test_rate_limits.py
has the same behaviour end to end through a gateway. The parsing tests cover the bounds every
rule is held to (config load and the admin API share `check_rate_limit`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from gateway.config import ConfigError, parse_settings
from gateway.config.types import LimitRule, check_rate_limit, parse_rate_limit
from gateway.ledger import Admission, KeyLimits, Ledger, Reservation, TokenCharge
from gateway.ledger.keys import account_keys
from gateway.ratelimit import rule_spec
from gateway.store.embedded import EmbeddedStore

MODEL = "m"
T0 = 1_800_000_000_000  # ms; a multiple of every window used here (1 s, 10 s, 60 s)
NO_RULE = ("", "", "", "")


# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["2/second;5/minute", "5/minute;2/second", "2/second,5/minute", "5/minute | 2/second"]
)
def test_every_rule_of_a_limit_string_is_kept(text: str) -> None:
    """`;`, `,` and `|` separate rules (as in `limits.parse_many`); the order does not matter."""
    assert check_rate_limit(text) == text
    assert parse_rate_limit(text) == (LimitRule(2, 1), LimitRule(5, 60))
    assert rule_spec(text) == "2:1000,5:60000"


def test_one_window_named_twice_keeps_the_tightest() -> None:
    assert rule_spec("10/second;60/minute;3/1second;50/60seconds") == "3:1000,50:60000"
    assert rule_spec("3/2seconds;4/10seconds") == "3:2000,4:10000"
    assert rule_spec("600/minute") == "600:60000"
    assert rule_spec(None) == rule_spec("") == ""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0/minute", "'0/minute': a limit is at least 1 (call or token) per window"),
        ("2/second;0/minute", "'0/minute' in '2/second;0/minute': a limit is at least 1"),
        ("1/0seconds", "'1/0seconds': a window is at least 1 second"),
        ("1/2years", "'1/2years': a window is at most 1 year"),
        ("1000000000000001/day", "'1000000000000001/day': a limit is at most 1000000000000000"),
        ("lots", "expected a rate limit string such as '600/minute'"),
        ("2/second;", "expected a rate limit string such as '600/minute'"),
        ("", "expected a rate limit string such as '600/minute'"),
    ],
)
def test_a_limit_out_of_bounds_is_refused_with_a_clear_message(text: str, message: str) -> None:
    """Every rule allows at least 1 per window (a zero limit is refused, not stored), over a
    window of 1 second to 1 year; the message names the rule and the string."""
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_rate_limit(text)


def test_the_largest_rule_allowed_is_accepted() -> None:
    assert rule_spec("1000000000000000/year") == f"{10**15}:{360 * 86400 * 1000}"
    assert rule_spec("1/1second") == "1:1000"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rate_limits": {"requests": "0/minute"}}, "rate_limits.requests: '0/minute': a limit"),
        (
            {"rate_limits": {"tokens": "1000/second;0/minute"}},
            "rate_limits.tokens: '0/minute' in '1000/second;0/minute': a limit is at least 1",
        ),
        (
            {
                "models": [
                    {
                        "name": "m",
                        "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
                        "upstreams": [{"url": "http://127.0.0.1:9000/v1"}],
                        "rate_limits": {"requests": "5/0minutes"},
                    }
                ]
            },
            "models[0].rate_limits.requests: '5/0minutes': a window is at least 1 second",
        ),
    ],
)
def test_the_config_loader_refuses_a_zero_limit_at_its_path(
    data: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems


# --- the admission script ------------------------------------------------------------------


@pytest.fixture
async def ledger(valkey: EmbeddedStore) -> AsyncIterator[Ledger]:
    client = aioredis.Redis.from_url(valkey.url)
    yield Ledger(client)
    await client.aclose()


class Caller:
    """One account of its own, subscribed to MODEL, calling through the ledger at chosen
    times; each admitted hold is released at the end (no sweeper ever sees it)."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.account_id = "acct-" + uuid.uuid4().hex[:12]
        self.admitted: list[str] = []

    async def setup(self) -> Caller:
        await self.ledger.create_account(self.account_id, "", 0)
        assert await self.ledger.subscribe(self.account_id, MODEL) == "created"
        await self.ledger.write_key(self.account_id, "k1", b"{}", KeyLimits(), "h1")
        return self

    async def call(
        self, at_ms: int, rules: Sequence[str], tokens: int = 10, request_id: str = ""
    ) -> Admission:
        request_id = request_id or "req_" + uuid.uuid4().hex
        lease = int(time.time() * 1000) + 600_000
        admission = await self.ledger.reserve(
            Reservation(
                self.account_id, "k1", "h1", MODEL, 0, request_id, lease, False, "", at_ms, tokens,
                tuple(rules),
            )
        )  # fmt: skip
        if admission.code == "ok":
            self.admitted.append(request_id)
        return admission

    async def settle(self, request_id: str, admission: Admission, actual_tokens: int) -> None:
        record = {"request_id": request_id, "kind": "inference", "cost": 0}
        result = await self.ledger.settle(
            self.account_id, request_id, 0, T0, record, False, admission.charge, actual_tokens
        )
        assert result.code == "ok"
        self.admitted.remove(request_id)

    async def close(self) -> None:
        for request_id in self.admitted:
            await self.ledger.release(self.account_id, request_id)


@pytest.fixture
async def caller(ledger: Ledger) -> AsyncIterator[Caller]:
    one = await Caller(ledger).setup()
    yield one
    await one.close()


def _requests(spec: str, model_spec: str = "") -> tuple[str, str, str, str]:
    return (spec, "", model_spec, "")


@pytest.mark.parametrize("spec", ["2:1000,5:60000", "5:60000,2:1000"])
async def test_every_rule_refuses_at_admission(caller: Caller, spec: str) -> None:
    """'2/second;5/minute' (in either order): a third call in one second is refused by the
    per-second rule; spaced out over more than a second, the sixth in the minute is refused
    by the per-minute rule alone. A refused call charges no rule."""
    rules = _requests(spec)
    codes = [(await caller.call(T0 + dt, rules)).code for dt in (0, 10)]
    third = await caller.call(T0 + 20, rules)
    assert codes == ["ok", "ok"]
    assert third.code == "rate_limited"
    assert third.refused == "requests (2 per 1s)"
    assert third.retry_after_ms > 0
    assert third.rate[:2] == ("2", "0")
    # One call per 1.1 s passes the per-second rule; the minute's fifth call is its last.
    for n, dt in enumerate((1_500, 2_600, 3_700)):
        admission = await caller.call(T0 + dt, rules)
        assert admission.code == "ok", (n, admission)
    sixth = await caller.call(T0 + 4_800, rules)
    assert sixth.code == "rate_limited"
    assert sixth.refused == "requests (5 per 60s)"
    # 55.2 s to the minute's end, then the sliding window still weighs 5 calls until 4 fit.
    assert 55_200 + 12_000 <= sixth.retry_after_ms <= 55_200 + 12_001
    assert sixth.rate[:2] == ("5", "0")


async def test_a_refusal_by_one_rule_charges_none(
    caller: Caller, redis_client: redis.Redis
) -> None:
    rules = _requests("1:1000,100:60000", "100:60000")
    assert (await caller.call(T0, rules)).code == "ok"
    for dt in (100, 200, 300):
        assert (await caller.call(T0 + dt, rules)).code == "rate_limited"
    k = account_keys(caller.account_id)
    assert redis_client.hget(k.rate("requests"), "60000:c") == b"1"
    assert redis_client.hget(k.rate("requests", MODEL), "c") == b"1"  # a one-rule limit


async def test_account_and_model_rules_apply_together(caller: Caller) -> None:
    """The account's and the model's rules are all checked; the 429 names each that refused,
    the model's with the model's name, and the headers show the tightest of them all."""
    rules = _requests("2:1000,4:60000", "2:1000,3:60000")
    assert [(await caller.call(T0 + dt, rules)).code for dt in (0, 1)] == ["ok", "ok"]
    third = await caller.call(T0 + 2, rules)
    assert third.refused == "requests (2 per 1s), requests to model m (2 per 1s)"
    fourth = await caller.call(T0 + 1_600, rules)
    assert fourth.code == "ok"
    # left after it: 1 of the account's 2/s and its 4/minute, 1 of the model's 2/s, 0 of
    # its 3/minute, which resets in 58.4 s
    assert fourth.rate[:3] == ("3", "0", "58400")
    fifth = await caller.call(T0 + 1_601, rules)
    assert fifth.refused == "requests to model m (3 per 60s)"


@pytest.mark.parametrize(
    ("account", "model", "expected"),
    [
        # the least remaining after the call wins, whichever limit it belongs to
        ("10:1000", "3:60000", ("3", "2", "60000")),
        ("3:60000,10:1000", "", ("3", "2", "60000")),
        ("2:1000,100:60000", "50:60000", ("2", "1", "1000")),
        # a tie: the rule whose window resets later
        ("2:1000", "2:60000", ("2", "1", "60000")),
        ("2:60000,2:1000", "", ("2", "1", "60000")),
        ("", "", ("", "", "")),
    ],
)
async def test_headers_describe_the_tightest_rule(
    caller: Caller, account: str, model: str, expected: tuple[str, str, str]
) -> None:
    admission = await caller.call(T0, _requests(account, model))
    assert admission.code == "ok"
    assert admission.rate[:3] == expected
    assert admission.rate[3:] == ("", "", "")


async def test_the_accounts_own_multi_limit_replaces_the_default(caller: Caller) -> None:
    """An override stored through the admin API ("2/second;5/minute") holds every rule."""
    text = "5/minute;2/second"
    await caller.ledger.set_rate_limits(caller.account_id, text, "", (rule_spec(text), ""))
    rules = _requests(rule_spec("100/second"))
    codes = [(await caller.call(T0 + dt, rules)).code for dt in (0, 1, 2)]
    assert codes == ["ok", "ok", "rate_limited"]
    for dt in (1_500, 2_600, 3_700):
        assert (await caller.call(T0 + dt, rules)).code == "ok"
    sixth = await caller.call(T0 + 4_800, rules)
    assert (sixth.code, sixth.refused) == ("rate_limited", "requests (5 per 60s)")


def _counts(client: redis.Redis, key: str) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in client.hgetall(key).items()}


async def test_settlement_corrects_every_token_rule(
    caller: Caller, redis_client: redis.Redis
) -> None:
    """The token charge (the estimate) is corrected to what the call used in every window
    it landed in: the current one's count, or the previous one's once the window moved on.
    (The model's limit has one rule: its counter keeps the one-rule fields `w`, `c`, `p`.)"""
    rules = ("", "400:1000,450:10000,500:60000", "", "300:10000")
    k = account_keys(caller.account_id)
    first_id, second_id = "req_" + uuid.uuid4().hex, "req_" + uuid.uuid4().hex
    first = await caller.call(T0 + 100, rules, tokens=200, request_id=first_id)
    assert first.code == "ok"
    assert first.charge is not None
    assert first.charge.windows == (
        f"1000:{(T0 + 100) // 1000},10000:{T0 // 10000},60000:{T0 // 60000}",
        f"{T0 // 10000}",
        "",
    )
    # A second call one second later moves the 1 s window on: the first charge is its `p`.
    second = await caller.call(T0 + 1_100, rules, tokens=50, request_id=second_id)
    assert second.code == "ok"
    await caller.settle(first_id, first, actual_tokens=20)
    account = _counts(redis_client, k.rate("tokens"))
    assert account["1000:p"] == 20  # 200 corrected to 20 in the window it landed in
    assert account["1000:c"] == 50
    assert account["10000:c"] == account["60000:c"] == 70
    assert _counts(redis_client, k.rate("tokens", MODEL))["c"] == 70
    # Used more than estimated: the difference is added.
    await caller.settle(second_id, second, actual_tokens=80)
    assert _counts(redis_client, k.rate("tokens"))["60000:c"] == 100
    assert _counts(redis_client, k.rate("tokens", MODEL))["c"] == 100
    # The model's 300/10 s has 200 left (not 200 - 180 - 30), and no more.
    assert (await caller.call(T0 + 1_200, rules, tokens=200)).code == "ok"
    assert (await caller.call(T0 + 1_300, rules, tokens=1)).refused == (
        "tokens to model m (300 per 10s)"
    )


async def test_a_one_rule_limit_keeps_the_earlier_format(
    caller: Caller, redis_client: redis.Redis
) -> None:
    """A limit of one rule counts in the fields gateways of the earlier version read and
    write (`w`, `c`, `p`), and a charge's settlement marker is still the bare window index: in
    a rolling upgrade both versions share these counters, and a call admitted by either is
    corrected by the other. An account spec the earlier version stored ('2:1000') applies."""
    k = account_keys(caller.account_id)
    idx = T0 // 1000
    # The earlier version charged one request and 100 tokens in this window.
    redis_client.hset(k.rate("requests"), mapping={"w": idx, "c": 1, "p": 0})
    redis_client.hset(k.rate("tokens"), mapping={"w": idx, "c": 100, "p": 0})
    redis_client.hset(k.account, mapping={"rl_requests": "2/second", "rl_requests_spec": "2:1000"})
    rules = ("100:60000", "1000:1000", "", "")
    admission = await caller.call(T0 + 5, rules, tokens=100)
    assert admission.code == "ok"
    assert admission.rate == ("2", "0", "995", "1000", "800", "995")
    assert admission.charge == TokenCharge(MODEL, 100, (str(idx), "", ""))
    # The earlier version's call settles here with its marker: 100 estimated, 10 used.
    earlier = "req_" + uuid.uuid4().hex
    caller.admitted.append(earlier)
    await caller.settle(
        earlier, Admission("ok", charge=TokenCharge(MODEL, 100, (str(idx), "", ""))), 10
    )
    assert _counts(redis_client, k.rate("tokens")) == {"w": idx, "c": 110, "p": 0}
    assert (await caller.call(T0 + 6, rules)).refused == "requests (2 per 1s)"


async def test_a_multi_rule_limit_ignores_the_one_rule_fields(
    caller: Caller, redis_client: redis.Redis
) -> None:
    """One-rule counts (an earlier version's, or from before the limit gained a rule) are
    not read as any rule's of a multi-rule limit; a bare-index marker (a charge to a one-rule
    limit) corrects the one-rule fields it landed in, none of the multi-rule limit's."""
    k = account_keys(caller.account_id)
    idx = T0 // 1000
    for kind in ("requests", "tokens"):
        redis_client.hset(k.rate(kind), mapping={"w": idx, "c": 999_999, "p": 999_999})
    rules = ("2:1000,100:60000", "1000:1000,5000:60000", "", "")
    request_id = "req_" + uuid.uuid4().hex
    admission = await caller.call(T0, rules, tokens=100, request_id=request_id)
    assert admission.code == "ok"
    assert admission.rate == ("2", "1", "1000", "1000", "900", "1000")
    stale = Admission("ok", charge=TokenCharge(MODEL, 100, (str(idx), "", "")))
    await caller.settle(request_id, stale, actual_tokens=10)
    assert _counts(redis_client, k.rate("tokens")) == {
        **{"w": idx, "c": 999_999 - 90, "p": 999_999},
        **{"1000:w": idx, "1000:c": 100, "1000:p": 0},
        **{"60000:w": T0 // 60000, "60000:c": 100, "60000:p": 0},
    }
    assert (await caller.call(T0 + 1, rules)).code == "ok"
    assert (await caller.call(T0 + 2, rules)).refused == "requests (2 per 1s)"


async def test_a_resent_admission_charges_no_rule_twice(
    caller: Caller, redis_client: redis.Redis
) -> None:
    rules = ("2:1000,5:60000", "1000:1000,5000:60000", "", "")
    request_id = "req_" + uuid.uuid4().hex
    first = await caller.call(T0, rules, tokens=30, request_id=request_id)
    again = await caller.call(T0, rules, tokens=30, request_id=request_id)
    assert again.code == "ok"
    assert (again.rate, again.charge) == (first.rate, first.charge)
    caller.admitted.remove(request_id)
    k = account_keys(caller.account_id)
    assert _counts(redis_client, k.rate("requests"))["1000:c"] == 1
    assert _counts(redis_client, k.rate("tokens"))["60000:c"] == 30


async def test_counter_hash_lives_twice_its_longest_window(
    caller: Caller, redis_client: redis.Redis
) -> None:
    assert (await caller.call(T0, _requests("2:1000,5:60000"))).code == "ok"
    ttl = redis_client.pttl(account_keys(caller.account_id).rate("requests"))
    assert 110_000 < ttl <= 120_000
