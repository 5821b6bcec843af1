"""`proxy.passthrough`: a listed route is forwarded at a flat price per call, held and charged
like any call (key, subscription, balance); an unlisted one is 404 (nothing passes unmetered:
a passthrough that bypasses the ledger is Bifrost's #2873)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest
import redis

from gateway.config.loader import ConfigError, parse_settings
from tests.admin_client import Admin
from tests.billing.checks import micros, records_by_request, wait_no_holds
from tests.conftest import UPSTREAM_KEY, model_entry
from tests.procs import Proc

PRICE = "0.0025"
BODY = {"model": "m", "input": "is this fine?"}
PASSTHROUGH = {"passthrough": [{"path": "/v1/moderations", "price_per_call": PRICE}]}


async def _post(
    url: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, data=orjson.dumps(body), headers=headers) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


@pytest.fixture
def gw(make_gateway: Callable[..., Proc], mock_a: Proc) -> Proc:
    return make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")], proxy=PASSTHROUGH
    )


async def test_a_listed_route_is_forwarded_and_charged_its_price(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """Each call reaches the upstream's own route with the upstream's model name, the client
    gets the upstream's answer, and the account is charged the flat price once per call, one
    `passthrough` record each (x-gateway-cost says the same)."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="1.00")
    auth = {"Authorization": f"Bearer {key}"}
    direct = await _post(
        mock_a.url + "/v1/moderations",
        {**BODY, "model": "mock-model"},
        {"Authorization": f"Bearer {UPSTREAM_KEY}"},
    )
    assert direct[0] == 200, direct
    ids = []
    for _ in range(3):
        status, headers, raw = await _post(gw.url + "/v1/moderations", BODY, auth)
        assert status == 200, raw
        assert raw == direct[2]
        assert headers["x-gateway-cost"] == "0.002500"
        ids.append(headers["x-request-id"])
    wait_no_holds(redis_client, account_id)
    records = records_by_request(admin, account_id, ids)
    for request_id in ids:
        record = records[request_id]
        assert record["kind"] == "passthrough"
        assert record["cost"] == "0.002500"
        assert record["model"] == "m"
        assert record["status"] == "ok"
    assert micros(admin.account(account_id)["balance"]) == micros("1.00") - 3 * micros(PRICE)


async def test_a_passthrough_call_is_refused_like_any_call(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """No key: 401; a model the account is not subscribed to: 403; an unknown model: 404;
    a balance below the price: 402; the upstream's own error passes through at no cost. None
    of them leaves a record or moves the balance."""
    admin = Admin(gw.url)
    url = gw.url + "/v1/moderations"
    status, _, _ = await _post(url, BODY, {})
    assert status == 401
    poor, key = admin.funded(["m"], amount="0.001")
    auth = {"Authorization": f"Bearer {key}"}
    status, _, raw = await _post(url, BODY, auth)
    assert status == 402, raw
    assert orjson.loads(raw)["error"]["code"] == "insufficient_balance"
    status, _, raw = await _post(url, {**BODY, "model": "nope"}, auth)
    assert status == 404
    assert orjson.loads(raw)["error"]["code"] == "model_not_found"
    unsubscribed = admin.create_account()
    admin.ok("POST", f"/admin/accounts/{unsubscribed}/topups", {"amount": "1.00"})
    other_key = admin.ok("POST", f"/admin/accounts/{unsubscribed}/keys")["key"]
    status, _, raw = await _post(url, BODY, {"Authorization": f"Bearer {other_key}"})
    assert status == 403
    assert orjson.loads(raw)["error"]["code"] == "model_not_subscribed"
    funded, key = admin.funded(["m"], amount="1.00")
    failing = {"Authorization": f"Bearer {key}", "x-mock-status": "500"}
    status, headers, _ = await _post(url, BODY, failing)
    assert status == 500
    assert headers["x-gateway-cost"] == "0.000000"
    for account_id, balance in (
        (poor, "0.001000"),
        (unsubscribed, "1.000000"),
        (funded, "1.000000"),
    ):
        wait_no_holds(redis_client, account_id)
        assert admin.account(account_id)["balance"] == balance
        assert admin.usage(account_id) == []


def test_only_routes_of_its_own_may_be_listed() -> None:
    """A metered route (or one outside /v1/) cannot be made a flat-priced passthrough, and no
    path is listed twice: each refused at its path."""
    for routes, where, message in (
        ([{"path": "/v1/chat/completions", "price_per_call": "1"}], "[0].path", "metered route"),
        ([{"path": "/moderations", "price_per_call": "1"}], "[0].path", "under /v1/"),
        ([{"path": "/v1/models/x", "price_per_call": "1"}], "[0].path", "metered route"),
        ([{"path": "/v1/moderations", "price_per_call": 0.1}], "[0].price_per_call", "decimal"),
        (
            [{"path": "/v1/a", "price_per_call": "1"}, {"path": "/v1/a", "price_per_call": "2"}],
            "",
            "listed twice",
        ),
    ):
        with pytest.raises(ConfigError) as info:
            parse_settings({"proxy": {"passthrough": routes}})
        (problem,) = info.value.problems
        assert problem.startswith(f"proxy.passthrough{where}:"), problem
        assert message in problem, problem
