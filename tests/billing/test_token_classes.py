"""Every token class at its own price (issue 14): uncached input, cached input, cache-write
input, output and reasoning output, each token in exactly one class, the call's cost rounded
up once. Through a real gateway process, the real mock upstream (its `x-mock-usage-*` headers
make it report any classes, in OpenAI's `*_tokens_details` or LiteLLM's top-level cache
fields) and the real store; expected money computed with exact fractions from the decimal
price strings, never with the gateway's functions.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from fractions import Fraction
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import (
    ceil_micros,
    exact_micros,
    metric_values,
    micros,
    model_prices,
    one_usage_record,
    records_by_request,
    sse_events,
    wait_no_holds,
)
from tests.conftest import GATEWAY_ENV, gateway_config, model_entry
from tests.procs import Proc, start_gateway

# Five distinct prices whose sums land between micro-units, so the one rounding shows.
INPUT, OUTPUT = "0.333333", "1.777777"
CACHED, CACHE_WRITE, REASONING = "0.111113", "0.416667", "2.999991"
CLASSED = {
    "input_per_million": INPUT,
    "output_per_million": OUTPUT,
    "cached_input_per_million": CACHED,
    "cache_write_per_million": CACHE_WRITE,
    "reasoning_per_million": REASONING,
}
PLAIN = {"input_per_million": INPUT, "output_per_million": OUTPUT}
TOPUP = "50.00"
ANOMALIES = "gateway_usage_anomalies_total"


def _model(name: str, url: str, pricing: dict[str, str]) -> dict[str, Any]:
    entry = model_entry(name, url, upstream_model="mock-model")
    entry["pricing"] = pricing
    return entry


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, valkey: EmbeddedStore, mock_a: Proc
) -> Iterator[Proc]:
    """One gateway for the module: `classed` prices every class apart, `plain` has only an
    input and an output price."""
    models = [_model("classed", mock_a.url, CLASSED), _model("plain", mock_a.url, PLAIN)]
    proc = start_gateway(
        tmp_path_factory.mktemp("token-classes"), gateway_config(valkey, models), GATEWAY_ENV
    )
    yield proc
    proc.stop()


def _class_headers(
    style: str, prompt: int, cached: int, written: int, reasoning: int
) -> dict[str, str]:
    headers = {
        "x-mock-usage-prompt-tokens": str(prompt),
        "x-mock-usage-cached-tokens": str(cached),
        "x-mock-usage-cache-write-tokens": str(written),
        "x-mock-usage-reasoning-tokens": str(reasoning),
    }
    if style == "litellm":
        headers["x-mock-usage-style"] = "litellm"
    return headers


async def _call(
    gw: Proc, key: str, model: str, mode: str, max_tokens: int, headers: dict[str, str]
) -> tuple[str, bytes]:
    """One chat call: `whole`, `stream` (the client asks for usage) or `stream-forced` (it
    does not: the gateway asks on its behalf and hides the report). (request id, body)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": f"token classes {model} {mode}"}],
        "max_tokens": max_tokens,
    }
    if mode != "whole":
        body["stream"] = True
    if mode == "stream":
        body["stream_options"] = {"include_usage": True}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            gw.url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
        ) as resp,
    ):
        raw = await resp.read()
        assert resp.status == 200, raw
        return resp.headers["x-request-id"], raw


def _client_usage(mode: str, raw: bytes) -> dict[str, Any] | None:
    """The usage the client got (None: it got none, and no event mentions usage)."""
    if mode == "whole":
        return dict(orjson.loads(raw)["usage"])
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]"
    reports = [orjson.loads(e[6:])["usage"] for e in events[:-1] if b'"usage":{' in e]
    if mode == "stream-forced":
        assert reports == [], reports
        assert b'"usage"' not in raw
        assert b'"cost"' not in raw
        return None
    (usage,) = reports
    return dict(usage)


def _csv_row(admin: Admin, account_id: str, request_id: str) -> dict[str, str]:
    reply = admin.call("GET", f"/admin/accounts/{account_id}/usage", headers={"Accept": "text/csv"})
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(reply.body.decode(), newline="")))
    (row,) = [r for r in rows if r["request_id"] == request_id]
    return row


async def _billed(
    admin: Admin, store: redis.Redis, account_id: str, request_id: str
) -> tuple[int, dict[str, Any]]:
    """(micro-units the balance moved by, the call's one usage record)."""
    record = await one_usage_record(admin, account_id)
    assert record["request_id"] == request_id
    wait_no_holds(store, account_id)
    account = admin.account(account_id)
    assert account["held"] == "0.000000"
    return micros(TOPUP) - micros(account["balance"]), record


@pytest.mark.parametrize("mode", ["whole", "stream", "stream-forced"])
@pytest.mark.parametrize("style", ["openai", "litellm"])
async def test_each_class_is_billed_at_its_own_price(
    gw: Proc, redis_client: redis.Redis, style: str, mode: str
) -> None:
    """1234 prompt tokens of which 700 cached and 301 written to the cache, 37 completion
    tokens of which 19 reasoning: the balance moves by ceil(233 x input + 700 x cached +
    301 x cache-write + 18 x output + 19 x reasoning) micro-units exactly; the record (JSON and
    CSV) carries the classes, the cost and the version of the sheet in force; a client that
    asked for usage gets the upstream's report with the same cost."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["classed"], amount=TOPUP)
    prompt, cached, written, completion, reasoning = 1234, 700, 301, 37, 19
    headers = _class_headers(style, prompt, cached, written, reasoning)
    request_id, raw = await _call(gw, key, "classed", mode, completion, headers)

    exact = exact_micros(
        (prompt - cached - written, INPUT),
        (cached, CACHED),
        (written, CACHE_WRITE),
        (completion - reasoning, OUTPUT),
        (reasoning, REASONING),
    )
    assert exact.denominator != 1  # the rounding up is part of what is checked
    cost = ceil_micros(exact)
    # Billing everything as plain input and output would be another amount: the classes count.
    assert cost != ceil_micros(exact_micros((prompt, INPUT), (completion, OUTPUT)))

    debit, record = await _billed(admin, redis_client, account_id, request_id)
    assert debit == cost, (debit, cost, record)
    assert micros(record["cost"]) == cost
    assert record["uncharged"] == "0.000000"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
    assert record["cached_tokens"] == cached
    assert record["cache_write_tokens"] == written
    assert record["reasoning_tokens"] == reasoning
    assert record["usage_source"] == "upstream"
    assert record["stream"] is (mode != "whole")
    assert record["status"] == "ok"
    assert record["model"] == "classed"
    current = model_prices(admin, "classed")["current"]
    assert record["price_version"]
    assert record["price_version"] == current["version"]

    row = _csv_row(admin, account_id, request_id)
    assert row["cached_tokens"] == str(cached)
    assert row["cache_write_tokens"] == str(written)
    assert row["reasoning_tokens"] == str(reasoning)
    assert row["price_version"] == record["price_version"]
    assert row["cost"] == record["cost"]

    usage = _client_usage(mode, raw)
    if usage is not None:
        assert usage["prompt_tokens"] == prompt
        assert usage["completion_tokens"] == completion
        if style == "litellm":
            assert usage["cache_read_input_tokens"] == cached
            assert usage["cache_creation_input_tokens"] == written
        else:
            assert usage["prompt_tokens_details"]["cached_tokens"] == cached
        assert usage["completion_tokens_details"]["reasoning_tokens"] == reasoning
    if mode == "stream":
        assert usage is not None
        assert micros(usage["cost"]) == cost


@pytest.mark.parametrize(
    ("style", "mode"), [("openai", "whole"), ("litellm", "whole"), ("litellm", "stream")]
)
async def test_unpriced_classes_cost_their_parents_price(
    gw: Proc, redis_client: redis.Redis, style: str, mode: str
) -> None:
    """A model with only input and output prices bills cached and cache-write tokens at the
    input price and reasoning tokens at the output price; /admin/prices shows each class's
    price so resolved."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["plain"], amount=TOPUP)
    prompt, cached, written, completion, reasoning = 999, 500, 111, 23, 13
    headers = _class_headers(style, prompt, cached, written, reasoning)
    request_id, _ = await _call(gw, key, "plain", mode, completion, headers)
    cost = ceil_micros(exact_micros((prompt, INPUT), (completion, OUTPUT)))
    debit, record = await _billed(admin, redis_client, account_id, request_id)
    assert debit == cost
    assert micros(record["cost"]) == cost
    assert (record["cached_tokens"], record["cache_write_tokens"]) == (cached, written)
    assert record["reasoning_tokens"] == reasoning
    current = model_prices(admin, "plain")["current"]
    assert current["input_per_million"] == current["cached_input_per_million"] == "0.333333"
    assert current["cache_write_per_million"] == "0.333333"
    assert current["output_per_million"] == current["reasoning_per_million"] == "1.777777"
    assert record["price_version"] == current["version"]
    classed = model_prices(admin, "classed")["current"]
    assert classed["version"] != current["version"]  # another sheet, another version
    assert classed["cached_input_per_million"] == "0.111113"
    assert classed["cache_write_per_million"] == "0.416667"
    assert classed["reasoning_per_million"] == "2.999991"


@pytest.mark.parametrize(
    ("style", "reported", "billed", "field"),
    [
        # (prompt, cached, written, completion, reasoning) reported and billed
        ("openai", (100, 150, 0, 10, 0), (100, 100, 0, 10, 0), "cached_tokens"),
        ("litellm", (100, 150, 0, 10, 0), (100, 100, 0, 10, 0), "cached_tokens"),
        ("openai", (100, 60, 70, 10, 0), (100, 60, 40, 10, 0), "cache_write_tokens"),
        ("litellm", (100, 0, 130, 10, 0), (100, 0, 100, 10, 0), "cache_write_tokens"),
        ("openai", (100, 0, 0, 10, 50), (100, 0, 0, 10, 10), "reasoning_tokens"),
    ],
)
async def test_a_class_bigger_than_its_parent_is_cut_to_it(
    gw: Proc,
    redis_client: redis.Redis,
    style: str,
    reported: tuple[int, int, int, int, int],
    billed: tuple[int, int, int, int, int],
    field: str,
) -> None:
    """Cached (or cache-write) tokens beyond the prompt, reasoning beyond the completion, are
    cut to their parent (no negative uncached input or plain output): billed, recorded and
    counted once in gateway_usage_anomalies_total{field=...}."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["classed"], amount=TOPUP)
    prompt, cached, written, completion, reasoning = reported
    before = metric_values(gw.url, ANOMALIES)
    headers = _class_headers(style, prompt, cached, written, reasoning)
    request_id, _ = await _call(gw, key, "classed", "whole", completion, headers)

    prompt, cached, written, completion, reasoning = billed
    cost = ceil_micros(
        exact_micros(
            (prompt - cached - written, INPUT),
            (cached, CACHED),
            (written, CACHE_WRITE),
            (completion - reasoning, OUTPUT),
            (reasoning, REASONING),
        )
    )
    debit, record = await _billed(admin, redis_client, account_id, request_id)
    assert debit == cost, (debit, cost, record)
    assert micros(record["cost"]) == cost
    assert record["prompt_tokens"] == prompt
    assert record["completion_tokens"] == completion
    assert record["cached_tokens"] == cached
    assert record["cache_write_tokens"] == written
    assert record["reasoning_tokens"] == reasoning
    after = metric_values(gw.url, ANOMALIES)
    key_of = frozenset({("model", "classed"), ("field", field)})
    assert after.get(key_of, 0.0) - before.get(key_of, 0.0) == 1.0, (before, after)
    others = {k: v - before.get(k, 0.0) for k, v in after.items() if k != key_of}
    assert not any(others.values()), others  # no other field was counted


async def test_every_answered_call_has_one_record(gw: Proc, redis_client: redis.Redis) -> None:
    """Several calls of one account, whole and streamed, both styles: each answer's
    x-request-id has exactly one usage record, and the balance moved by their costs' sum."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["classed", "plain"], amount=TOPUP)
    ids: list[str] = []
    total = Fraction(0)
    expected: list[int] = []
    for i, (style, mode) in enumerate(
        [("openai", "whole"), ("litellm", "stream"), ("openai", "stream-forced")]
    ):
        headers = _class_headers(style, 400 + i, 100 + i, 50, 3)
        request_id, _ = await _call(gw, key, "classed", mode, 9, headers)
        ids.append(request_id)
        one = exact_micros(
            (400 + i - 100 - i - 50, INPUT),
            (100 + i, CACHED),
            (50, CACHE_WRITE),
            (6, OUTPUT),
            (3, REASONING),
        )
        expected.append(ceil_micros(one))
        total += one
    records = records_by_request(admin, account_id, ids)
    assert [micros(records[i]["cost"]) for i in ids] == expected
    wait_no_holds(redis_client, account_id)
    spent = micros(TOPUP) - micros(admin.account(account_id)["balance"])
    assert spent == sum(expected)
    assert spent >= ceil_micros(total)  # each call rounded up on its own
