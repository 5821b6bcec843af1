"""Every answer says what it cost (issue 14): a whole answer in `x-gateway-cost` and
`x-gateway-balance-available`, a stream whose client asked for usage in a `"cost"` member of
its usage report, and nothing else of the upstream's bytes changes; `billing.report_cost:
false` turns both off. Real gateway processes, the real mock upstream (deterministic: the same
request gives the same bytes, so a direct call is the reference), the real store, and the
real OpenAI SDK as a client.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import orjson
import pytest
import redis
from openai import AsyncOpenAI

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import (
    ceil_micros,
    exact_micros,
    micros,
    records_by_request,
    sse_events,
    wait_no_holds,
)
from tests.conftest import GATEWAY_ENV, UPSTREAM_KEY, gateway_config, model_entry
from tests.procs import Proc, start_gateway

PRICES = {
    "input_per_million": "0.333333",
    "output_per_million": "1.777777",
    "cached_input_per_million": "0.111113",
    "reasoning_per_million": "2.999991",
}
TOPUP = "30.00"
TOPUP_DECIMAL = "30.000000"  # the same, as the API writes amounts
SIX_DECIMALS = re.compile(r"[0-9]+\.[0-9]{6}")
COST_HEADER, AVAILABLE_HEADER = "x-gateway-cost", "x-gateway-balance-available"


def _start(tmp: pytest.TempPathFactory, valkey: EmbeddedStore, mock: Proc, **sections: Any) -> Proc:
    # The public name is the upstream's: the gateway passes a client's body on unchanged, so
    # the mock's answer to it is the reference, byte for byte.
    model = model_entry("mock-model", mock.url)
    model["pricing"] = PRICES
    config = gateway_config(valkey, [model], **sections)
    return start_gateway(tmp.mktemp("cost-reporting"), config, GATEWAY_ENV)


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, valkey: EmbeddedStore, mock_a: Proc
) -> Iterator[Proc]:
    proc = _start(tmp_path_factory, valkey, mock_a)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def quiet_gw(
    tmp_path_factory: pytest.TempPathFactory, valkey: EmbeddedStore, mock_a: Proc
) -> Iterator[Proc]:
    """The same model, `billing.report_cost: false`."""
    proc = _start(tmp_path_factory, valkey, mock_a, billing={"report_cost": False})
    yield proc
    proc.stop()


async def _post(
    url: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url, data=body, headers={"Content-Type": "application/json", **headers}
        ) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


async def _via_and_direct(
    gw: Proc, mock: Proc, key: str, path: str, payload: dict[str, Any], extra: dict[str, str]
) -> tuple[dict[str, str], bytes, bytes, bytes]:
    """The gateway's answer (headers, body), the body it forwarded, and the mock's answer to
    that same body called directly with the same test headers."""
    status, headers, via = await _post(
        gw.url + path, orjson.dumps(payload), {"Authorization": f"Bearer {key}", **extra}
    )
    assert status == 200, via
    forwarded = Admin(mock.url, token=None).call("GET", "/debug/last-request").json()
    assert forwarded["path"] == path
    sent = str(forwarded["body"]).encode()
    status, _, direct = await _post(
        mock.url + path, sent, {"Authorization": f"Bearer {UPSTREAM_KEY}", **extra}
    )
    assert status == 200, direct
    return headers, via, sent, direct


def _cost_of(usage: dict[str, Any]) -> int:
    """What a usage report costs under PRICES (exact fractions, rounded up once)."""
    prompt, completion = usage["prompt_tokens"], usage.get("completion_tokens", 0)
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    cached = usage.get("cache_read_input_tokens", cached)
    reasoning = (usage.get("completion_tokens_details") or {}).get("reasoning_tokens", 0)
    return ceil_micros(
        exact_micros(
            (prompt - cached, PRICES["input_per_million"]),
            (cached, PRICES["cached_input_per_million"]),
            (completion - reasoning, PRICES["output_per_million"]),
            (reasoning, PRICES["reasoning_per_million"]),
        )
    )


CHAT = {"messages": [{"role": "user", "content": "What does this cost?"}], "max_tokens": 11}
WHOLE = [
    ("/v1/chat/completions", {"model": "mock-model", **CHAT}),
    ("/v1/completions", {"model": "mock-model", "prompt": "Price me", "max_tokens": 6}),
    ("/v1/embeddings", {"model": "mock-model", "input": ["one", "two three"]}),
]


@pytest.mark.parametrize(("path", "payload"), WHOLE, ids=["chat", "completions", "embeddings"])
async def test_a_whole_answer_carries_its_cost_and_the_balance(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis, path: str, payload: dict[str, Any]
) -> None:
    """Two calls in a row: each answer's x-gateway-cost (six decimals) is its record's cost
    and the usage's price; x-gateway-balance-available is the account's `available` once the
    call has settled; the body is the upstream's, byte for byte."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["mock-model"], amount=TOPUP)
    extra = {"x-mock-usage-cached-tokens": "3"} if "embeddings" not in path else {}
    ids = []
    for _ in range(2):
        headers, via, _, direct = await _via_and_direct(gw, mock_a, key, path, payload, extra)
        assert via == direct
        cost = headers[COST_HEADER]
        assert SIX_DECIMALS.fullmatch(cost), cost
        assert micros(cost) == _cost_of(orjson.loads(via)["usage"]) > 0
        wait_no_holds(redis_client, account_id)
        account = admin.account(account_id)
        assert headers[AVAILABLE_HEADER] == account["available"], (headers, account)
        assert SIX_DECIMALS.fullmatch(headers[AVAILABLE_HEADER])
        ids.append(headers["x-request-id"])
        records = records_by_request(admin, account_id, ids)
        assert records[ids[-1]]["cost"] == cost
    assert micros(admin.account(account_id)["available"]) < micros(TOPUP)


STREAM_CASES = [
    ("chat", "/v1/chat/completions", {"model": "mock-model", **CHAT}, {}),
    (
        "chat-openai-details",  # the usage object holds objects: the cost goes after them
        "/v1/chat/completions",
        {"model": "mock-model", **CHAT},
        {"x-mock-usage-cached-tokens": "4", "x-mock-usage-reasoning-tokens": "5"},
    ),
    (
        "chat-litellm",
        "/v1/chat/completions",
        {"model": "mock-model", **CHAT},
        {"x-mock-usage-style": "litellm", "x-mock-usage-cached-tokens": "6"},
    ),
    (
        "completions",
        "/v1/completions",
        {"model": "mock-model", "prompt": "Stream me a price", "max_tokens": 8},
        {},
    ),
]


@pytest.mark.parametrize(
    ("path", "payload", "extra"),
    [c[1:] for c in STREAM_CASES],
    ids=[c[0] for c in STREAM_CASES],
)
async def test_a_stream_that_asked_for_usage_gets_the_cost_and_nothing_else(
    gw: Proc, mock_a: Proc, path: str, payload: dict[str, Any], extra: dict[str, str]
) -> None:
    """With `stream_options.include_usage`, the final usage object ends with
    `"cost": "<six decimals>"`, the record's cost and the usage's price; without that member
    the client's bytes are the mock's, byte for byte."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["mock-model"], amount=TOPUP)
    body = {**payload, "stream": True, "stream_options": {"include_usage": True}}
    headers, via, sent, direct = await _via_and_direct(gw, mock_a, key, path, body, extra)
    assert orjson.loads(sent) == body  # nothing asked of the upstream on the client's behalf
    events = sse_events(via)
    assert events[-1] == b"data: [DONE]"
    (report,) = [e for e in events if b'"usage":{' in e]
    usage = orjson.loads(report[6:])["usage"]
    cost = usage["cost"]
    assert isinstance(cost, str), cost
    assert SIX_DECIMALS.fullmatch(cost), cost
    member = b',"cost":"' + cost.encode() + b'"'
    assert via.count(b'"cost"') == 1
    # The mock writes `usage` last: the cost closes the usage object, then the event's.
    assert report.endswith(member + b"}}"), report
    assert via.replace(member, b"", 1) == direct
    record = records_by_request(admin, account_id, [headers["x-request-id"]])[
        headers["x-request-id"]
    ]
    assert record["cost"] == cost
    del usage["cost"]
    assert micros(cost) == _cost_of(usage) > 0


async def test_a_stream_that_did_not_ask_for_usage_gets_neither(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """Without include_usage the client's stream has no usage and no cost: it is what the mock
    sends that same request, byte for byte; the call is billed all the same."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["mock-model"], amount=TOPUP)
    body = orjson.dumps({"model": "mock-model", **CHAT, "stream": True})
    status, headers, via = await _post(
        gw.url + "/v1/chat/completions", body, {"Authorization": f"Bearer {key}"}
    )
    assert status == 200
    _, _, direct = await _post(
        mock_a.url + "/v1/chat/completions", body, {"Authorization": f"Bearer {UPSTREAM_KEY}"}
    )
    assert via == direct
    assert b'"usage"' not in via
    assert b'"cost"' not in via
    record = records_by_request(admin, account_id, [headers["x-request-id"]])[
        headers["x-request-id"]
    ]
    assert record["completion_tokens"] == CHAT["max_tokens"]
    wait_no_holds(redis_client, account_id)
    assert micros(TOPUP) - micros(admin.account(account_id)["balance"]) == micros(record["cost"])
    assert micros(record["cost"]) > 0


async def test_report_cost_false_reports_nothing(
    quiet_gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """`billing: {report_cost: false}`: no cost headers on a whole answer and no cost in a
    stream's usage (the bytes are the mock's); the calls are billed as ever."""
    admin = Admin(quiet_gw.url)
    account_id, key = admin.funded(["mock-model"], amount=TOPUP)
    whole = {"model": "mock-model", **CHAT}
    headers, via, _, direct = await _via_and_direct(
        quiet_gw, mock_a, key, "/v1/chat/completions", whole, {}
    )
    assert via == direct
    assert COST_HEADER not in headers
    assert AVAILABLE_HEADER not in headers
    stream = {**whole, "stream": True, "stream_options": {"include_usage": True}}
    stream_headers, via, _, direct = await _via_and_direct(
        quiet_gw, mock_a, key, "/v1/chat/completions", stream, {}
    )
    assert via == direct
    assert b'"cost"' not in via
    assert b'"usage":{' in via
    assert COST_HEADER not in stream_headers
    ids = [headers["x-request-id"], stream_headers["x-request-id"]]
    records = records_by_request(admin, account_id, ids)
    wait_no_holds(redis_client, account_id)
    spent = micros(TOPUP) - micros(admin.account(account_id)["balance"])
    assert spent == sum(micros(r["cost"]) for r in records.values()) > 0


@pytest.fixture
async def sdk(gw: Proc) -> AsyncIterator[tuple[AsyncOpenAI, Admin, str]]:
    admin = Admin(gw.url)
    account_id, key = admin.funded(["mock-model"], amount=TOPUP)
    client = AsyncOpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0)
    yield client, admin, account_id
    await client.close()


async def test_the_openai_sdk_reads_the_cost(
    sdk: tuple[AsyncOpenAI, Admin, str], redis_client: redis.Redis
) -> None:
    """The OpenAI SDK parses both answers without error: the header through
    `with_raw_response`, the stream's `usage.cost` as an extra field of its last chunk."""
    client, admin, account_id = sdk
    messages: Any = [{"role": "user", "content": "sdk cost"}]
    raw = await client.chat.completions.with_raw_response.create(
        model="mock-model", messages=messages, max_tokens=7
    )
    completion = raw.parse()
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    header_cost = raw.headers.get(COST_HEADER)
    assert header_cost is not None
    assert SIX_DECIMALS.fullmatch(header_cost)
    wait_no_holds(redis_client, account_id)
    assert raw.headers.get(AVAILABLE_HEADER) == admin.account(account_id)["available"]

    stream = await client.chat.completions.create(
        model="mock-model",
        messages=messages,
        max_tokens=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens == 7
    extra = last.usage.model_extra or {}
    stream_cost = extra.get("cost")
    assert isinstance(stream_cost, str), extra
    assert SIX_DECIMALS.fullmatch(stream_cost), extra
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == completion.choices[0].message.content
    # The same request, streamed or not: the same usage, the same cost.
    assert stream_cost == header_cost
    ids = [raw.headers["x-request-id"], stream.response.headers["x-request-id"]]
    records = records_by_request(admin, account_id, ids)
    assert [records[i]["cost"] for i in ids] == [header_cost, stream_cost]


async def test_an_upstream_error_says_it_cost_nothing(gw: Proc, redis_client: redis.Redis) -> None:
    """The upstream's own error answer passes through and costs nothing: its x-gateway-cost is
    0.000000 and x-gateway-balance-available the whole balance (its hold released), and no
    record is written."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["mock-model"], amount=TOPUP)
    body = orjson.dumps({"model": "mock-model", **CHAT})
    headers = {"Authorization": f"Bearer {key}", "x-mock-status": "503"}
    status, answer, _ = await _post(gw.url + "/v1/chat/completions", body, headers)
    assert status == 503
    assert answer[COST_HEADER] == "0.000000"
    assert answer[AVAILABLE_HEADER] == TOPUP_DECIMAL
    wait_no_holds(redis_client, account_id)
    assert admin.account(account_id)["available"] == TOPUP_DECIMAL
    assert admin.usage(account_id) == []
