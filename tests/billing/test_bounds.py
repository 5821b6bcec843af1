"""Bounds on what a call may ask for and be billed for (gateway/money.py has the arithmetic).

A request's `max_tokens` / `max_completion_tokens` must be an integer in
1..`billing.max_tokens_per_call`; usage an upstream reports above what the call could produce
is billed at the bound, counted and logged; prices have a maximum. Real gateway processes, the
real mock upstream (its `x-mock-usage-*` headers make it report any usage), the real store.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis
from openai import AsyncOpenAI

from gateway.config import ConfigError, parse_settings
from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, expected_cost, micros
from tests.billing.checks import gateway_cost as call_cost
from tests.conftest import model_entry
from tests.procs import Proc

# The documented maxima (README, gateway/money.py), written out so that this file also runs,
# and fails, on a tree without them.
DEFAULT_BOUND = 2_000_000  # billing.max_tokens_per_call's default
MAX_TOKENS_PER_CALL = 10**8  # billing.max_tokens_per_call, at most
MAX_PRICE_PER_MILLION_MICROS = 10**12  # a price, at most
MAX_BALANCE_MICROS = 10**15
INT64_MAX = 2**63 - 1
PRICES = ("0.15", "0.60")  # the conftest models' prices


def _chat(content: str, **fields: Any) -> dict[str, Any]:
    return {"model": "mock-model", "messages": [{"role": "user", "content": content}], **fields}


async def _post(
    url: str, key: str, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + path,
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def _last_upstream_body(mock: Proc) -> str:
    """The body of the last call the mock upstream received ('' before any)."""
    last = Admin(mock.url, token=None).call("GET", "/debug/last-request").json()
    return str(last["body"]) if last else ""


def _anomalies(gw: Proc) -> dict[tuple[str, str], float]:
    """gateway_usage_anomalies_total by (model, field)."""
    text = Admin(gw.url, token=None).call("GET", "/metrics").body.decode()
    found: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_usage_anomalies_total{"):
            labels, value = line[len("gateway_usage_anomalies_total{") :].split("} ")
            parts = dict(p.split("=", 1) for p in labels.split(","))
            key = (parts["model"].strip('"'), parts["field"].strip('"'))
            found[key] = float(value)
    return found


def _records(admin: Admin, account_id: str, count: int = 1) -> list[dict[str, Any]]:
    """The account's usage records once `count` are written (settlement is asynchronous)."""
    deadline = time.monotonic() + 10
    while True:
        records = admin.usage(account_id)
        if len(records) >= count or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def _warnings(gw: Proc, request_id: str, fields: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 10
    while True:
        lines = [
            e
            for e in gw.events()
            if e.get("request_id") == request_id and e.get("level") == "warning"
        ]
        if len(lines) >= fields or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


# -- the request's own output limit -------------------------------------------------------

TYPE_MESSAGE = "Invalid type for '{f}': expected an integer, but got {t} instead."
LOW_MESSAGE = (
    "Invalid '{f}': integer below minimum value. Expected a value >= 1, but got {v} instead."
)
HIGH_MESSAGE = (
    "Invalid '{f}': integer above maximum value. Expected a value <= {m}, but got {v} instead."
)


@pytest.mark.parametrize(
    ("path", "field", "value", "message"),
    [
        ("/v1/chat/completions", "max_tokens", 0, LOW_MESSAGE),
        ("/v1/chat/completions", "max_tokens", -1, LOW_MESSAGE),
        ("/v1/chat/completions", "max_tokens", 5.0, TYPE_MESSAGE),
        ("/v1/chat/completions", "max_tokens", "5", TYPE_MESSAGE),
        ("/v1/chat/completions", "max_tokens", True, TYPE_MESSAGE),
        ("/v1/chat/completions", "max_tokens", DEFAULT_BOUND + 1, HIGH_MESSAGE),
        ("/v1/chat/completions", "max_completion_tokens", 0, LOW_MESSAGE),
        ("/v1/chat/completions", "max_completion_tokens", [5], TYPE_MESSAGE),
        ("/v1/completions", "max_tokens", 0, LOW_MESSAGE),
        ("/v1/completions", "max_tokens", 2.5, TYPE_MESSAGE),
    ],
    ids=[
        "zero",
        "negative",
        "float-5.0",
        "string",
        "bool",
        "over-bound",
        "max_completion_tokens-zero",
        "max_completion_tokens-array",
        "completions-zero",
        "completions-float",
    ],
)
async def test_bad_output_limit_is_400_naming_the_param(
    gateway: Proc,
    admin: Admin,
    mock_a: Proc,
    path: str,
    field: str,
    value: Any,
    message: str,
) -> None:
    """max_tokens / max_completion_tokens below 1, not an integer (bool, float, string,
    array) or above billing.max_tokens_per_call: the gateway itself answers 400
    `invalid_request` with OpenAI's wording and `param`, before holding or forwarding
    anything: no upstream call, no usage record, the balance untouched."""
    account_id, key = admin.funded(["mock-model"], amount="1.00")
    marker = "bound-check-" + uuid.uuid4().hex
    if path == "/v1/completions":
        body: dict[str, Any] = {"model": "mock-model", "prompt": marker, field: value}
    else:
        body = _chat(marker, **{field: value})
    status, _, raw = await _post(gateway.url, key, path, body)
    assert status == 400, raw
    error = orjson.loads(raw)["error"]
    kinds = {bool: "a boolean", float: "a decimal number", str: "a string", list: "an array"}
    expected = message.format(f=field, v=value, m=DEFAULT_BOUND, t=kinds.get(type(value)))
    assert error == {
        "message": expected,
        "type": "invalid_request_error",
        "param": field,
        "code": "invalid_request",
    }
    assert marker not in _last_upstream_body(mock_a)
    account = admin.account(account_id)
    assert (account["balance"], account["held"]) == ("1.000000", "0.000000")
    assert admin.usage(account_id) == []


async def test_null_limit_is_absent_and_embeddings_have_none(gateway: Proc, admin: Admin) -> None:
    """`max_tokens: null` is the same as no max_tokens, and an embeddings call is not checked
    for a field it does not have. (A guard against over-refusing: passes on the old tree.)"""
    _, key = admin.funded(["mock-model"], amount="1.00")
    status, _, raw = await _post(
        gateway.url, key, "/v1/chat/completions", _chat("hi", max_tokens=None)
    )
    assert status == 200, raw
    body = {"model": "mock-model", "input": "hi", "max_tokens": 0}
    status, _, raw = await _post(gateway.url, key, "/v1/embeddings", body)
    assert status == 200, raw


@pytest.fixture
async def sdk(gateway: Proc, admin: Admin) -> AsyncIterator[AsyncOpenAI]:
    _, key = admin.funded(["mock-model"], amount="1.00")
    client = AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    yield client
    await client.close()


async def test_sdk_sees_max_tokens_zero_as_bad_request(sdk: AsyncOpenAI) -> None:
    """OpenAI's Python SDK raises `openai.BadRequestError` for `max_tokens=0`, with
    `param == "max_tokens"` and the gateway's message."""
    with pytest.raises(openai.BadRequestError) as info:
        await sdk.chat.completions.create(
            model="mock-model", messages=[{"role": "user", "content": "hi"}], max_tokens=0
        )
    assert info.value.status_code == 400
    assert info.value.param == "max_tokens"
    assert info.value.code == "invalid_request"
    assert "integer below minimum value" in info.value.message


# -- usage above what the call could produce -------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_completion_usage_above_max_tokens_is_billed_at_max_tokens(
    gateway: Proc, admin: Admin, redis_client: redis.Redis, stream: bool
) -> None:
    """A 5-token call whose upstream reports 2**60 completion tokens is billed for 5: one usage
    record with 5 completion tokens and the matching cost, the ledger invariant exact, one
    `gateway_usage_anomalies_total{field="completion_tokens"}` more, one warning line with the
    request id, the reported and the billed value."""
    account_id, key = admin.funded(["mock-model"], amount="20.00")
    before = _anomalies(gateway).get(("mock-model", "completion_tokens"), 0.0)
    body = _chat("tell me", max_tokens=5, stream=stream)
    headers = {"x-mock-usage-completion-tokens": str(2**60)}
    status, reply_headers, raw = await _post(
        gateway.url, key, "/v1/chat/completions", body, headers
    )
    assert status == 200, raw
    request_id = reply_headers["x-request-id"]
    (record,) = _records(admin, account_id)
    assert record["request_id"] == request_id
    assert record["usage_source"] == "upstream"
    assert record["completion_tokens"] == 5
    assert micros(record["cost"]) == expected_cost(record["prompt_tokens"], 5, *PRICES)
    assert_invariant(admin, redis_client, account_id, micros("20.00"))
    assert _anomalies(gateway)[("mock-model", "completion_tokens")] == before + 1
    (warning,) = _warnings(gateway, request_id, 1)
    assert warning["model"] == "mock-model"
    assert (warning["field"], warning["reported"], warning["billed"]) == (
        "completion_tokens",
        2**60,
        5,
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_int64_max_usage_is_billed_at_the_per_call_bound(
    gateway: Proc, admin: Admin, redis_client: redis.Redis, stream: bool
) -> None:
    """An upstream that reports 2**63-1 prompt and completion tokens for a call with no
    max_tokens: the settlement still runs (no script error, no "store unavailable"), billed at
    billing.max_tokens_per_call for each; exactly one record, the invariant exact, an anomaly
    counted for each field."""
    account_id, key = admin.funded(["mock-model"], amount="20.00")
    before = _anomalies(gateway)
    headers = {
        "x-mock-usage-prompt-tokens": str(INT64_MAX),
        "x-mock-usage-completion-tokens": str(INT64_MAX),
    }
    status, reply_headers, raw = await _post(
        gateway.url, key, "/v1/chat/completions", _chat("hello", stream=stream), headers
    )
    assert status == 200, raw
    (record,) = _records(admin, account_id)
    assert record["request_id"] == reply_headers["x-request-id"]
    assert (record["prompt_tokens"], record["completion_tokens"]) == (DEFAULT_BOUND,) * 2
    cost = expected_cost(DEFAULT_BOUND, DEFAULT_BOUND, *PRICES)
    assert micros(record["cost"]) == cost == 1_500_000
    account, _ = assert_invariant(admin, redis_client, account_id, micros("20.00"))
    assert micros(account["balance"]) == micros("20.00") - cost
    after = _anomalies(gateway)
    for field in ("prompt_tokens", "completion_tokens"):
        assert after[("mock-model", field)] == before.get(("mock-model", field), 0.0) + 1
    await asyncio.sleep(0.3)  # a second settlement would have landed by now
    assert len(admin.usage(account_id)) == 1


async def test_embeddings_usage_is_bounded_too(
    gateway: Proc, admin: Admin, redis_client: redis.Redis
) -> None:
    """An embeddings call whose upstream reports 2**63-1 prompt tokens is billed for
    billing.max_tokens_per_call of them, in one record, the invariant exact."""
    account_id, key = admin.funded(["mock-model"], amount="20.00")
    body = {"model": "mock-model", "input": "hello"}
    headers = {"x-mock-usage-prompt-tokens": str(INT64_MAX)}
    status, _, raw = await _post(gateway.url, key, "/v1/embeddings", body, headers)
    assert status == 200, raw
    (record,) = _records(admin, account_id)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (DEFAULT_BOUND, 0)
    assert micros(record["cost"]) == expected_cost(DEFAULT_BOUND, 0, *PRICES)
    assert_invariant(admin, redis_client, account_id, micros("20.00"))


# -- a configured bound ---------------------------------------------------------------------


@pytest.fixture
def bounded(make_gateway: Callable[..., Proc], mock_a: Proc) -> Proc:
    """A gateway with billing.max_tokens_per_call: 40 (and a hold default within it)."""
    return make_gateway(
        [model_entry("mock-model", mock_a.url)],
        billing={"max_tokens_per_call": 40, "hold_output_tokens": 16},
    )


async def test_configured_bound_refuses_and_bills(bounded: Proc, redis_client: redis.Redis) -> None:
    """Under billing.max_tokens_per_call: 40, max_tokens 41 is 400 (param max_tokens), 40 is
    served; a prompt the gateway counts above 40 tokens is 400 (param messages); usage
    reported above 40 is billed at 40."""
    admin = Admin(bounded.url)
    account_id, key = admin.funded(["mock-model"], amount="20.00")
    url = bounded.url
    status, _, raw = await _post(url, key, "/v1/chat/completions", _chat("hi", max_tokens=41))
    assert status == 400, raw
    error = orjson.loads(raw)["error"]
    assert error["param"] == "max_tokens"
    assert error["message"] == HIGH_MESSAGE.format(f="max_tokens", m=40, v=41)
    status, _, raw = await _post(url, key, "/v1/chat/completions", _chat("hi", max_tokens=40))
    assert status == 200, raw
    long_prompt = "word " * 60
    status, _, raw = await _post(url, key, "/v1/chat/completions", _chat(long_prompt))
    assert status == 400, raw
    assert orjson.loads(raw)["error"]["param"] == "messages"
    headers = {"x-mock-usage-completion-tokens": "1000"}
    status, _, raw = await _post(url, key, "/v1/chat/completions", _chat("hi"), headers)
    assert status == 200, raw
    records = _records(admin, account_id, 2)
    assert [r["completion_tokens"] for r in records] == [40, 40]
    assert_invariant(admin, redis_client, account_id, micros("20.00"))


# -- the config's maxima ----------------------------------------------------------------------


def _model(**pricing: str) -> dict[str, Any]:
    return {"name": "m", "pricing": pricing, "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"models": [_model(input_per_million="1000000.000001", output_per_million="1")]},
            'models[0].pricing.input_per_million: a price is at most "1000000.000000"',
        ),
        (
            {"models": [_model(input_per_million="1", output_per_million="99999999999")]},
            'models[0].pricing.output_per_million: a price is at most "1000000.000000"',
        ),
        (
            {"notifications": {"prices": {"sms": "1000001"}}},
            'notifications.prices.sms: a price is at most "1000000.000000"',
        ),
        (
            {"billing": {"max_tokens_per_call": MAX_TOKENS_PER_CALL + 1}},
            "billing.max_tokens_per_call: Input should be less than or equal to 100000000",
        ),
        (
            {"billing": {"max_tokens_per_call": 0}},
            "billing.max_tokens_per_call: Input should be greater than or equal to 1",
        ),
        (
            {"billing": {"max_tokens_per_call": 100, "hold_output_tokens": 101}},
            "billing: hold_output_tokens (101) is above max_tokens_per_call (100)",
        ),
        (
            {
                "billing": {"max_tokens_per_call": 100},
                "models": [
                    {
                        **_model(input_per_million="1", output_per_million="1"),
                        "hold_output_tokens": 101,
                    }
                ],
            },
            "models: model 'm' has hold_output_tokens 101, above billing.max_tokens_per_call (100)",
        ),
    ],
    ids=[
        "input-price",
        "output-price",
        "notification-price",
        "bound-too-large",
        "bound-zero",
        "hold-over-bound",
        "model-hold-over-bound",
    ],
)
def test_maxima_are_refused_at_their_path(data: dict[str, Any], expected: str) -> None:
    """A price above the documented maximum, a max_tokens_per_call out of 1..10**8, or a hold
    default above max_tokens_per_call is refused, named by its path."""
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert info.value.problems == [expected]


def test_the_maxima_keep_a_call_far_below_2_to_the_53() -> None:
    """money.py's arithmetic: the dearest call the config allows (both token bounds at their
    maximum, both prices at theirs) costs 2 * 10**14 micro-units, within the maximum balance,
    and twice the maximum balance is still exact in a Lua number; gateway/money.py's constants
    are the documented ones."""
    from gateway import money

    assert (money.MAX_TOKENS_PER_CALL, money.MAX_PRICE_PER_MILLION_MICROS) == (
        MAX_TOKENS_PER_CALL,
        MAX_PRICE_PER_MILLION_MICROS,
    )
    assert money.MAX_BALANCE_MICROS == money.MAX_AMOUNT_MICROS == MAX_BALANCE_MICROS
    dearest = call_cost(
        MAX_TOKENS_PER_CALL,
        MAX_TOKENS_PER_CALL,
        MAX_PRICE_PER_MILLION_MICROS,
        MAX_PRICE_PER_MILLION_MICROS,
    )
    assert dearest == 2 * 10**14 <= MAX_BALANCE_MICROS
    assert 2 * MAX_BALANCE_MICROS < money.LUA_EXACT == 2**53
    settings = parse_settings(
        {"models": [_model(input_per_million="1000000", output_per_million="1000000")]}
    )
    assert settings.billing.max_tokens_per_call == DEFAULT_BOUND


def test_default_hold_follows_a_lower_bound() -> None:
    """Lowering billing.max_tokens_per_call below the default hold_output_tokens (1024) lowers
    that default with it, instead of refusing a config that never set it."""
    settings = parse_settings({"billing": {"max_tokens_per_call": 100}})
    assert settings.billing.hold_output_tokens == 100
    assert parse_settings({}).billing.hold_output_tokens == 1024
