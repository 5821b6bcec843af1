"""Strict enforcement: a prepaid balance is never overspent; a stream it cannot cover ends
cleanly with finish_reason "length"."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import aiohttp
import orjson
import redis

from tests.admin_client import Admin
from tests.billing.checks import assert_invariant, expected_cost, micros
from tests.conftest import model_entry
from tests.procs import Proc


def _model(url: str) -> dict[str, object]:
    # Hold 10 output tokens per step; the mock answers 60 tokens when asked for none.
    entry = model_entry("m", url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": "1000", "output_per_million": "1000"}
    entry["hold_output_tokens"] = 10
    return entry


async def _stream(gw: Proc, key: str, usage: bool) -> tuple[bytes, dict[str, str]]:
    body: dict[str, object] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
    }
    if usage:
        body["stream_options"] = {"include_usage": True}
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        assert resp.status == 200
        return await resp.read(), dict(resp.headers)


async def test_strict_stops_a_stream_the_balance_cannot_cover(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """With enough balance for the first hold and two extensions, the stream is extended twice
    and then ends cleanly: a final chunk with finish_reason "length", [DONE], a complete
    answer for the client. The balance never goes below zero and the account stays active."""
    from tests.procs import start_mock

    mock = start_mock(mock_a.log_path.parent, "--max-tokens", "60", "--token-delay", "0.001")
    try:
        gw = make_gateway([_model(mock.url)], billing={"enforcement": "strict"})
        admin = Admin(gw.url)
        account_id = admin.create_account()
        admin.subscribe(account_id, "m")
        key = admin.new_key(account_id)
        # Prompt of this request: a few tokens; price 1000/M = 1 milli per token = 1000 micros.
        admin.topup(account_id, "0.040000")
        raw, _ = await _stream(gw, key, usage=True)
    finally:
        mock.stop()
    events = [e for e in raw.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]"
    finals = [orjson.loads(e[6:]) for e in events[:-1]]
    stop = [c for c in finals if c.get("choices") and c["choices"][0].get("finish_reason")]
    assert [c["choices"][0]["finish_reason"] for c in stop] == ["length"]
    usage = finals[-1]["usage"]
    delivered = sum(
        1 for c in finals if c.get("choices") and c["choices"][0].get("delta", {}).get("content")
    )
    assert 0 < delivered < 60
    account, records = assert_invariant(admin, redis_client, account_id, micros("0.040000"))
    (record,) = records
    assert record["completion_tokens"] == usage["completion_tokens"] == delivered
    assert micros(record["cost"]) == expected_cost(
        record["prompt_tokens"], delivered, "1000", "1000"
    )
    assert micros(account["balance"]) >= 0
    assert account["state"] == "active"


async def test_postpaid_lets_the_stream_finish_into_arrears(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """The default (postpaid) lets the same stream finish; the account falls into arrears."""
    from tests.procs import start_mock

    mock = start_mock(mock_a.log_path.parent, "--max-tokens", "60")
    try:
        gw = make_gateway([_model(mock.url)])
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="0.040000")
        raw, _ = await _stream(gw, key, usage=False)
    finally:
        mock.stop()
    assert raw.endswith(b"data: [DONE]\n\n")
    assert b'"finish_reason":"stop"' in raw
    account, records = assert_invariant(admin, redis_client, account_id, micros("0.040000"))
    assert records[0]["completion_tokens"] == 60
    assert micros(account["balance"]) < 0
    assert account["state"] == "frozen"


async def test_strict_never_below_zero_with_29_concurrent_streams(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """29 concurrent streams with no max_tokens on a balance that covers their first holds and
    a few extensions: extensions come only from the available balance (balance minus every
    open hold), chunks that would outgrow a hold wait for its extension, and no call is charged
    more than it holds. The balance ends at zero or above and the account stays active."""
    from tests.procs import start_mock

    mock = start_mock(mock_a.log_path.parent, "--max-tokens", "60", "--token-delay", "0")
    try:
        gw = make_gateway([_model(mock.url)], billing={"enforcement": "strict"})
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="0.600000")
        answers = await asyncio.gather(*(_stream(gw, key, usage=False) for _ in range(29)))
    finally:
        mock.stop()
    for raw, _ in answers:
        assert raw.endswith(b"data: [DONE]\n\n")
    account, records = assert_invariant(admin, redis_client, account_id, micros("0.600000"))
    assert len(records) == 29
    assert micros(account["balance"]) >= 0, account
    assert account["state"] == "active"
    assert not [r for r in records if r["uncharged"] != "0.000000"], records


async def test_strict_non_streamed_call_is_sent_the_max_tokens_its_hold_covers(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A non-streamed strict call that names no max_tokens is sent with the `max_tokens` its
    hold covers (the model's hold_output_tokens, 10): the upstream, which would answer 60
    tokens, stops at 10, and a balance that covers exactly the hold ends at zero or above."""
    from tests.procs import start_mock

    mock = start_mock(mock_a.log_path.parent, "--max-tokens", "60")
    try:
        gw = make_gateway([_model(mock.url)], billing={"enforcement": "strict"})
        admin = Admin(gw.url)
        account_id, key = admin.funded(["m"], amount="0.040000")
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
            session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
        ):
            assert resp.status == 200
            answer = orjson.loads(await resp.read())
        async with (
            aiohttp.ClientSession() as session,
            session.get(mock.url + "/debug/last-request") as r,
        ):
            sent = orjson.loads((await r.json())["body"])
    finally:
        mock.stop()
    assert sent["max_tokens"] == 10
    assert answer["usage"]["completion_tokens"] == 10
    account, records = assert_invariant(admin, redis_client, account_id, micros("0.040000"))
    assert records[0]["completion_tokens"] == 10
    assert micros(account["balance"]) >= 0
    assert account["state"] == "active"


async def test_strict_lets_a_stream_that_names_its_limit_run_to_it(
    make_gateway: Callable[..., Proc], mock_a: Proc, redis_client: redis.Redis
) -> None:
    """A stream that names `max_tokens` is held for all of it at admission: on a balance of
    exactly that hold it gets every token it asked for (the upstream stops there), with no
    extension and no early end, and is charged exactly its usage, within the hold."""
    from tests.procs import start_mock

    mock = start_mock(mock_a.log_path.parent, "--max-tokens", "60", "--token-delay", "0.001")
    try:
        gw = make_gateway([_model(mock.url)], billing={"enforcement": "strict"})
        admin = Admin(gw.url)
        account_id = admin.create_account()
        admin.subscribe(account_id, "m")
        key = admin.new_key(account_id)
        prompt = 3 + 3 + 1 + 1  # the cookbook's count of one user message "hi" on o200k_base
        hold = (prompt + 40) * 1000  # 1000 micros a token either way
        admin.topup(account_id, f"0.{hold:06d}")
        body = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "max_tokens": 40,
            "stream_options": {"include_usage": True},
        }
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
            session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
        ):
            assert resp.status == 200
            raw = await resp.read()
    finally:
        mock.stop()
    chunks = [orjson.loads(e[6:]) for e in raw.split(b"\n\n") if e and e != b"data: [DONE]"]
    delivered = sum(
        1 for c in chunks if c.get("choices") and c["choices"][0]["delta"].get("content")
    )
    assert delivered == 40
    account, records = assert_invariant(admin, redis_client, account_id, hold)
    (record,) = records
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, 40)
    assert record["usage_source"] == "upstream"
    assert micros(record["cost"]) == hold
    assert account["balance"] == "0.000000"
