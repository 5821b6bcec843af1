"""The balance moves by exactly SPEC section 2's formula, and the usage record says the same."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson
import pytest
import redis

from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, expected_cost, micros
from tests.conftest import model_entry
from tests.procs import Proc

PRICES = [
    ("0.15", "0.60"),
    ("3", "15"),
    ("0.000001", "0.000003"),
    ("2.5", "10"),
    ("0.333333", "1.777777"),
    ("0", "0.000007"),
]


def _priced(name: str, url: str, prices: tuple[str, str]) -> dict[str, object]:
    entry = model_entry(name, url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": prices[0], "output_per_million": prices[1]}
    return entry


@pytest.fixture
def priced_gateway(make_gateway: Callable[..., Proc], mock_a: Proc) -> Proc:
    models = [_priced(f"p{i}", mock_a.url, prices) for i, prices in enumerate(PRICES)]
    return make_gateway(models)


@pytest.mark.parametrize("stream", [False, True])
async def test_balance_moves_by_the_formula(
    priced_gateway: Proc, redis_client: redis.Redis, stream: bool
) -> None:
    """For every price pair and several token counts, the debit equals ceil((p*in + c*out)/1e6)
    micro-units of the upstream-reported tokens, and the record carries the same numbers."""
    admin = Admin(priced_gateway.url)
    names = [f"p{i}" for i in range(len(PRICES))]
    account_id, key = admin.funded(names, amount="1000.00")
    topped_up = micros("1000.00")
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(headers=headers) as session:
        for (name, prices), max_tokens in zip(
            zip(names, PRICES, strict=True), (1, 7, 64, 250, 3, 33), strict=True
        ):
            before = micros(admin.account(account_id)["balance"])
            payload = {
                "model": name,
                "messages": [{"role": "user", "content": f"price check {name} " * max_tokens}],
                "max_tokens": max_tokens,
                "stream": stream,
                "stream_options": {"include_usage": True} if stream else None,
            }
            if not stream:
                del payload["stream_options"]
            async with session.post(
                priced_gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)
            ) as resp:
                assert resp.status == 200
                request_id = resp.headers["x-request-id"]
                raw = await resp.read()
            if stream:
                last = [line for line in raw.split(b"\n\n") if b'"usage":{' in line][-1]
                usage = orjson.loads(last[len(b"data: ") :])["usage"]
            else:
                usage = orjson.loads(raw)["usage"]
            assert usage["completion_tokens"] == max_tokens
            cost = expected_cost(usage["prompt_tokens"], max_tokens, *prices)
            after = micros(admin.account(account_id)["balance"])
            assert before - after == cost, (name, prices, usage)
            record = admin.usage(account_id)[-1]
            assert record["request_id"] == request_id
            assert micros(record["cost"]) == cost
            assert record["prompt_tokens"] == usage["prompt_tokens"]
            assert record["completion_tokens"] == max_tokens
            assert record["usage_source"] == "upstream"
            assert record["status"] == "ok"
            assert record["stream"] is stream
            assert record["model"] == name
    assert_invariant(admin, redis_client, account_id, topped_up)


async def test_prompt_held_then_released_to_actual(
    priced_gateway: Proc, redis_client: redis.Redis
) -> None:
    """Without max_tokens the hold covers hold_output_tokens (1024); the settled debit is only
    the actual cost, and nothing stays held."""
    admin = Admin(priced_gateway.url)
    account_id, key = admin.funded(["p1"], amount="5.00")
    payload = {"model": "p1", "messages": [{"role": "user", "content": "hello"}]}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            priced_gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)
        ) as resp,
    ):
        usage = orjson.loads(await resp.read())["usage"]
    cost = expected_cost(usage["prompt_tokens"], usage["completion_tokens"], *PRICES[1])
    account, _ = assert_invariant(admin, redis_client, account_id, micros("5.00"))
    assert micros(account["balance"]) == micros("5.00") - cost


async def test_hold_needs_the_whole_estimate(
    priced_gateway: Proc, redis_client: redis.Redis
) -> None:
    """A call is refused with 402 when the balance covers the actual cost but not the hold."""
    admin = Admin(priced_gateway.url)
    # p1 costs 15 USD per million output tokens: 1000 output tokens hold 0.015 USD.
    account_id, key = admin.funded(["p1"], amount="0.01")
    payload = {"model": "p1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1000}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async with session.post(
            priced_gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)
        ) as resp:
            assert resp.status == 402
            error = orjson.loads(await resp.read())["error"]
        assert error["code"] == "insufficient_balance"
        payload["max_tokens"] = 10
        async with session.post(
            priced_gateway.url + "/v1/chat/completions", data=orjson.dumps(payload)
        ) as resp:
            assert resp.status == 200
    assert_invariant(admin, redis_client, account_id, micros("0.01"))
