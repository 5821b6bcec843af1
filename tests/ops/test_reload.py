"""Hot reload: models and prices change without a restart; a bad edit changes nothing."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import redis
import yaml

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import expected_cost, micros, wait_no_holds
from tests.config.bounds import (
    DURATIONS,
    INTS,
    too_large,
    too_large_message_start,
    too_small,
    too_small_message,
    values_at,
    with_value,
    with_values,
)
from tests.conftest import model_entry
from tests.procs import Proc, rewrite_config


def _priced(name: str, url: str, price: str) -> dict[str, Any]:
    entry = model_entry(name, url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": price, "output_per_million": price}
    return entry


async def _status(session: aiohttp.ClientSession, gw: Proc, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp:
        await resp.read()
        return resp.status


def _metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_new_model_answers_while_old_stream_keeps_its_price(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A model added to the file answers within two seconds, while a stream started before the
    edit runs on and settles at the price it started under (the edit also doubles that price)."""
    gw = make_gateway([_priced("m", mock_a.url, "1")])
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"])
    headers = {"Authorization": f"Bearer {key}"}
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20}
    async with aiohttp.ClientSession(headers=headers) as session:
        stream = await session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps({**body, "stream": True, "stream_options": {"include_usage": True}}),
            headers={"x-mock-token-delay": "0.15"},
        )
        assert stream.status == 200

        def add_model(config: dict[str, Any]) -> None:
            config["models"][0]["pricing"] = {"input_per_million": "2", "output_per_million": "2"}
            config["models"].append(_priced("fresh", mock_a.url, "1"))

        edited = time.monotonic()
        rewrite_config(gw, add_model)
        while await _status(session, gw, "fresh") == 404:
            assert time.monotonic() - edited < 2.0, "the new model did not answer within 2 s"
            await asyncio.sleep(0.05)
        answered = time.monotonic() - edited
        raw = await stream.read()
        stream.release()
    assert answered < 2.0
    assert raw.endswith(b"data: [DONE]\n\n")
    usage = orjson.loads([e for e in raw.split(b"\n\n") if b'"usage":{' in e][-1][6:])["usage"]
    wait_no_holds(redis_client, account_id)
    record = admin.usage(account_id)[0]
    assert micros(record["cost"]) == expected_cost(usage["prompt_tokens"], 20, "1", "1")
    # A call after the edit is billed at the new price. Subscribing to the new model works.
    admin.subscribe(account_id, "fresh")
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as r:
            usage = orjson.loads(await r.read())["usage"]
        assert await _status(session, gw, "fresh") == 200
    record = admin.usage(account_id)[1]
    assert micros(record["cost"]) == expected_cost(usage["prompt_tokens"], 20, "2", "2")


async def test_invalid_edit_keeps_the_old_config(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """An invalid edit is refused, logged with the field's path and counted; the old config
    keeps serving; POST /admin/reload answers 400 with the problem."""
    gw = make_gateway([_priced("m", mock_a.url, "1")])
    admin = Admin(gw.url)
    _, key = admin.funded(["m"])

    def break_it(config: dict[str, Any]) -> None:
        config["models"][0]["pricing"]["input_per_million"] = 0.5  # a float: refused
        config["models"].append(_priced("fresh", mock_a.url, "1"))

    rewrite_config(gw, break_it)
    deadline = time.monotonic() + 5
    while "config reload refused" not in gw.log():
        assert time.monotonic() < deadline, gw.log()
        await asyncio.sleep(0.05)
    assert "models[0].pricing.input_per_million" in gw.log()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        assert await _status(session, gw, "m") == 200
        assert await _status(session, gw, "fresh") == 404
        async with session.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    assert _metric(text, 'gateway_config_reloads_total{result="error"}') >= 1
    reply = admin.call("POST", "/admin/reload")
    assert reply.status == 400
    assert "models[0].pricing.input_per_million" in reply.json()["error"]["message"]


async def test_sighup_and_admin_reload(make_gateway: Callable[..., Proc], mock_a: Proc) -> None:
    """With file watching off, an edit waits for SIGHUP or POST /admin/reload."""
    gw = make_gateway([_priced("m", mock_a.url, "1")], server={"watch_config": False})
    admin = Admin(gw.url)
    _, key = admin.funded(["m"])
    rewrite_config(gw, lambda c: c["models"].append(_priced("one", mock_a.url, "1")))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        await asyncio.sleep(0.5)
        assert await _status(session, gw, "one") == 404  # not watched: not applied yet
        gw.popen.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while await _status(session, gw, "one") == 404:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        rewrite_config(gw, lambda c: c["models"].append(_priced("two", mock_a.url, "1")))
        assert await _status(session, gw, "two") == 404
        reply = admin.call("POST", "/admin/reload")
        assert reply.status == 200, reply.body
        assert "two" in reply.json()["models"]
        assert await _status(session, gw, "two") == 403  # exists now; not subscribed
    assert any(event.get("trigger") == "SIGHUP" for event in gw.events())


def _write(gw: Proc, config: dict[str, Any]) -> None:
    assert gw.config_path is not None
    tmp = gw.config_path.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(config))
    tmp.replace(gw.config_path)


async def test_out_of_bounds_values_are_refused_at_reload(
    make_gateway: Callable[..., Proc], mock_a: Proc, own_store: EmbeddedStore
) -> None:
    """Every duration at zero (every int one below its minimum), and every field above its
    maximum, is refused by POST /admin/reload with 400 naming the path and the bound, and the
    running config stays; every field at its minimum at once, then at its maximum, is applied.
    On a store of its own: the boundary configs run the arrears timer with 1s periods."""
    gw = make_gateway(
        [_priced("m", mock_a.url, "1")],
        server={"watch_config": False},
        store={"url": own_store.url},
    )
    admin = Admin(gw.url)
    _, key = admin.funded(["m"])
    assert gw.config_path is not None
    running = yaml.safe_load(gw.config_path.read_text())
    edited = {**running, "models": [*running["models"], _priced("fresh", mock_a.url, "1")]}
    cases = [(b, too_small(b), too_small_message(b, too_small(b))) for b in (*DURATIONS, *INTS)]
    cases += [(b, too_large(b), too_large_message_start(b)) for b in (*DURATIONS, *INTS)]
    refused = 0
    for bound, value, expected in cases:
        if value is None:  # no maximum
            continue
        _write(gw, with_value(edited, bound.path, value))
        reply = admin.call("POST", "/admin/reload")
        assert reply.status == 400, (bound.path, value, reply.body)
        message = reply.json()["error"]["message"]
        assert message.startswith("config refused; the old config keeps serving: "), message
        assert expected in message, (bound.path, value, message)
        refused += 1
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        assert await _status(session, gw, "m") == 200
        assert await _status(session, gw, "fresh") == 404  # none of the edits was applied
        async with session.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    assert _metric(text, 'gateway_config_reloads_total{result="error"}') == refused
    for which in ("low", "high"):
        _write(gw, with_values(edited, values_at(which)))
        reply = admin.call("POST", "/admin/reload")
        assert reply.status == 200, (which, reply.body)
        assert reply.json()["models"] == ["m", "fresh"]
