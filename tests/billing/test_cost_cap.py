"""A client's cap on what one call may cost, `x-gateway-max-cost` (issue 14): a prompt that
alone may cost more is refused (402 `cost_cap_exceeded`, nothing billed); a stream is ended
cleanly once its output reaches what the cap covers; a whole answer's upstream is sent a
`max_tokens` the cap covers; the hold never exceeds the cap; a malformed cap is 400. Real
gateway processes, the real mock upstream (`GET /debug/last-request` shows what the gateway
forwarded), the real store; money from exact fractions of the decimal price strings.
"""

from __future__ import annotations

import asyncio
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
    micros,
    records_by_request,
    sse_events,
    wait_no_holds,
)
from tests.conftest import GATEWAY_ENV, gateway_config, model_entry
from tests.procs import Proc, start_gateway

CAP = "0.05"
MAX_COST = "x-gateway-max-cost"
# `capped`: a cap of 0.05 covers a short prompt and some tens of output tokens.
IN, OUT = "10.5", "987.654321"
# `dear-in`: a prompt of more than 50 tokens alone may cost more than 0.05.
DEAR_IN, DEAR_OUT = "1000", "1"
TOPUP = "10.00"


def _priced(name: str, url: str, input_price: str, output_price: str) -> dict[str, Any]:
    entry = model_entry(name, url, upstream_model="mock-model")
    entry["pricing"] = {"input_per_million": input_price, "output_per_million": output_price}
    return entry


@pytest.fixture(scope="module")
def gw(
    tmp_path_factory: pytest.TempPathFactory, valkey: EmbeddedStore, mock_a: Proc
) -> Iterator[Proc]:
    models = [
        _priced("capped", mock_a.url, IN, OUT),
        _priced("dear-in", mock_a.url, DEAR_IN, DEAR_OUT),
    ]
    proc = start_gateway(
        tmp_path_factory.mktemp("cost-cap"), gateway_config(valkey, models), GATEWAY_ENV
    )
    yield proc
    proc.stop()


def _room(prompt_tokens: int, cap: str = CAP) -> int:
    """The most output tokens a call of `prompt_tokens` can have under `capped`'s prices and
    still cost at most `cap` (exact fractions)."""
    left = Fraction(micros(cap)) - Fraction(prompt_tokens) * Fraction(IN)
    return int(left // Fraction(OUT))


def _cost(prompt: int, completion: int, prices: tuple[str, str] = (IN, OUT)) -> int:
    return ceil_micros(exact_micros((prompt, prices[0]), (completion, prices[1])))


async def _post(
    gw: Proc, key: str, body: dict[str, Any], headers: dict[str, str]
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}", **headers},
        ) as resp,
    ):
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, await resp.read()


def _last_forwarded(mock: Proc) -> Any:
    return Admin(mock.url, token=None).call("GET", "/debug/last-request").json()


def _chat(model: str, content: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def _nothing_billed(admin: Admin, store: redis.Redis, account_id: str) -> None:
    wait_no_holds(store, account_id)
    account = admin.account(account_id)
    assert micros(account["balance"]) == micros(account["available"]) == micros(TOPUP), account
    assert account["held"] == "0.000000"
    assert admin.usage(account_id) == []


@pytest.mark.parametrize("stream", [False, True])
async def test_a_prompt_dearer_than_the_cap_is_refused(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis, stream: bool
) -> None:
    """A prompt of some 130 tokens at 0.001 each may cost more than a 0.05 cap before any
    output: 402 `cost_cap_exceeded` naming the header, the upstream never called, nothing
    billed or held, no usage record. The same call under a cap that covers it is answered."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["dear-in"], amount=TOPUP)
    marker = f"refused-{account_id}"
    body = _chat("dear-in", marker + " the" * 120, max_tokens=5, stream=stream)
    forwarded_before = _last_forwarded(mock_a)
    status, _, raw = await _post(gw, key, body, {MAX_COST: CAP})
    assert status == 402, raw
    error = orjson.loads(raw)["error"]
    assert error["code"] == "cost_cap_exceeded", error
    assert error["param"] == MAX_COST
    assert _last_forwarded(mock_a) == forwarded_before
    await asyncio.sleep(0.3)  # a settlement, if one were (wrongly) under way, lands by now
    _nothing_billed(admin, redis_client, account_id)
    # Control: a cap that covers the prompt lets the same call through.
    status, headers, raw = await _post(gw, key, body, {MAX_COST: "0.50"})
    assert status == 200, raw
    assert marker in str(_last_forwarded(mock_a)["body"])
    records = records_by_request(admin, account_id, [headers["x-request-id"]])
    assert micros(records[headers["x-request-id"]]["cost"]) <= micros("0.50")


async def test_the_cap_that_covers_the_prompt_and_one_token_is_exact(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """The least cap that lets a call through covers its prompt and one output token at the
    sheet's prices, to the micro-unit: ceil(prompt x input + 1 x output). At it the upstream is
    asked for one token; one micro-unit less is 402 `cost_cap_exceeded`."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "Exactly enough")
    status, _, raw = await _post(gw, key, {**body, "max_tokens": 1}, {})
    assert status == 200, raw
    prompt = orjson.loads(raw)["usage"]["prompt_tokens"]
    least = _cost(prompt, 1)
    assert exact_micros((prompt, IN), (1, OUT)).denominator != 1  # the rounding matters
    cap = f"{least // 1_000_000}.{least % 1_000_000:06d}"
    status, _, raw = await _post(gw, key, body, {MAX_COST: cap})
    assert status == 200, (cap, raw)
    assert orjson.loads(_last_forwarded(mock_a)["body"])["max_tokens"] == 1
    assert orjson.loads(raw)["usage"]["completion_tokens"] == 1
    below = least - 1
    status, _, raw = await _post(
        gw, key, body, {MAX_COST: f"{below // 1_000_000}.{below % 1_000_000:06d}"}
    )
    assert status == 402, raw
    assert orjson.loads(raw)["error"]["code"] == "cost_cap_exceeded"
    wait_no_holds(redis_client, account_id)
    assert len(admin.usage(account_id)) == 2


def _content(event: bytes) -> str | None:
    """The content piece of a chat chunk (None if it has none)."""
    choices = orjson.loads(event[6:]).get("choices") or []
    if not choices:
        return None
    content = choices[0].get("delta", {}).get("content")
    return content or None


@pytest.mark.parametrize("include_usage", [True, False])
async def test_a_stream_is_ended_cleanly_at_the_cap(
    gw: Proc, redis_client: redis.Redis, include_usage: bool
) -> None:
    """A stream that would run to 2000 tokens under a cap covering some tens: the last content
    chunk is followed by a `finish_reason: "length"` chunk (then, if the client asked, the
    usage with its cost) and `data: [DONE]`; the call is billed for what was relayed, no more
    than the cap, and the record says what was charged."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "Tell a long story", max_tokens=2000, stream=True)
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    status, headers, raw = await _post(gw, key, body, {MAX_COST: CAP})
    assert status == 200, raw
    events = sse_events(raw)
    pieces = [i for i, event in enumerate(events) if event != b"data: [DONE]" and _content(event)]
    assert pieces, raw[:500]
    last = pieces[-1]
    assert pieces == list(range(pieces[0], last + 1))  # content, then the end
    tail = events[last + 1 :]
    assert tail[-1] == b"data: [DONE]"
    assert len(tail) == (3 if include_usage else 2), tail
    finish = orjson.loads(tail[0][6:])
    (choice,) = finish["choices"]
    assert choice["finish_reason"] == "length", finish
    assert choice["delta"] == {}
    first = orjson.loads(events[pieces[0]][6:])
    assert (finish["id"], finish["model"]) == (first["id"], first["model"])

    request_id = headers["x-request-id"]
    record = records_by_request(admin, account_id, [request_id])[request_id]
    delivered = len(pieces)  # every piece the mock sends is one token
    assert record["completion_tokens"] == delivered
    assert delivered <= _room(record["prompt_tokens"]) < 2000
    cost = _cost(record["prompt_tokens"], delivered)
    assert micros(record["cost"]) == cost <= micros(CAP)
    assert record["uncharged"] == "0.000000"
    assert record["status"] == "ok"
    wait_no_holds(redis_client, account_id)
    assert micros(TOPUP) - micros(admin.account(account_id)["balance"]) == cost
    if include_usage:
        usage_event = orjson.loads(tail[1][6:])
        assert usage_event["choices"] == []
        usage = usage_event["usage"]
        assert usage["completion_tokens"] == delivered
        assert usage["prompt_tokens"] == record["prompt_tokens"]
        assert usage["cost"] == record["cost"]
    else:
        assert b'"usage"' not in raw


LIMITS = [
    ("none", {}, "max_tokens"),
    ("max_tokens-above", {"max_tokens": 2000}, "max_tokens"),
    ("max_completion_tokens-above", {"max_completion_tokens": 2000}, "max_completion_tokens"),
]


@pytest.mark.parametrize(("fields", "field"), [c[1:] for c in LIMITS], ids=[c[0] for c in LIMITS])
async def test_a_whole_answer_is_asked_for_what_the_cap_covers(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis, fields: dict[str, int], field: str
) -> None:
    """A non-streamed call with no output limit, or one above what the cap covers, is sent
    upstream with a limit the cap covers; it is billed no more than the cap."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "Answer at length", **fields)
    status, headers, raw = await _post(gw, key, body, {MAX_COST: CAP})
    assert status == 200, raw
    usage = orjson.loads(raw)["usage"]
    sent = orjson.loads(_last_forwarded(mock_a)["body"])
    room = _room(usage["prompt_tokens"])
    assert 1 <= sent[field] <= room, (sent, room)
    assert usage["completion_tokens"] == sent[field]
    # Nothing else of the body changes (the model aside: its upstream's name).
    assert sent == {**body, "model": "mock-model", field: sent[field]}
    cost = _cost(usage["prompt_tokens"], usage["completion_tokens"])
    assert cost <= micros(CAP)
    assert micros(headers["x-gateway-cost"]) == cost
    request_id = headers["x-request-id"]
    record = records_by_request(admin, account_id, [request_id])[request_id]
    assert micros(record["cost"]) == cost
    wait_no_holds(redis_client, account_id)
    assert micros(TOPUP) - micros(admin.account(account_id)["balance"]) == cost


async def test_a_limit_within_the_cap_is_left_alone(gw: Proc, mock_a: Proc) -> None:
    """A request whose own max_tokens the cap covers reaches the upstream as it asked."""
    admin = Admin(gw.url)
    _, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "A short answer", max_tokens=10)
    status, _, raw = await _post(gw, key, body, {MAX_COST: CAP})
    assert status == 200, raw
    assert orjson.loads(_last_forwarded(mock_a)["body"]) == {**body, "model": "mock-model"}
    assert orjson.loads(raw)["usage"]["completion_tokens"] == 10


async def test_a_whole_answer_of_several_choices_is_asked_for_what_the_cap_covers(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """With `n: 4` each choice may produce the limit the upstream is sent: the four together
    must fit in what the cap covers, so the call is charged its whole cost (nothing
    uncharged) and that cost is within the cap."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "Four answers please", n=4)
    status, headers, raw = await _post(gw, key, body, {MAX_COST: CAP, "x-mock-allow-n": "true"})
    assert status == 200, raw
    usage = orjson.loads(raw)["usage"]
    sent = orjson.loads(_last_forwarded(mock_a)["body"])
    room = _room(usage["prompt_tokens"])
    cost = _cost(usage["prompt_tokens"], usage["completion_tokens"])
    request_id = headers["x-request-id"]
    record = records_by_request(admin, account_id, [request_id])[request_id]
    assert sent["n"] == 4
    assert 4 * sent["max_tokens"] <= room, (sent, room, usage, record["cost"], record["uncharged"])
    assert record["uncharged"] == "0.000000", record
    assert micros(record["cost"]) == cost <= micros(CAP)
    wait_no_holds(redis_client, account_id)


async def test_a_cut_stream_of_several_choices_ends_every_choice(
    gw: Proc, redis_client: redis.Redis
) -> None:
    """A capped stream of `n: 2` cut short: each choice that had content gets its own
    `finish_reason: "length"` before `[DONE]`; billed for both choices' pieces, within the
    cap."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "Two long stories", max_tokens=2000, n=2, stream=True)
    status, headers, raw = await _post(gw, key, body, {MAX_COST: CAP, "x-mock-allow-n": "true"})
    assert status == 200, raw
    events = sse_events(raw)
    assert events[-1] == b"data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    with_content = {c["choices"][0]["index"] for c in chunks if c["choices"] and _content_of(c)}
    finished = {
        choice["index"]
        for c in chunks
        for choice in c["choices"]
        if choice.get("finish_reason") == "length"
    }
    assert with_content == {0, 1}
    assert finished == with_content, (finished, events[-4:])
    pieces = sum(1 for c in chunks if c["choices"] and _content_of(c))
    request_id = headers["x-request-id"]
    record = records_by_request(admin, account_id, [request_id])[request_id]
    assert record["completion_tokens"] == pieces
    assert micros(record["cost"]) == _cost(record["prompt_tokens"], pieces) <= micros(CAP)
    wait_no_holds(redis_client, account_id)


def _content_of(chunk: dict[str, Any]) -> str | None:
    return chunk["choices"][0].get("delta", {}).get("content") or None


@pytest.mark.parametrize("stream", [True, False])
async def test_the_hold_never_exceeds_the_cap(
    gw: Proc, redis_client: redis.Redis, stream: bool
) -> None:
    """While a slow call with max_tokens 2000 runs (a stream of 50 ms per token, or a whole
    answer 1.5 s in coming), the account's `held` stays above zero and at most the cap,
    where the same call uncapped would hold about 2."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", "Slowly now", max_tokens=2000, stream=stream)
    slow = {"x-mock-token-delay": "0.05"} if stream else {"x-mock-ttft": "1.5"}
    call = asyncio.ensure_future(_post(gw, key, body, {MAX_COST: CAP, **slow}))
    held: list[int] = []
    while not call.done():
        held.append(micros(admin.account(account_id)["held"]))
        await asyncio.sleep(0.05)
    status, headers, raw = await call
    assert status == 200, raw
    seen = [h for h in held if h]
    assert len(seen) >= 5, held  # the hold was watched while it was open
    assert max(seen) <= micros(CAP), held
    request_id = headers["x-request-id"]
    record = records_by_request(admin, account_id, [request_id])[request_id]
    uncapped = _cost(record["prompt_tokens"], 2000)
    assert uncapped > 20 * micros(CAP)  # the cap, not the request, bounded the hold
    assert micros(record["cost"]) <= micros(CAP)
    wait_no_holds(redis_client, account_id)


# Not " 0.05": HTTP takes whitespace around a field value for no part of it (RFC 9110
# section 5.5), and the gateway's parser strips it before any handler sees the value; see
# test_whitespace_around_the_cap_is_not_part_of_it. Whitespace inside the value is kept.
MALFORMED = ["abc", "-1", "0", "1e3", "0 .05", "0.0000001", "", "+0.05", "0.05.1", "NaN", "5,5"]


@pytest.mark.parametrize("value", MALFORMED, ids=[repr(v) for v in MALFORMED])
async def test_a_malformed_cap_is_a_bad_request(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis, value: str
) -> None:
    """A cap that is not a positive decimal string of at most six decimals is 400
    `invalid_request` with `param` naming the header; the call goes nowhere, costs nothing."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", f"malformed {account_id}", max_tokens=3)
    forwarded_before = _last_forwarded(mock_a)
    status, _, raw = await _post(gw, key, body, {MAX_COST: value})
    assert status == 400, (value, raw)
    error = orjson.loads(raw)["error"]
    assert error["code"] == "invalid_request", error
    assert error["param"] == MAX_COST, error
    assert _last_forwarded(mock_a) == forwarded_before
    _nothing_billed(admin, redis_client, account_id)


async def test_whitespace_around_the_cap_is_not_part_of_it(
    gw: Proc, redis_client: redis.Redis
) -> None:
    """` 0.05 ` reaches the gateway as `0.05` (HTTP's optional whitespace): the cap is then
    0.05 exactly, enforced like any other (here: the prompt alone exceeds it, 402)."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["dear-in"], amount=TOPUP)
    body = _chat("dear-in", "padded" + " the" * 120, max_tokens=5)
    status, _, raw = await _post(gw, key, body, {MAX_COST: " 0.05 "})
    assert status == 402, raw
    error = orjson.loads(raw)["error"]
    assert error["code"] == "cost_cap_exceeded", error
    assert "0.050000" in error["message"], error
    _nothing_billed(admin, redis_client, account_id)


async def test_a_cap_given_twice_is_a_bad_request(
    gw: Proc, mock_a: Proc, redis_client: redis.Redis
) -> None:
    """Two `x-gateway-max-cost` headers (a proxy adding one, a client another) are 400: the
    gateway does not pick one, the first or the loosest, for the client."""
    admin = Admin(gw.url)
    account_id, key = admin.funded(["capped"], amount=TOPUP)
    body = _chat("capped", f"twice {account_id}", max_tokens=3)
    forwarded_before = _last_forwarded(mock_a)
    headers = [("Authorization", f"Bearer {key}"), (MAX_COST, "5"), (MAX_COST, "0.05")]
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions", data=orjson.dumps(body), headers=headers
        ) as resp,
    ):
        assert resp.status == 400
        error = (await resp.json())["error"]
    assert error["code"] == "invalid_request"
    assert error["param"] == MAX_COST
    assert _last_forwarded(mock_a) == forwarded_before
    _nothing_billed(admin, redis_client, account_id)
