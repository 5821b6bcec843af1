"""Rate limits: 429 with Retry-After, OpenAI's x-ratelimit-* headers, shared across instances."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.procs import Proc

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def _post(gw: Proc, key: str, body: dict[str, Any]) -> tuple[int, dict[str, str], Any]:
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


@pytest.fixture
def limited(make_gateway: Callable[..., Proc], mock_a: Proc) -> Callable[..., Proc]:
    def make(**sections: Any) -> Proc:
        return make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")], **sections)

    return make


async def test_requests_limit_gives_429_with_headers(limited: Callable[..., Proc]) -> None:
    """With 3 requests per minute, the 4th call is 429 rate_limit_exceeded with Retry-After;
    every answer carries x-ratelimit-limit/remaining/reset for requests and tokens.

    The limit is a sliding-window counter: the previous minute's count weighs in by the share
    of it still inside the sliding minute, so when the calls straddle a minute boundary the
    wait can pass one minute (never two)."""
    gw = limited(rate_limits={"requests": "3/minute", "tokens": "100000/minute"})
    _, key = Admin(gw.url).funded(["m"])
    remaining = []
    for _ in range(3):
        status, headers, _ = await _post(gw, key, CHAT)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "3"
        assert headers["x-ratelimit-limit-tokens"] == "100000"
        assert headers["x-ratelimit-reset-requests"].endswith("s")
        remaining.append(int(headers["x-ratelimit-remaining-requests"]))
    assert remaining == [2, 1, 0]
    status, headers, answer = await _post(gw, key, CHAT)
    assert status == 429
    assert answer["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(headers["Retry-After"]) <= 120
    assert headers["x-ratelimit-remaining-requests"] == "0"


async def test_refused_call_holds_nothing_and_costs_nothing(limited: Callable[..., Proc]) -> None:
    """A call refused by a rate limit leaves no hold and no usage record."""
    gw = limited(rate_limits={"requests": "1/minute"})
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="1.00")
    assert (await _post(gw, key, CHAT))[0] == 200
    assert (await _post(gw, key, CHAT))[0] == 429
    account = admin.account(account_id)
    assert account["held"] == "0.000000"
    assert len(admin.usage(account_id)) == 1


async def test_token_limit_counts_the_estimate(limited: Callable[..., Proc]) -> None:
    """Admission charges tokens at the hold estimate (prompt + max_tokens): a call whose
    estimate does not fit in what is left is 429, and its refused charge is given back."""
    gw = limited(rate_limits={"requests": "1000/minute", "tokens": "300/minute"})
    _, key = Admin(gw.url).funded(["m"])
    big = {**CHAT, "max_tokens": 240}
    status, headers, answer = await _post(gw, key, big)
    assert status == 200
    estimate = answer["usage"]["prompt_tokens"] + 240
    assert answer["usage"]["completion_tokens"] == 240  # used all it asked: no correction
    assert int(headers["x-ratelimit-remaining-tokens"]) == 300 - estimate
    status, _, answer = await _post(gw, key, big)
    assert status == 429
    assert answer["error"]["code"] == "rate_limit_exceeded"
    # The refused estimate was refunded: a small call still fits in what is left.
    status, headers, answer = await _post(gw, key, {**CHAT, "max_tokens": 2})
    assert status == 200
    small = answer["usage"]["prompt_tokens"] + 2
    assert int(headers["x-ratelimit-remaining-tokens"]) == 300 - estimate - small


async def test_stream_cut_short_refunds_unused_tokens(limited: Callable[..., Proc]) -> None:
    """A stream that ends after 3 of 200 tokens is corrected down to what it used, so the
    next call sees the refund in x-ratelimit-remaining-tokens."""
    gw = limited(rate_limits={"requests": "1000/minute", "tokens": "100000/minute"})
    _, key = Admin(gw.url).funded(["m"])
    body = {**CHAT, "max_tokens": 200, "stream": True}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"x-mock-disconnect-after": "3"},
        ) as resp,
    ):
        after_first = int(resp.headers["x-ratelimit-remaining-tokens"])
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    status, headers, answer = await _post(gw, key, {**CHAT, "max_tokens": 1})
    assert status == 200
    second_estimate = answer["usage"]["prompt_tokens"] + 1
    remaining = int(headers["x-ratelimit-remaining-tokens"])
    # Had the first call kept its 200-token estimate, remaining would be after_first minus
    # the second estimate; the correction gave back most of the 200.
    assert remaining > after_first - second_estimate + 150


async def test_account_override_through_the_admin_api(limited: Callable[..., Proc]) -> None:
    """PUT /admin/accounts/{id}/rate_limits gives one account its own limit; null restores
    the configured default."""
    gw = limited(rate_limits={"requests": "100/minute"})
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"])
    reply = admin.call(
        "PUT", f"/admin/accounts/{account_id}/rate_limits", {"requests": "2/minute", "tokens": None}
    )
    assert reply.status == 200, reply.body
    assert reply.json()["effective"]["requests"] == "2/minute"
    statuses = [(await _post(gw, key, CHAT))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    admin.ok("PUT", f"/admin/accounts/{account_id}/rate_limits", {"requests": None})
    status, headers, _ = await _post(gw, key, CHAT)
    assert status == 200
    assert headers["x-ratelimit-limit-requests"] == "100"
    bad = admin.call("PUT", f"/admin/accounts/{account_id}/rate_limits", {"requests": "lots"})
    assert bad.status == 400
    assert bad.json()["error"]["param"] == "requests"


async def test_model_limit_applies_per_account_and_model(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A model's own `rate_limits` block limits each account's calls to that model, apart
    from its other models."""
    limited_model = model_entry("m", mock_a.url, upstream_model="mock-model")
    limited_model["rate_limits"] = {"requests": "2/minute"}
    free_model = model_entry("free", mock_a.url, upstream_model="mock-model")
    gw = make_gateway([limited_model, free_model])
    admin = Admin(gw.url)
    _, key_a = admin.funded(["m", "free"])
    _, key_b = admin.funded(["m"])
    assert [(await _post(gw, key_a, CHAT))[0] for _ in range(3)] == [200, 200, 429]
    assert (await _post(gw, key_a, {**CHAT, "model": "free"}))[0] == 200
    assert (await _post(gw, key_b, CHAT))[0] == 200


async def test_limits_hold_across_instances(limited: Callable[..., Proc]) -> None:
    """Two gateways on one store share the counters: 4 requests per minute in all."""
    sections = {"rate_limits": {"requests": "4/minute"}}
    first, second = limited(**sections), limited(**sections)
    _, key = Admin(first.url).funded(["m"])
    statuses = []
    for gw in (first, second, first, second, first, second):
        statuses.append((await _post(gw, key, CHAT))[0])
    assert statuses == [200, 200, 200, 200, 429, 429]


# --- multi-limit strings ("2/second;5/minute"): every rule enforced --------------------------


def _sleep_until_clear(window_s: int, needed_s: float) -> float:
    """How long to sleep so the next `needed_s` seconds start just past a whole second and
    stay inside one fixed `window_s` window (the counters' windows are aligned on the epoch):
    a sliding window counter straddling a boundary weighs the previous window's calls down
    (rounding down), which would let a test's burst through or hold a spaced call back."""
    now = time.time()
    start = math.floor(now) + 1.02
    if start % window_s + needed_s > window_s:
        start = (math.floor(start / window_s) + 1) * window_s + 0.02
    return start - now


async def _burst_then_spaced(
    gw: Proc, key: str, model: str
) -> list[tuple[int, dict[str, str], Any]]:
    """Three calls at once, then (past the second) four 0.6 s apart: under '2/second;5/minute'
    the third is refused by the per-second rule, the last (the minute's sixth) by the
    per-minute rule alone, though no second held more than two calls."""
    body = {**CHAT, "model": model}
    answers = [await _post(gw, key, body) for _ in range(3)]
    await asyncio.sleep(1.0)
    for _ in range(4):
        answers.append(await _post(gw, key, body))
        await asyncio.sleep(0.6)
    return answers


def _check_both_rules(answers: list[tuple[int, dict[str, str], Any]], label: str) -> None:
    assert [status for status, _, _ in answers] == [200, 200, 429, 200, 200, 200, 429]
    shown = [
        (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"])
        for _, h, _ in answers
    ]
    # The tightest rule each time: the one with the least left, 2/s until the minute's fifth
    # call leaves both rules at 0, then the one resetting later, the minute's (the refusals
    # charge nothing: the sixth leaves the per-second rule 1).
    assert shown == [
        ("2", "1"),
        ("2", "0"),
        ("2", "0"),
        ("2", "0"),
        ("2", "0"),
        ("5", "0"),
        ("5", "0"),
    ]
    per_second, per_minute = answers[2], answers[6]
    message = per_second[2]["error"]["message"]
    assert f"{label} (2 per 1s)" in message
    assert "per 60s" not in message
    assert per_second[1]["Retry-After"] in ("1", "2")  # a second's end, then half of the next
    message = per_minute[2]["error"]["message"]
    assert f"{label} (5 per 60s)" in message
    assert "per 1s" not in message
    assert int(per_minute[1]["Retry-After"]) > 2
    assert per_minute[2]["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("default", "own"),
    [("2/second;5/minute", "5/minute;2/second"), ("5/minute;2/second", "2/second;5/minute")],
)
async def test_every_rule_of_a_multi_limit_is_enforced(
    make_gateway: Callable[..., Proc], mock_a: Proc, default: str, own: str
) -> None:
    """Issue 12: a multi-limit string enforced only its first rule. Now, wherever it is
    configured (the config's default, a model's own `rate_limits`, an account's own limit
    through the admin API), a burst is refused by the per-second rule and calls spaced out
    over more than a second by the per-minute rule; the headers show the tightest rule."""
    plain = model_entry("m", mock_a.url, upstream_model="mock-model")
    limited_model = model_entry("mm", mock_a.url, upstream_model="mock-model")
    limited_model["rate_limits"] = {"requests": own}
    gw = make_gateway([plain, limited_model], rate_limits={"requests": default})
    admin = Admin(gw.url)
    _, by_default = admin.funded(["m"])
    overridden, by_override = admin.funded(["m"])
    reply = admin.call("PUT", f"/admin/accounts/{overridden}/rate_limits", {"requests": own})
    assert reply.status == 200, reply.body
    assert reply.json()["effective"]["requests"] == own
    by_model_id, by_model = admin.funded(["mm"])
    # This account's own limit is generous: only the model's rules bind it.
    admin.ok("PUT", f"/admin/accounts/{by_model_id}/rate_limits", {"requests": "1000/minute"})
    await asyncio.sleep(_sleep_until_clear(60, 5.0))
    results = await asyncio.gather(
        _burst_then_spaced(gw, by_default, "m"),
        _burst_then_spaced(gw, by_override, "m"),
        _burst_then_spaced(gw, by_model, "mm"),
    )
    _check_both_rules(results[0], "requests")
    _check_both_rules(results[1], "requests")
    _check_both_rules(results[2], "requests to model mm")


async def test_token_multi_limit_is_corrected_at_settlement(limited: Callable[..., Proc]) -> None:
    """Tokens are charged at the estimate to every rule and corrected to what the call used
    in each: a stream cut after 3 of 300 tokens gives the rest back to both the 10-second and
    the minute rule, so the next call fits both; the headers show the minute's, tighter."""
    gw = limited(rate_limits={"requests": "1000/minute", "tokens": "450/10seconds;400/minute"})
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"])
    await asyncio.sleep(_sleep_until_clear(10, 4.0))
    body = {**CHAT, "max_tokens": 300, "stream": True}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"x-mock-disconnect-after": "3"},
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["x-ratelimit-limit-tokens"] == "400"
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()
    deadline = time.monotonic() + 5
    while not (records := admin.usage(account_id)):
        assert time.monotonic() < deadline, "the cut stream was never settled"
        await asyncio.sleep(0.05)
    used = int(records[0]["prompt_tokens"]) + int(records[0]["completion_tokens"])
    assert used < 50
    # Uncorrected in either rule, the first call's ~310 and this one's ~350 would exceed it.
    status, headers, answer = await _post(gw, key, {**CHAT, "max_tokens": 340})
    assert status == 200, answer
    estimate = answer["usage"]["prompt_tokens"] + 340
    assert headers["x-ratelimit-limit-tokens"] == "400"
    assert int(headers["x-ratelimit-remaining-tokens"]) == 400 - used - estimate


async def test_a_zero_limit_is_refused_at_load(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """'0/minute' would refuse every call: the gateway does not start, and says where."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        wait=False,
        rate_limits={"requests": "600/minute;0/minute"},
    )
    assert gw.popen.wait(timeout=30) != 0
    assert (
        "rate_limits.requests: '0/minute' in '600/minute;0/minute': a limit is at least 1"
        in gw.log()
    )
