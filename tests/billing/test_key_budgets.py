"""Keys with budgets, expiry, model lists and limits, enforced at admission (issue 17).

Every test runs real gateways on the real Valkey in front of the mock upstream. A key's budget
is checked in the admission script with the account's balance: its spend in the current
period plus its open holds plus the new hold may not pass it, at any concurrency, in strict
and in postpaid mode (where a budgeted key's calls are bounded by their holds).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import redis

from gateway.ledger.keys import account_keys
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, micros, records_by_request, wait_no_holds
from tests.conftest import model_entry
from tests.procs import Proc

# 1 micro-unit per input token, 2 per output token: a hold is prompt + 2 * output tokens.
PRICING = {"input_per_million": "1", "output_per_million": "2"}
OUTPUT = 10  # what a call names as max_tokens, and what is held for one that names none
MESSAGES = [{"role": "user", "content": "Tell me about the budgets of keys."}]


def _amount(value: int) -> str:
    return f"{value // 1_000_000}.{value % 1_000_000:06d}"


def _gateway(make_gateway: Callable[..., Proc], mock: Proc, enforcement: str = "postpaid") -> Proc:
    entry = model_entry("m", mock.url, upstream_model="mock-model")
    entry["pricing"] = PRICING
    other = model_entry("other", mock.url, upstream_model="mock-model")
    return make_gateway(
        [entry, other],
        billing={"hold_output_tokens": OUTPUT, "enforcement": enforcement},
        rate_limits={"requests": "100000/minute", "tokens": "100000000/minute"},
    )


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    payload: dict[str, Any],
    headers: dict[str, str] | None = None,
    path: str = "/v1/chat/completions",
) -> tuple[int, dict[str, str], bytes]:
    async with session.post(
        url + path,
        data=orjson.dumps(payload),
        headers={"Authorization": f"Bearer {key}", **(headers or {})},
    ) as resp:
        headers = {name.lower(): value for name, value in resp.headers.items()}
        return resp.status, headers, await resp.read()


def _call(url: str, key: str, model: str = "m", **extra: Any) -> tuple[int, dict[str, str], Any]:
    """One whole chat call; (status, headers, JSON body)."""

    async def go() -> tuple[int, dict[str, str], bytes]:
        async with aiohttp.ClientSession() as session:
            payload = {"model": model, "messages": MESSAGES, "max_tokens": OUTPUT, **extra}
            return await _post(session, url, key, payload)

    status, headers, body = asyncio.run(go())  # in a thread of its own from an async test
    return status, headers, orjson.loads(body)


def _error(reply: tuple[int, dict[str, str], Any], status: int, code: str) -> dict[str, Any]:
    got, _, body = reply
    assert got == status, (got, body)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["code"] == code, body
    return dict(error)


def _hold(url: str, admin: Admin) -> int:
    """What one call holds (and costs: it runs to its limit), from the upstream's own count
    of the prompt."""
    _, key = admin.funded(["m"], amount="1.00")
    status, _, body = _call(url, key)
    assert status == 200, body
    assert body["usage"]["completion_tokens"] == OUTPUT
    return int(body["usage"]["prompt_tokens"]) + 2 * OUTPUT


@pytest.mark.parametrize("enforcement", ["postpaid", "strict"])
async def test_100_concurrent_calls_never_spend_past_the_key_budget(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    redis_client: redis.Redis,
    enforcement: str,
) -> None:
    """A key whose budget covers 10 calls gets exactly 10 of 100 concurrent calls admitted
    (whole and streamed, with and without their own max_tokens); the other 90 are 402
    `key_budget_exceeded` and cost nothing. At every moment the key's spend plus its open
    holds stay within the budget; each answered call has exactly one usage record, by its
    x-request-id; the key's spend is the sum of those records."""
    gw = await asyncio.to_thread(_gateway, make_gateway, mock_a, enforcement)
    admin = Admin(gw.url)
    hold = await asyncio.to_thread(_hold, gw.url, admin)
    budget = 10 * hold + hold // 2
    account_id = await asyncio.to_thread(admin.create_account)
    await asyncio.to_thread(admin.topup, account_id, "100.00")  # the balance is no limit
    await asyncio.to_thread(admin.subscribe, account_id, "m")
    key = await asyncio.to_thread(
        admin.new_key, account_id, budget={"amount": _amount(budget), "period": "day"}
    )
    key_id = key.split(".")[1]
    spend_key = account_keys(account_id).key_spend

    highest = 0
    done = asyncio.Event()

    async def watch() -> None:
        nonlocal highest
        while not done.is_set():
            spent, held = redis_client.hmget(spend_key, [f"{key_id}:s", f"{key_id}:h"])
            highest = max(highest, int(spent or 0) + int(held or 0))
            await asyncio.sleep(0.002)

    async def one(i: int, session: aiohttp.ClientSession) -> tuple[int, str, bytes]:
        payload: dict[str, Any] = {"model": "m", "messages": MESSAGES, "stream": i % 2 == 0}
        if i % 4 < 2:  # half name their limit; the others are held hold_output_tokens
            payload["max_tokens"] = OUTPUT
        # The upstream answers 16 tokens unless limited: a call without max_tokens that were
        # not bounded by its hold would cost more than it held.
        status, headers, body = await _post(
            session, gw.url, key, payload, headers={"x-mock-ttft": "1.0"}
        )
        return status, headers["x-request-id"], body

    watcher = asyncio.create_task(watch())
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=100)) as session:
        results = await asyncio.gather(*(one(i, session) for i in range(100)))
    done.set()
    await watcher

    answered = [rid for status, rid, _ in results if status == 200]
    refused = [(status, body) for status, _, body in results if status != 200]
    assert len(answered) == 10, [status for status, _, _ in results]
    for status, body in refused:
        assert status == 402, body
        error = orjson.loads(body)["error"]
        assert error["code"] == "key_budget_exceeded"
        assert error["type"] == "insufficient_quota"
    records = await asyncio.to_thread(records_by_request, admin, account_id, answered)
    costs = [micros(r["cost"]) for r in records.values()]
    assert all(r["key_id"] == key_id for r in records.values())
    assert all(cost <= hold for cost in costs), costs
    await asyncio.to_thread(wait_no_holds, redis_client, account_id)
    view = await asyncio.to_thread(admin.key, account_id, key)
    assert micros(view["spend"]["spent"]) == sum(costs) <= budget
    assert view["spend"]["held"] == "0.000000"
    assert micros(view["spend"]["remaining"]) == budget - sum(costs)
    assert highest <= budget, (highest, budget)
    await asyncio.to_thread(assert_invariant, admin, redis_client, account_id, micros("100.00"))


def test_a_postpaid_call_on_a_budgeted_key_is_bounded_by_its_hold(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """Without max_tokens the upstream answers 16 tokens. Postpaid, a key without a budget gets
    (and pays for) all 16; on a key whose budget is one call's hold, a whole answer is sent the
    10 tokens its hold covers and a stream is cut within them (its hold cannot grow past the
    budget), each charged no more than it held."""
    gw = _gateway(make_gateway, mock_a)
    admin = Admin(gw.url)
    hold = _hold(gw.url, admin)
    account_id, free_key = admin.funded(["m"], amount="10.00")

    def completion_tokens(key: str, stream: bool) -> int:
        async def go() -> int:
            async with aiohttp.ClientSession() as session:
                payload: dict[str, Any] = {"model": "m", "messages": MESSAGES, "stream": stream}
                status, _, body = await _post(session, gw.url, key, payload)
                assert status == 200, body
                if not stream:
                    return int(orjson.loads(body)["usage"]["completion_tokens"])
                pieces = 0
                for line in body.split(b"\n"):
                    if line.startswith(b"data: {"):
                        for choice in orjson.loads(line[6:]).get("choices", []):
                            pieces += 1 if choice.get("delta", {}).get("content") else 0
                return pieces

        return asyncio.run(go())

    assert completion_tokens(free_key, stream=False) == 16
    assert completion_tokens(free_key, stream=True) == 16
    whole = admin.new_key(account_id, budget={"amount": _amount(hold)})
    streamed = admin.new_key(account_id, budget={"amount": _amount(hold)})
    assert completion_tokens(whole, stream=False) == OUTPUT
    assert completion_tokens(streamed, stream=True) <= OUTPUT
    records = admin.usage(account_id)
    assert len(records) == 4
    for key in (whole, streamed):
        (record,) = [r for r in records if r["key_id"] == key.split(".")[1]]
        assert micros(record["cost"]) <= hold
        assert micros(admin.key(account_id, key)["spend"]["spent"]) == micros(record["cost"])


def test_an_expired_key_is_refused_with_key_expired(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A key works until its `expires_at`, then is 401 `key_expired` on calls and on
    /v1/models, charging nothing; PATCH can move the expiry, or clear it."""
    gw = _gateway(make_gateway, mock_a)
    admin = Admin(gw.url)
    account_id, _ = admin.funded(["m"], amount="10.00")
    soon = time.time() + 1.5
    expires = (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(soon)) + f".{int(soon % 1 * 1000):03d}Z"
    )
    key = admin.new_key(account_id, expires_at=expires)
    assert admin.key(account_id, key)["expires_at"] == expires
    assert _call(gw.url, key)[0] == 200
    time.sleep(max(0.0, soon - time.time()) + 0.2)
    error = _error(_call(gw.url, key), 401, "key_expired")
    assert error["type"] == "invalid_request_error"
    models = Admin(gw.url, token=None).call(
        "GET", "/v1/models", headers={"Authorization": f"Bearer {key}"}
    )
    assert models.status == 401
    assert models.json()["error"]["code"] == "key_expired"
    balance = admin.account(account_id)["balance"]
    _error(_call(gw.url, key, stream=True), 401, "key_expired")
    assert admin.account(account_id)["balance"] == balance
    assert len(admin.usage(account_id)) == 1
    path = f"/admin/accounts/{account_id}/keys/{key.split('.')[1]}"
    admin.ok("PATCH", path, {"expires_at": None})
    assert _call(gw.url, key)[0] == 200
    admin.ok("PATCH", path, {"expires_at": "2020-01-01T00:00:00Z"})
    _error(_call(gw.url, key), 401, "key_expired")


def test_a_key_outside_its_models_is_refused(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A key limited to model `m` gets 403 `model_not_allowed_for_key` for `other` (which
    its account is subscribed to), free; /v1/models lists only `m`; clearing the list lets
    the key call every subscribed model."""
    gw = _gateway(make_gateway, mock_a)
    admin = Admin(gw.url)
    account_id, _ = admin.funded(["m", "other"], amount="10.00")
    key = admin.new_key(account_id, models=["m"])
    assert _call(gw.url, key)[0] == 200
    error = _error(_call(gw.url, key, model="other"), 403, "model_not_allowed_for_key")
    assert error["type"] == "permission_error"
    assert "other" in error["message"]
    plain = Admin(gw.url, token=None)
    auth = {"Authorization": f"Bearer {key}"}
    listed = plain.call("GET", "/v1/models", headers=auth).json()
    assert [m["id"] for m in listed["data"]] == ["m"]
    one = plain.call("GET", "/v1/models/other", headers=auth)
    assert one.status == 403
    assert one.json()["error"]["code"] == "model_not_allowed_for_key"
    records = admin.usage(account_id)
    assert [r["model"] for r in records] == ["m"]
    admin.ok("PATCH", f"/admin/accounts/{account_id}/keys/{key.split('.')[1]}", {"models": None})
    assert _call(gw.url, key, model="other")[0] == 200


def test_a_two_second_period_rolls_over_and_spends_again(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A budget of two calls per 2 s: the third call in a period is 402 until the next period
    starts, when the key's spend is 0 again and two more calls go through. GET shows the
    period's start and end and the key's spend over its life."""
    gw = _gateway(make_gateway, mock_a)
    admin = Admin(gw.url)
    hold = _hold(gw.url, admin)
    account_id, _ = admin.funded(["m"], amount="10.00")
    key = admin.new_key(account_id, budget={"amount": _amount(2 * hold), "period": "2s"})
    # Start just after a period boundary, so the first three calls fall in one period.
    time.sleep(2 - time.time() % 2 + 0.05)
    assert _call(gw.url, key)[0] == 200
    assert _call(gw.url, key)[0] == 200
    error = _error(_call(gw.url, key), 402, "key_budget_exceeded")
    assert "left until" in error["message"]
    view = admin.key(account_id, key)
    start = view["spend"]["period_start"]
    assert micros(view["spend"]["spent"]) == 2 * hold
    assert view["spend"]["remaining"] == "0.000000"
    time.sleep(2 - time.time() % 2 + 0.05)
    assert _call(gw.url, key)[0] == 200
    assert _call(gw.url, key)[0] == 200
    _error(_call(gw.url, key), 402, "key_budget_exceeded")
    view = admin.key(account_id, key)
    assert view["spend"]["period_start"] != start
    assert micros(view["spend"]["spent"]) == 2 * hold
    assert micros(view["spend"]["spent_total"]) == 4 * hold
    assert len(admin.usage(account_id)) == 4


def test_rotation_grace_holds_across_two_gateways(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """Rotated on one instance, the old secret keeps working on both until its grace ends,
    then both refuse it (401 `invalid_api_key`) while the new secret works on both; spend and
    usage records stay with the one key id."""
    first = _gateway(make_gateway, mock_a)
    second = _gateway(make_gateway, mock_a)
    admin = Admin(first.url)
    account_id, _ = admin.funded(["m"], amount="10.00")
    old = admin.new_key(account_id, budget={"amount": "1.00"})
    key_id = old.split(".")[1]
    assert _call(first.url, old)[0] == 200
    rotated = admin.ok(
        "POST", f"/admin/accounts/{account_id}/keys/{key_id}/rotate", {"grace": "3s"}
    )
    until = time.time() + 3
    new = rotated["key"]
    assert new != old
    assert new.split(".")[1] == key_id
    assert rotated["previous_valid_until"] is not None
    for url in (first.url, second.url):
        assert _call(url, old)[0] == 200
        assert _call(url, new)[0] == 200
    time.sleep(max(0.0, until - time.time()) + 0.3)
    for url in (first.url, second.url):
        _error(_call(url, old), 401, "invalid_api_key")
        assert _call(url, new)[0] == 200
    records = admin.usage(account_id)
    assert len(records) == 7
    assert {r["key_id"] for r in records} == {key_id}
    view = admin.key(account_id, new)
    assert micros(view["spend"]["spent"]) == sum(micros(r["cost"]) for r in records)
    summary = admin.ok("GET", f"/admin/accounts/{account_id}/usage/summary?group_by=key")
    assert [group["key"] for group in summary["data"]] == [key_id]

    # No grace: the old secret is refused at once, everywhere; revoking ends the new one.
    again = admin.ok("POST", f"/admin/accounts/{account_id}/keys/{key_id}/rotate", {"grace": "0s"})
    assert again["previous_valid_until"] is None
    for url in (first.url, second.url):
        _error(_call(url, new), 401, "invalid_api_key")
        assert _call(url, again["key"])[0] == 200
    admin.ok("DELETE", f"/admin/accounts/{account_id}/keys/{key_id}")
    for url in (first.url, second.url):
        _error(_call(url, again["key"]), 401, "invalid_api_key")


def test_a_rotation_grace_is_ended_by_revoking(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """Revoking a key in its rotation grace refuses both secrets at once."""
    gw = _gateway(make_gateway, mock_a)
    admin = Admin(gw.url)
    account_id, old = admin.funded(["m"], amount="10.00")
    key_id = old.split(".")[1]
    new = admin.ok("POST", f"/admin/accounts/{account_id}/keys/{key_id}/rotate")["key"]
    assert _call(gw.url, old)[0] == 200  # the default grace is an hour
    admin.ok("DELETE", f"/admin/accounts/{account_id}/keys/{key_id}")
    _error(_call(gw.url, old), 401, "invalid_api_key")
    _error(_call(gw.url, new), 401, "invalid_api_key")
    reply = admin.call("POST", f"/admin/accounts/{account_id}/keys/{key_id}/rotate")
    assert reply.status == 409
    assert reply.json()["error"]["code"] == "key_revoked"


def test_a_key_rate_limit_is_its_own(make_gateway: Callable[..., Proc], mock_a: Proc) -> None:
    """A key limited to 2 requests a minute gets 429 on its third, naming the key's rule,
    free; another key of the same account is not limited by it."""
    gw = _gateway(make_gateway, mock_a)
    admin = Admin(gw.url)
    account_id, other = admin.funded(["m"], amount="10.00")
    key = admin.new_key(account_id, rate_limits={"requests": "2/minute"})
    key_id = key.split(".")[1]
    assert _call(gw.url, key)[0] == 200
    assert _call(gw.url, key)[0] == 200
    reply = _call(gw.url, key)
    error = _error(reply, 429, "rate_limit_exceeded")
    assert f"key {key_id}" in error["message"]
    assert "retry-after" in {name.lower() for name in reply[1]}
    assert _call(gw.url, other)[0] == 200
    assert len(admin.usage(account_id)) == 3


def test_each_key_refusal_reaches_the_real_sdks_as_their_documented_errors(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """OpenAI's and Anthropic's own SDKs read the key refusals: 402 `key_budget_exceeded` as
    an APIStatusError carrying the code (Anthropic's as its `billing_error`), 401 `key_expired`
    as AuthenticationError, 403 `model_not_allowed_for_key` as PermissionDeniedError, the key's
    own 429 as RateLimitError. None of them is charged."""
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    entry["upstreams"][0]["apis"] = ["chat", "messages"]
    other = model_entry("other", mock_a.url, upstream_model="mock-model")
    gw = make_gateway([entry, other])
    admin = Admin(gw.url)
    account_id, _ = admin.funded(["m", "other"], amount="10.00")
    broke = admin.new_key(account_id, budget={"amount": "0.000001"})
    expired = admin.new_key(account_id, expires_at="2020-01-01T00:00:00Z")
    narrow = admin.new_key(account_id, models=["other"])
    limited = admin.new_key(account_id, rate_limits={"requests": "1/minute"})

    def chat(key: str) -> Any:
        client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
        return client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)

    with pytest.raises(openai.APIStatusError) as refused:
        chat(broke)
    assert refused.value.status_code == 402
    assert refused.value.code == "key_budget_exceeded"
    with pytest.raises(openai.AuthenticationError) as auth:
        chat(expired)
    assert auth.value.code == "key_expired"
    with pytest.raises(openai.PermissionDeniedError) as denied:
        chat(narrow)
    assert denied.value.code == "model_not_allowed_for_key"
    assert chat(limited).usage is not None
    with pytest.raises(openai.RateLimitError) as limit:
        chat(limited)
    assert limit.value.code == "rate_limit_exceeded"

    client = anthropic.Anthropic(base_url=gw.url, api_key=broke, max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as billing:
        client.messages.create(model="m", max_tokens=5, messages=MESSAGES)
    assert billing.value.status_code == 402
    body = billing.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "billing_error"
    assert body["error"]["code"] == "key_budget_exceeded"
    assert len(admin.usage(account_id)) == 1  # the one call the rate limit let through


async def test_holds_of_a_killed_gateway_or_a_failed_call_do_not_leak_into_the_budget(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A key's holds go back whatever ends the call: an upstream error releases its hold, and
    the streams of a gateway killed with SIGKILL are settled by another instance's sweeper.
    Afterwards the key holds nothing, its spend is exactly its usage records, one per answered
    call, and the budget they leave admits the next call."""
    billing = {
        "hold_lease": "1s",
        "checkpoint_tokens": 10,
        "sweep_interval": "100ms",
        "hold_output_tokens": OUTPUT,
    }
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    entry["pricing"] = PRICING
    victim = await asyncio.to_thread(make_gateway, [entry], billing=billing)
    survivor = await asyncio.to_thread(make_gateway, [entry], billing=billing)
    admin = Admin(survivor.url)
    account_id = await asyncio.to_thread(admin.create_account)
    await asyncio.to_thread(admin.topup, account_id, "10.00")
    await asyncio.to_thread(admin.subscribe, account_id, "m")
    key = await asyncio.to_thread(admin.new_key, account_id, budget={"amount": "0.010000"})

    async with aiohttp.ClientSession() as session:
        payload = {"model": "m", "messages": MESSAGES, "max_tokens": 50}
        failed = await _post(session, survivor.url, key, payload, {"x-mock-status": "500"})
        assert failed[0] == 500

        async def stream() -> None:
            body = {"model": "m", "messages": MESSAGES, "max_tokens": 300, "stream": True}
            try:
                await _post(session, victim.url, key, body, {"x-mock-token-delay": "0.02"})
            except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
                return

        streams = [asyncio.create_task(stream()) for _ in range(3)]
        spend_key = account_keys(account_id).key_spend
        key_id = key.split(".")[1]
        deadline = time.monotonic() + 10
        while int(redis_client.hget(spend_key, f"{key_id}:h") or 0) == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.0)  # the streams are under way, past a checkpoint
        await asyncio.to_thread(victim.stop, signal.SIGKILL)
        await asyncio.gather(*streams)
    await asyncio.to_thread(wait_no_holds, redis_client, account_id, 15)
    records = await asyncio.to_thread(admin.usage, account_id)
    assert len(records) == 3
    assert {r["status"] for r in records} == {"orphaned"}
    view = await asyncio.to_thread(admin.key, account_id, key)
    assert view["spend"]["held"] == "0.000000"
    assert micros(view["spend"]["spent"]) == sum(micros(r["cost"]) for r in records)
    assert redis_client.hget(spend_key, f"{key_id}:h") == b"0"
    assert not [f for f in redis_client.hkeys(spend_key) if f.startswith(b"h:")]
    status, _, body = await asyncio.to_thread(_call, survivor.url, key)
    assert status == 200, body
