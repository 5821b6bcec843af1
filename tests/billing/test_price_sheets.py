"""Price sheets with dates (issue 14): `pricing` as a list of sheets, each with its
`effective_from`; a call is billed under the sheet in force when it was admitted, its record
names that sheet's version, and `GET /admin/prices` lists the sheets by the same versions. A
reload may schedule new prices but never rewrite prices that have billed calls. Real gateway
processes, the real mock upstream, the real store; money from exact fractions.
"""

from __future__ import annotations

import asyncio
import math
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import redis
import yaml

from gateway.config import ConfigError, load_settings
from tests.admin_client import Admin
from tests.billing.checks import (
    ceil_micros,
    exact_micros,
    micros,
    model_prices,
    records_by_request,
    sse_events,
    wait_no_holds,
)
from tests.conftest import model_entry
from tests.procs import Proc, rewrite_config

TOPUP = "20.00"
BASE = {"input_per_million": "0.333333", "output_per_million": "1.777777"}
LATER = {
    "input_per_million": "0.700001",
    "output_per_million": "2.300003",
    "cached_input_per_million": "0.050007",
}
NO_WATCH = {"watch_config": False}  # a test's edit applies at its POST /admin/reload only


def _iso(seconds: float) -> str:
    """A moment as ISO 8601 in UTC with a `Z`, whole seconds."""
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _iso_ms(seconds: float) -> str:
    """The same moment as the gateway's API writes it (milliseconds)."""
    return _iso(seconds).removesuffix("Z") + ".000Z"


def _model(url: str, pricing: Any) -> dict[str, Any]:
    entry = model_entry("m", url, upstream_model="mock-model")
    entry["pricing"] = pricing
    return entry


def _at(when: str, price: str = "1") -> dict[str, Any]:
    """A dated sheet of one price for both classes."""
    return {"effective_from": when, "input_per_million": price, "output_per_million": price}


def _cost(prices: dict[str, str], prompt: int, cached: int, completion: int) -> int:
    """A call's cost under one sheet (cached input at its own price, or the input's)."""
    cached_price = prices.get("cached_input_per_million", prices["input_per_million"])
    return ceil_micros(
        exact_micros(
            (prompt - cached, prices["input_per_million"]),
            (cached, cached_price),
            (completion, prices["output_per_million"]),
        )
    )


PROMPT, CACHED = 321, 123  # what the mock reports for every call here


async def _call(
    gw: Proc, key: str, max_tokens: int = 5, stream: bool = False, delay: float = 0.0
) -> tuple[str, int]:
    """One call (its usage fixed by headers); (request id, completion tokens reported)."""
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "which sheet"}],
        "max_tokens": max_tokens,
    }
    if stream:
        body |= {"stream": True, "stream_options": {"include_usage": True}}
    headers = {
        "Authorization": f"Bearer {key}",
        "x-mock-usage-prompt-tokens": str(PROMPT),
        "x-mock-usage-cached-tokens": str(CACHED),
    }
    if delay:
        headers["x-mock-token-delay"] = str(delay)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
        ) as resp,
    ):
        raw = await resp.read()
        assert resp.status == 200, raw
        request_id = resp.headers["x-request-id"]
    if stream:
        usage = [orjson.loads(e[6:])["usage"] for e in sse_events(raw) if b'"usage":{' in e]
        return request_id, int(usage[-1]["completion_tokens"])
    return request_id, int(orjson.loads(raw)["usage"]["completion_tokens"])


def _versions(sheets: list[dict[str, Any]]) -> list[str]:
    return [sheet["version"] for sheet in sheets]


async def test_the_sheet_in_force_at_admission_bills_the_call(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A base sheet and one dated a few seconds on: calls admitted before the start (a stream
    among them that runs on past it) are billed under the base, a call after it under the new
    sheet; each record names its sheet's version, and /admin/prices lists the same versions
    (current + scheduled before the start, current + replaced after it)."""
    start = math.ceil(time.time()) + 7
    gw = make_gateway(
        [_model(mock_a.url, [BASE, {"effective_from": _iso(start), **LATER}])], server=NO_WATCH
    )
    assert time.time() < start - 3, "the gateway took too long to start for this test"
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount=TOPUP)

    before = model_prices(admin, "m")
    assert before["billing"] == "tokens"
    current = before["current"]
    assert current["effective_from"] is None
    assert current["input_per_million"] == BASE["input_per_million"]
    assert current["cached_input_per_million"] == BASE["input_per_million"]  # the default
    (scheduled,) = before["scheduled"]
    assert scheduled["effective_from"] == _iso_ms(start)
    assert scheduled["input_per_million"] == LATER["input_per_million"]
    assert scheduled["cached_input_per_million"] == LATER["cached_input_per_million"]
    assert scheduled["cache_write_per_million"] == LATER["input_per_million"]
    assert scheduled["reasoning_per_million"] == LATER["output_per_million"]
    assert before["replaced"] == []
    base_version, later_version = current["version"], scheduled["version"]
    assert base_version != later_version

    early_id, early_tokens = await _call(gw, key)
    assert time.time() < start - 1.5
    # A stream admitted a second before the start that ends after it.
    await asyncio.sleep(max(0.0, start - 1.0 - time.time()))
    stream_id, stream_tokens = await _call(gw, key, max_tokens=25, stream=True, delay=0.1)
    assert time.time() > start, "the stream ended before the new sheet started"
    late_id, late_tokens = await _call(gw, key, max_tokens=7)

    after = model_prices(admin, "m")
    assert after["current"]["version"] == later_version
    assert after["current"]["effective_from"] == _iso_ms(start)
    assert after["scheduled"] == []
    assert _versions(after["replaced"]) == [base_version]
    assert after["replaced"][0] == current  # the same sheet, shown the same way

    records = records_by_request(admin, account_id, [early_id, stream_id, late_id])
    expected = {
        early_id: (base_version, _cost(BASE, PROMPT, CACHED, early_tokens)),
        stream_id: (base_version, _cost(BASE, PROMPT, CACHED, stream_tokens)),
        late_id: (later_version, _cost(LATER, PROMPT, CACHED, late_tokens)),
    }
    for request_id, (version, cost) in expected.items():
        record = records[request_id]
        assert record["price_version"] == version, (request_id, record)
        assert micros(record["cost"]) == cost, (request_id, record, cost)
    assert stream_tokens == 25
    assert early_tokens == 5
    assert late_tokens == 7
    wait_no_holds(redis_client, account_id)
    balance = micros(admin.account(account_id)["balance"])
    assert micros(TOPUP) - balance == sum(cost for _, cost in expected.values())


async def test_a_reload_cannot_remove_a_base_sheet_that_billed_calls(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """The base sheet bills a call, a dated sheet then starts: a reload that leaves the base
    out (the dated sheet kept as it is) would drop prices that billed calls from the history
    (/admin/prices would no longer list the version the record cites), as removing a started
    dated sheet would: refused with 400 naming models[0].pricing, the listing unchanged."""
    start = math.ceil(time.time()) + 5
    gw = make_gateway(
        [_model(mock_a.url, [BASE, {"effective_from": _iso(start), **LATER}])], server=NO_WATCH
    )
    assert time.time() < start - 2, "the gateway took too long to start for this test"
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount=TOPUP)
    early_id, _ = await _call(gw, key)
    assert time.time() < start
    base_version = model_prices(admin, "m")["current"]["version"]
    await asyncio.sleep(max(0.0, start + 0.2 - time.time()))
    listing = model_prices(admin, "m")
    assert _versions(listing["replaced"]) == [base_version]

    def drop_base(config: dict[str, Any]) -> None:
        del config["models"][0]["pricing"][0]

    rewrite_config(gw, drop_base)
    await _refused(admin)
    assert model_prices(admin, "m") == listing
    record = records_by_request(admin, account_id, [early_id])[early_id]
    assert record["price_version"] == base_version


@pytest.mark.parametrize("when", ["1970-01-01T00:00:00Z", "1969-07-20T20:17:00Z"])
async def test_a_sheet_dated_at_or_before_the_epoch_replaces_the_base(
    make_gateway: Callable[..., Proc], mock_a: Proc, when: str
) -> None:
    """A dated sheet that started long ago (at the Unix epoch, or before it) is in force, not
    the base sheet it replaced: the call is billed at its prices and /admin/prices shows it
    current, the base replaced."""
    dated = {"effective_from": when, **LATER}
    gw = make_gateway([_model(mock_a.url, [dated, BASE])], server=NO_WATCH)
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount=TOPUP)
    request_id, tokens = await _call(gw, key)
    listing = model_prices(admin, "m")
    record = records_by_request(admin, account_id, [request_id])[request_id]
    assert micros(record["cost"]) == _cost(LATER, PROMPT, CACHED, tokens), record
    assert listing["current"]["input_per_million"] == LATER["input_per_million"], listing
    assert [s["input_per_million"] for s in listing["replaced"]] == [BASE["input_per_million"]]
    assert record["price_version"] == listing["current"]["version"]


async def _refused(admin: Admin) -> str:
    reply = admin.call("POST", "/admin/reload")
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["code"] == "invalid_request"
    message = str(error["message"])
    assert message.startswith("config refused; the old config keeps serving: "), message
    assert "models[0].pricing" in message, message
    return message


async def test_a_reload_cannot_change_a_started_sheet(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """With a dated sheet already in force, a reload that changes it, removes it, changes the
    base sheet it replaced, or adds a sheet starting in the past is refused with 400 naming
    models[0].pricing; the old prices keep billing, under the same version."""
    started = math.floor(time.time()) - 3600
    gw = make_gateway(
        [_model(mock_a.url, [BASE, {"effective_from": _iso(started), **LATER}])], server=NO_WATCH
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount=TOPUP)
    listing = model_prices(admin, "m")
    version = listing["current"]["version"]
    assert listing["current"]["effective_from"] == _iso_ms(started)
    assert listing["current"]["input_per_million"] == LATER["input_per_million"]
    assert [s["input_per_million"] for s in listing["replaced"]] == [BASE["input_per_million"]]
    assert listing["scheduled"] == []

    first_id, _ = await _call(gw, key)

    def change_dated(config: dict[str, Any]) -> None:
        config["models"][0]["pricing"][1]["input_per_million"] = "0.9"

    def remove_dated(config: dict[str, Any]) -> None:
        del config["models"][0]["pricing"][1]

    def change_base(config: dict[str, Any]) -> None:
        config["models"][0]["pricing"][0]["output_per_million"] = "9"

    def add_past(config: dict[str, Any]) -> None:
        config["models"][0]["pricing"].append(_at(_iso(time.time() - 60), "5"))

    assert gw.config_path is not None
    original = gw.config_path.read_text()
    ids = [first_id]
    for edit in (change_dated, remove_dated, change_base, add_past):
        gw.config_path.write_text(original)
        rewrite_config(gw, edit)
        message = await _refused(admin)
        assert "immutable" in message, (edit.__name__, message)
        request_id, tokens = await _call(gw, key)
        assert tokens == 5
        ids.append(request_id)
        assert model_prices(admin, "m") == listing, edit.__name__

    records = records_by_request(admin, account_id, ids)
    for request_id in ids:
        record = records[request_id]
        assert record["price_version"] == version
        assert micros(record["cost"]) == _cost(LATER, PROMPT, CACHED, 5)
    wait_no_holds(redis_client, account_id)
    spent = micros(TOPUP) - micros(admin.account(account_id)["balance"])
    assert spent == len(ids) * _cost(LATER, PROMPT, CACHED, 5)


async def test_a_reload_may_schedule_a_future_sheet(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """Adding a sheet dated later is accepted: /admin/prices shows it scheduled, the versions
    of the sheets already there unchanged, and calls go on under the sheet in force."""
    dated = {"effective_from": _iso(time.time() - 3600), **LATER}
    gw = make_gateway([_model(mock_a.url, [BASE, dated])], server=NO_WATCH)
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount=TOPUP)
    listing = model_prices(admin, "m")
    future = math.floor(time.time()) + 3600
    rewrite_config(
        gw,
        lambda config: config["models"][0]["pricing"].append(
            {"effective_from": _iso(future), "input_per_million": "7", "output_per_million": "8"}
        ),
    )
    reply = admin.call("POST", "/admin/reload")
    assert reply.status == 200, reply.body
    assert reply.json()["reloaded"] is True
    now = model_prices(admin, "m")
    assert now["current"] == listing["current"]
    assert now["replaced"] == listing["replaced"]
    (scheduled,) = now["scheduled"]
    assert scheduled["effective_from"] == _iso_ms(future)
    assert (scheduled["input_per_million"], scheduled["output_per_million"]) == (
        "7.000000",
        "8.000000",
    )
    assert scheduled["version"] not in {listing["current"]["version"]} | set(
        _versions(listing["replaced"])
    )
    request_id, _ = await _call(gw, key)
    record = records_by_request(admin, account_id, [request_id])[request_id]
    assert record["price_version"] == listing["current"]["version"]
    assert micros(record["cost"]) == _cost(LATER, PROMPT, CACHED, 5)


@pytest.mark.parametrize("form", ["mapping", "schedule"])
async def test_a_base_change_before_any_dated_sheet_is_a_price_change_from_now_on(
    make_gateway: Callable[..., Proc], mock_a: Proc, form: str
) -> None:
    """While no dated sheet has started, the base sheet may change: the next call is billed at
    the new base under a new version; the call before it keeps its own."""
    future = {"effective_from": _iso(time.time() + 3600), **LATER}
    pricing: Any = dict(BASE) if form == "mapping" else [dict(BASE), future]
    gw = make_gateway([_model(mock_a.url, pricing)], server=NO_WATCH)
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount=TOPUP)
    old = model_prices(admin, "m")
    first_id, _ = await _call(gw, key)
    new_base = {"input_per_million": "0.444449", "output_per_million": "1.111113"}

    def change(config: dict[str, Any]) -> None:
        if form == "mapping":
            config["models"][0]["pricing"] = dict(new_base)
        else:
            config["models"][0]["pricing"][0] = dict(new_base)

    rewrite_config(gw, change)
    reply = admin.call("POST", "/admin/reload")
    assert reply.status == 200, reply.body
    assert reply.json()["reloaded"] is True
    second_id, _ = await _call(gw, key)
    now = model_prices(admin, "m")
    assert now["current"]["input_per_million"] == new_base["input_per_million"]
    assert now["current"]["version"] != old["current"]["version"]
    assert now["scheduled"] == old["scheduled"]  # the dated sheet keeps its version
    records = records_by_request(admin, account_id, [first_id, second_id])
    assert records[first_id]["price_version"] == old["current"]["version"]
    assert micros(records[first_id]["cost"]) == _cost(BASE, PROMPT, CACHED, 5)
    assert records[second_id]["price_version"] == now["current"]["version"]
    assert micros(records[second_id]["cost"]) == _cost(new_base, PROMPT, CACHED, 5)


# -- validation ------------------------------------------------------------------------

GOOD = {"name": "a", "pricing": dict(BASE), "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}


def _sheets(*sheets: dict[str, Any]) -> str:
    """A config file whose second model (models[1]) has these sheets, as YAML text."""
    bad = {"name": "b", "pricing": list(sheets), "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}
    return yaml.safe_dump({"models": [GOOD, bad]})


SOON, LATER_STILL = _iso(time.time() + 86400), _iso(time.time() + 2 * 86400)
INVALID = [
    ("two-bases", _sheets(BASE, {**BASE, "input_per_million": "2"}), "models[1].pricing"),
    ("same-start", _sheets(BASE, _at(SOON, "2"), _at(SOON, "3")), "models[1].pricing"),
    (
        "same-instant-other-zone",
        _sheets(BASE, _at("2031-01-01T00:00:00Z"), _at("2031-01-01T01:00:00+01:00", "2")),
        "models[1].pricing",
    ),
    (
        "no-zone",
        _sheets(BASE, _at("2031-01-01T00:00:00")),
        "models[1].pricing[1].effective_from",
    ),
    (
        "no-zone-yaml-timestamp",  # unquoted: YAML reads a naive datetime
        _sheets(BASE, _at("2031-01-01T00:00:00")).replace(
            "'2031-01-01T00:00:00'", "2031-01-01T00:00:00"
        ),
        "models[1].pricing[1].effective_from",
    ),
    ("only-future", _sheets(_at(SOON), _at(LATER_STILL, "2")), "models[1].pricing"),
    (
        "one-future-mapping",
        yaml.safe_dump(
            {
                "models": [
                    GOOD,
                    {"name": "b", "pricing": _at(SOON), "upstreams": GOOD["upstreams"]},
                ]
            }
        ),
        "models[1].pricing",
    ),
]


def _names(problem: str, path: str) -> bool:
    """Whether a problem line is reported at `path` (a check of the whole schedule may be
    printed `models[1]: pricing: ...`, the model's own check, or `models[1].pricing: ...`)."""
    return problem.replace(": pricing:", ".pricing:", 1).startswith(path + ":") or (
        problem.startswith(path + ":")
    )


@pytest.mark.parametrize(("text", "path"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID])
def test_an_invalid_schedule_is_refused_at_its_path(tmp_path: Path, text: str, path: str) -> None:
    """load_settings refuses the file with one problem, naming the bad model's pricing."""
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, require_secrets=False)
    problems = info.value.problems
    assert len(problems) == 1, problems
    assert _names(problems[0], path), problems


def test_a_valid_schedule_loads(tmp_path: Path) -> None:
    """A base, a sheet dated in the past and one in the future, in any order, zones mixed."""
    text = _sheets(_at(SOON, "3"), BASE, _at("2020-06-01T02:00:00+02:00", "2"))
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    settings = load_settings(config, require_secrets=False)
    starts = [sheet.effective_from_ms for sheet in settings.models[1].price_sheets]
    assert starts[0] is None
    assert starts[1:] == [
        int(datetime(2020, 6, 1, tzinfo=UTC).timestamp() * 1000),
        int(datetime.strptime(SOON, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()) * 1000,
    ]


@pytest.mark.parametrize("case", ["two-bases", "no-zone", "only-future"])
def test_check_config_refuses_an_invalid_schedule(tmp_path: Path, case: str) -> None:
    """`inference-gateway check-config` exits 1 and prints the path of the fault."""
    (text, path) = next(c[1:] for c in INVALID if c[0] == case)
    config = tmp_path / "gateway.yaml"
    config.write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = [line.strip() for line in result.stderr.splitlines() if line.startswith("  ")]
    assert len(lines) == 1, result.stderr
    assert _names(lines[0], path), result.stderr
