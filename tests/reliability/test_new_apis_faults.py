"""Faults, concurrency and strict enforcement on OpenAI's Responses API and Anthropic's
Messages API, as tests/billing/test_concurrency.py, tests/billing/test_faults.py and
tests/reliability/test_strict.py check them for chat: each answered call has exactly one usage
record, charged exactly; a client that leaves mid-stream is billed its prompt and what was
relayed; an upstream that dies mid-stream is billed for what was relayed; a strict stream the
balance cannot cover ends with its API's own clean end (the official SDKs read it to the end),
and the balance never goes below zero, with many concurrent streams too.

Each test runs on both routes. Two gateways serve the whole module (one postpaid on the shared
mock, one strict on a mock of its own whose answers are 60 tokens long), so the module's run
stays short; every test works on accounts of its own.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import redis

from gateway.ledger.keys import account_keys
from gateway.metering.tokenizers import get_encoding
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import (
    assert_invariant,
    expected_cost,
    micros,
    records_by_request,
    wait_no_holds,
)
from tests.conftest import GATEWAY_ENV, gateway_config, model_entry
from tests.procs import Proc, start_gateway, start_mock

pytestmark = pytest.mark.timeout(60)

ROUTES = ("responses", "messages")
APIS = ["chat", "completions", "responses", "messages"]
ENCODING = get_encoding("o200k_base")
ANTHROPIC_VERSION = "2023-06-01"

# The postpaid gateway: 1 micro-unit per input token, 2 per output token.
IN_PRICE, OUT_PRICE = "1", "2"
NATURAL = 16  # the shared mock's answer when no smaller limit cuts it
TEXT = "Tell me about the ledgers of the gateway."

# The strict gateway: 1000 micro-units per token either way; model "m" holds 10 output tokens
# (and extends in steps of 10), model "d" the billing section's 12.
STRICT_PRICE = "1000"
STRICT_NATURAL = 60  # its mock's answer when no smaller limit cuts it
MODEL_HOLD, BILLING_HOLD = 10, 12
MARGIN = 8  # gateway/billing/gate.py: pieces kept back from the covered count
HI = "hi"


# -- servers -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("new-apis-faults")


def _entry(name: str, url: str, price: str) -> dict[str, Any]:
    entry = model_entry(name, url, upstream_model="mock-model")
    entry["upstreams"][0]["apis"] = APIS
    entry["pricing"] = {"input_per_million": price, "output_per_million": price}
    return entry


@pytest.fixture(scope="module")
def postpaid(module_tmp: Path, valkey: EmbeddedStore, mock_a: Proc) -> Iterator[Proc]:
    entry = _entry("m", mock_a.url, IN_PRICE)
    entry["pricing"]["output_per_million"] = OUT_PRICE
    proc = start_gateway(module_tmp, gateway_config(valkey, [entry]), GATEWAY_ENV)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def strict_mock(module_tmp: Path) -> Iterator[Proc]:
    proc = start_mock(module_tmp, "--max-tokens", str(STRICT_NATURAL))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def strict(module_tmp: Path, valkey: EmbeddedStore, strict_mock: Proc) -> Iterator[Proc]:
    held = _entry("m", strict_mock.url, STRICT_PRICE)
    held["hold_output_tokens"] = MODEL_HOLD
    default = _entry("d", strict_mock.url, STRICT_PRICE)
    billing = {"enforcement": "strict", "hold_output_tokens": BILLING_HOLD}
    config = gateway_config(valkey, [held, default], billing=billing)
    proc = start_gateway(module_tmp, config, GATEWAY_ENV)
    yield proc
    proc.stop()


# -- the two APIs' wire ------------------------------------------------------------------


def tokens(text: str) -> int:
    return len(ENCODING.encode_ordinary(text))


def local_prompt(text: str) -> int:
    """The gateway's count of a one-user-message request on either API: the chat request it
    renders to (gateway/metering/prompt_apis.py), 3 per message and 3 priming the reply."""
    return 3 + 3 + tokens("user") + tokens(text)


def body_of(
    route: str, text: str, *, stream: bool, limit: int | None, model: str = "m"
) -> dict[str, Any]:
    body: dict[str, Any]
    if route == "responses":
        body = {"model": model, "input": text}
        if limit is not None:
            body["max_output_tokens"] = limit
    else:
        assert limit is not None, "a Messages request must name max_tokens"
        body = {
            "model": model,
            "max_tokens": limit,
            "messages": [{"role": "user", "content": text}],
        }
    if stream:
        body["stream"] = True
    return body


def path_of(route: str) -> str:
    return "/v1/responses" if route == "responses" else "/v1/messages"


def auth_of(route: str, key: str) -> dict[str, str]:
    if route == "responses":
        return {"Authorization": f"Bearer {key}"}
    return {"x-api-key": key, "anthropic-version": ANTHROPIC_VERSION}


def delta_event(route: str) -> bytes:
    """The `event:` line of a stream's text pieces."""
    name = "response.output_text.delta" if route == "responses" else "content_block_delta"
    return b"event: " + name.encode()


Event = tuple[str, dict[str, Any]]


def parse_events(raw: bytes, *, partial: bool = False) -> list[Event]:
    """(name, data) of each event of a typed SSE body; with `partial`, an unfinished last
    event (a stream cut mid-way) is left out."""
    blocks = raw.split(b"\n\n")
    if partial or not raw:
        blocks = blocks[:-1]
    else:
        assert blocks[-1] == b"", raw[-300:]
    events = []
    for block in blocks:
        if not block:
            continue
        name, data = None, None
        for line in block.split(b"\n"):
            if line.startswith(b"event: "):
                name = line[7:].decode()
            elif line.startswith(b"data: "):
                data = orjson.loads(line[6:])
        assert name is not None, block
        assert isinstance(data, dict), block
        assert data["type"] == name, block
        events.append((name, data))
    return events


def texts_of(route: str, events: list[Event]) -> list[str]:
    if route == "responses":
        return [d["delta"] for n, d in events if n == "response.output_text.delta"]
    return [d["delta"]["text"] for n, d in events if n == "content_block_delta"]


def whole_usage(route: str, answer: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) a whole answer's usage reports, as the gateway bills them."""
    usage = answer["usage"]
    if route == "responses":
        return usage["input_tokens"], usage["output_tokens"]
    prompt = (
        usage["input_tokens"]
        + usage["cache_read_input_tokens"]
        + usage["cache_creation_input_tokens"]
    )
    return prompt, usage["output_tokens"]


def stream_usage(route: str, events: list[Event]) -> tuple[int, int]:
    """(prompt, completion) a finished stream's usage reports."""
    if route == "responses":
        name, last = events[-1]
        assert name == "response.completed", events[-1]
        return whole_usage(route, last["response"])
    (started,) = [d for n, d in events if n == "message_start"]
    (closing,) = [d for n, d in events if n == "message_delta"]
    prompt, _ = whole_usage(route, {"usage": {**started["message"]["usage"], "output_tokens": 0}})
    return prompt, closing["usage"]["output_tokens"]


def as_amount(value: int) -> str:
    """Micro-units as the admin API's decimal string."""
    return f"{value // 1_000_000}.{value % 1_000_000:06d}"


def new_account(admin: Admin, balance: int, models: tuple[str, ...] = ("m",)) -> tuple[str, str]:
    account_id = admin.create_account()
    admin.topup(account_id, as_amount(balance))
    for model in models:
        admin.subscribe(account_id, model)
    return account_id, admin.new_key(account_id)


@asynccontextmanager
async def lowest_balance(store: redis.Redis, account_id: str) -> AsyncIterator[list[int]]:
    """Watch the account's balance in the store while the block runs; yields a list whose
    only item is the lowest balance seen (read it after the block)."""
    key = account_keys(account_id).account
    lowest = [int(store.hget(key, "balance") or 0)]
    done = asyncio.Event()

    async def watch() -> None:
        while not done.is_set():
            lowest[0] = min(lowest[0], int(store.hget(key, "balance") or 0))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    try:
        yield lowest
    finally:
        done.set()
        await watcher
        lowest[0] = min(lowest[0], int(store.hget(key, "balance") or 0))


async def post(
    session: aiohttp.ClientSession,
    gw: Proc,
    route: str,
    key: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, str, bytes]:
    """(status, x-request-id, body) of one call."""
    sent = {**auth_of(route, key), **(headers or {})}
    async with session.post(gw.url + path_of(route), data=orjson.dumps(body), headers=sent) as r:
        return r.status, r.headers["x-request-id"], await r.read()


async def last_forwarded(mock: Proc) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(mock.url + "/debug/last-request") as r,
    ):
        seen = await r.json()
    return dict(orjson.loads(seen["body"]))


# -- 1. concurrency ----------------------------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_50_concurrent_calls_are_each_billed_once_exactly(
    route: str, postpaid: Proc, redis_client: redis.Redis
) -> None:
    """50 concurrent calls (every other one streamed) on a balance that covers 30 holds and a
    half: each call holds exactly what it costs (the upstream reports the gateway's own count
    of the prompt, the answer is the limit's 16 tokens), so exactly 30 are answered and 20
    refused with 402 whatever the interleaving. Each answered call (by its x-request-id) has
    exactly one record, of the usage its answer reported (Messages: input + cache reads +
    cache writes), charged exactly; the 402s have none; the balance never dips below zero and
    ends at top-up - sum(costs), no hold open."""
    admin = Admin(postpaid.url)
    prompt = local_prompt(TEXT)

    # The gateway's count of this prompt, from a call whose upstream reports no usage.
    probe_id, probe_key = new_account(admin, micros("1.00"))
    async with aiohttp.ClientSession() as session:
        status, probe_rid, _ = await post(
            session,
            postpaid,
            route,
            probe_key,
            body_of(route, TEXT, stream=False, limit=NATURAL),
            {"x-mock-omit-usage": "true"},
        )
    assert status == 200
    probe = records_by_request(admin, probe_id, [probe_rid])[probe_rid]
    assert (probe["usage_source"], probe["prompt_tokens"]) == ("gateway", prompt), probe
    assert probe["completion_tokens"] == NATURAL

    hold = prompt * 1 + NATURAL * 2  # micro-units: IN_PRICE 1, OUT_PRICE 2 per token
    balance = 30 * hold + hold // 2
    account_id, key = new_account(admin, balance)
    knobs = {
        "x-mock-ttft": "0.05",
        "x-mock-usage-prompt-tokens": str(prompt),
        "x-mock-usage-cached-tokens": "2",
    }
    written = 0
    if route == "messages":
        written = 1
        knobs["x-mock-usage-cache-write-tokens"] = str(written)

    async def one(i: int, session: aiohttp.ClientSession) -> tuple[int, str, bytes]:
        body = body_of(route, TEXT, stream=i % 2 == 0, limit=NATURAL)
        return await post(session, postpaid, route, key, body, knobs)

    connector = aiohttp.TCPConnector(limit=100)
    async with (
        lowest_balance(redis_client, account_id) as lowest,
        aiohttp.ClientSession(connector=connector) as session,
        asyncio.timeout(30),
    ):
        answers = await asyncio.gather(*(one(i, session) for i in range(50)))

    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 30, sorted(statuses)
    assert statuses.count(402) == 20, sorted(statuses)
    assert len({rid for _, rid, _ in answers}) == 50
    assert lowest[0] >= 0, lowest
    for status, _, raw in answers:
        if status == 402:
            error = orjson.loads(raw)
            if route == "messages":
                assert error["type"] == "error"
                assert error["error"]["type"] == "billing_error", error
            else:
                assert error["error"]["code"] == "insufficient_balance", error

    account, records = assert_invariant(admin, redis_client, account_id, balance)
    answered = {rid: (i % 2 == 0, raw) for i, (s, rid, raw) in enumerate(answers) if s == 200}
    by_request = records_by_request(admin, account_id, list(answered))
    assert len(records) == 30
    for request_id, (streamed, raw) in answered.items():
        if streamed:
            events = parse_events(raw)
            reported = stream_usage(route, events)
            assert "".join(texts_of(route, events)).count(" ") == NATURAL - 1
        else:
            reported = whole_usage(route, orjson.loads(raw))
        assert reported == (prompt, NATURAL), (request_id, reported)
        record = by_request[request_id]
        assert record["status"] == "ok"
        assert record["usage_source"] == "upstream"
        assert record["stream"] is streamed
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, NATURAL)
        assert (record["cached_tokens"], record["cache_write_tokens"]) == (2, written)
        assert micros(record["cost"]) == hold, record
        assert micros(record["cost"]) == expected_cost(prompt, NATURAL, IN_PRICE, OUT_PRICE)
    assert micros(account["balance"]) == balance - 30 * hold == hold // 2
    assert account["state"] == "active"
    assert_invariant(admin, redis_client, probe_id, micros("1.00"))


# -- 2. a client that leaves mid-stream --------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_client_disconnect_mid_stream_is_billed_for_what_was_relayed(
    route: str, postpaid: Proc, redis_client: redis.Redis
) -> None:
    """A client that hangs up after 3 text pieces of a 16-token stream paced 50 ms apart is
    billed `client_disconnected`, from the gateway's count: its prompt as the gateway counts
    it, and the pieces relayed until it noticed (at least the 3 read, short of 16), charged
    exactly tokens x prices."""
    admin = Admin(postpaid.url)
    topped_up = micros("10.00")
    account_id, key = new_account(admin, topped_up)
    body = body_of(route, TEXT, stream=True, limit=NATURAL)
    seen = 0
    async with (
        asyncio.timeout(15),
        aiohttp.ClientSession() as session,
        session.post(
            postpaid.url + path_of(route),
            data=orjson.dumps(body),
            headers={**auth_of(route, key), "x-mock-token-delay": "0.05"},
        ) as resp,
    ):
        assert resp.status == 200
        request_id = resp.headers["x-request-id"]
        async for line in resp.content:
            if line.startswith(delta_event(route)):
                seen += 1
                if seen == 3:
                    break
        resp.close()
    assert seen == 3
    _, records = assert_invariant(admin, redis_client, account_id, topped_up)
    (record,) = records
    assert record["request_id"] == request_id
    assert record["status"] == "client_disconnected"
    assert record["usage_source"] == "gateway"
    assert record["prompt_tokens"] == local_prompt(TEXT)
    assert 3 <= record["completion_tokens"] < NATURAL, record
    assert micros(record["cost"]) == expected_cost(
        record["prompt_tokens"], record["completion_tokens"], IN_PRICE, OUT_PRICE
    )
    assert micros(record["cost"]) == local_prompt(TEXT) + 2 * record["completion_tokens"]


# -- 3. an upstream that dies mid-stream -------------------------------------------------


@pytest.mark.parametrize("route", ROUTES)
async def test_upstream_death_mid_stream_is_billed_for_what_was_relayed(
    route: str, postpaid: Proc, redis_client: redis.Redis
) -> None:
    """An upstream that drops the connection after 5 text pieces: the client's stream is cut
    (no clean end), and the call is billed `upstream_error` for its prompt as the gateway
    counts it and exactly the 5 tokens relayed."""
    admin = Admin(postpaid.url)
    topped_up = micros("10.00")
    account_id, key = new_account(admin, topped_up)
    body = body_of(route, TEXT, stream=True, limit=NATURAL)
    raw = b""
    cut = False
    async with (
        asyncio.timeout(15),
        aiohttp.ClientSession() as session,
        session.post(
            postpaid.url + path_of(route),
            data=orjson.dumps(body),
            headers={**auth_of(route, key), "x-mock-disconnect-after": "5"},
        ) as resp,
    ):
        assert resp.status == 200
        request_id = resp.headers["x-request-id"]
        try:
            async for piece in resp.content.iter_any():
                raw += piece
        except aiohttp.ClientPayloadError:
            cut = True
    assert cut, raw[-300:]  # the client sees a truncated answer, not a clean end
    events = parse_events(raw, partial=True)
    names = [name for name, _ in events]
    assert len(texts_of(route, events)) == 5, names
    for end in ("response.completed", "response.incomplete", "message_delta", "message_stop"):
        assert end not in names
    _, records = assert_invariant(admin, redis_client, account_id, topped_up)
    (record,) = records
    assert record["request_id"] == request_id
    assert record["status"] == "upstream_error"
    assert record["usage_source"] == "gateway"
    assert (record["prompt_tokens"], record["completion_tokens"]) == (local_prompt(TEXT), 5)
    assert micros(record["cost"]) == expected_cost(local_prompt(TEXT), 5, IN_PRICE, OUT_PRICE)
    assert micros(record["cost"]) == local_prompt(TEXT) + 2 * 5


# -- 4. strict enforcement ---------------------------------------------------------------

STRICT_HI = local_prompt(HI)  # 8 tokens


def strict_limit(route: str) -> int | None:
    """Responses: no limit (the model's hold of 10 output tokens, extended by 10s). Messages
    (max_tokens required): 60, the whole answer, held at admission."""
    return None if route == "responses" else STRICT_NATURAL


def _decimal(amount: int) -> str:
    return f"{amount // 1_000_000}.{amount % 1_000_000:06d}"


def strict_balance(route: str) -> tuple[int, int, dict[str, str]]:
    """(balance, most output tokens the gate may let through, headers) for the single-stream
    tests. Responses: the prompt and 32 output tokens: the first hold (10) and two extensions
    of 10 are covered, a third is not, and a piece goes out only while the pieces relayed,
    those of its read and the margin of 8 stay below the 30 covered: at most 21. Messages:
    a stream that names its max_tokens (every Messages stream) is held for all of it and
    never stopped by the balance; it is stopped by the client's cost cap instead, here the
    prompt and 32 output tokens on a balance that covers the whole answer: at most 23 (the
    32 the cap covers less the margin and one)."""
    price = int(STRICT_PRICE)
    if route == "responses":
        return (STRICT_HI + 32) * price, 3 * MODEL_HOLD - MARGIN - 1, {}
    cap = {"x-gateway-max-cost": _decimal((STRICT_HI + 32) * price)}
    return (STRICT_HI + STRICT_NATURAL) * price, 32 - MARGIN - 1, cap


def stream_faults(route: str, events: list[Event]) -> list[str]:
    """What makes `events` other than a whole stream of its API (empty: nothing). Responses:
    `response.created` first, sequence numbers 0, 1, 2, ... and one final `response.completed`
    or `response.incomplete` of the created response's id. Messages: `message_start` first,
    every content block closed, then one `message_delta` and `message_stop` last."""
    names = [name for name, _ in events]
    faults = []
    if not names:
        return ["no events"]
    if route == "responses":
        ends = ("response.completed", "response.incomplete")
        if names[0] != "response.created":
            faults.append(f"first event {names[0]}, not response.created")
        sequence = [data.get("sequence_number") for _, data in events]
        if sequence != list(range(len(events))):
            faults.append(f"sequence numbers {sequence}")
        if names[-1] not in ends or sum(names.count(end) for end in ends) != 1:
            faults.append(f"ends {names[-3:]}")
        ids = {data["response"].get("id") for _, data in events if "response" in data}
        if len(ids) != 1 or None in ids:
            faults.append(f"response ids {ids}")
    else:
        if names[0] != "message_start":
            faults.append(f"first event {names[0]}, not message_start")
        if names[-2:] != ["message_delta", "message_stop"] or names.count("message_delta") != 1:
            faults.append(f"ends {names[-3:]}")
        if names.count("content_block_start") != names.count("content_block_stop"):
            faults.append(f"unclosed blocks: {names}")
    return faults


def check_clean_end(route: str, events: list[Event], delivered: list[str]) -> None:
    """The API's own end of a stream the gateway stopped, with the gateway's counts."""
    assert stream_faults(route, events) == [], [name for name, _ in events]
    names = [name for name, _ in events]
    if route == "responses":
        assert names[-1] == "response.incomplete", names[-4:]
        assert "response.completed" not in names
        assert names.count("response.incomplete") == 1
        end = events[-1][1]
        response = end["response"]
        assert response["status"] == "incomplete"
        assert response["incomplete_details"] == {"reason": "max_output_tokens"}
        assert response["usage"]["input_tokens"] == STRICT_HI
        assert response["usage"]["output_tokens"] == len(delivered)
        assert response["usage"]["total_tokens"] == STRICT_HI + len(delivered)
        (created,) = [d for n, d in events if n == "response.created"]
        assert response["id"] == created["response"]["id"]
        (message,) = response["output"]
        assert message["content"][0]["text"] == "".join(delivered)
    else:
        assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"], names[-4:]
        assert names.count("message_delta") == names.count("message_stop") == 1
        assert names.count("content_block_stop") == 1
        closing = events[-2][1]
        assert closing["delta"]["stop_reason"] == "max_tokens"
        assert closing["usage"]["output_tokens"] == len(delivered)
        assert events[-3][1]["index"] == 0


def check_strict_record(record: dict[str, Any], delivered: int) -> None:
    assert record["usage_source"] == "gateway", record
    assert (record["prompt_tokens"], record["completion_tokens"]) == (STRICT_HI, delivered)
    assert micros(record["cost"]) == (STRICT_HI + delivered) * int(STRICT_PRICE)
    assert micros(record["cost"]) == expected_cost(STRICT_HI, delivered, STRICT_PRICE, STRICT_PRICE)
    assert record["uncharged"] == "0.000000"


@pytest.mark.parametrize("route", ROUTES)
async def test_strict_stops_a_stream_the_balance_cannot_cover_with_the_apis_own_end(
    route: str, strict: Proc, redis_client: redis.Redis
) -> None:
    """A strict stream of a 60-token answer on a balance that cannot cover the gate's next
    extension ends cleanly: Responses with a final `response.incomplete` (status incomplete,
    reason max_output_tokens, the gateway's counts as usage, the text relayed as output);
    Messages with `content_block_stop`, `message_delta` (stop_reason max_tokens, output
    tokens) and `message_stop` (stopped by a cost cap: a Messages stream names its limit and
    is held for all of it). The call is billed for exactly what was relayed, and the
    balance ends at zero or above with the account active."""
    admin = Admin(strict.url)
    balance, most, cap = strict_balance(route)
    account_id, key = new_account(admin, balance)
    body = body_of(route, HI, stream=True, limit=strict_limit(route))
    async with (
        asyncio.timeout(15),
        lowest_balance(redis_client, account_id) as lowest,
        aiohttp.ClientSession() as session,
    ):
        status, request_id, raw = await post(
            session, strict, route, key, body, {"x-mock-token-delay": "0.001", **cap}
        )
    assert status == 200, raw
    events = parse_events(raw)
    delivered = texts_of(route, events)
    assert 0 < len(delivered) <= most < STRICT_NATURAL, len(delivered)
    check_clean_end(route, events, delivered)
    account, records = assert_invariant(admin, redis_client, account_id, balance)
    (record,) = records
    assert record["request_id"] == request_id
    check_strict_record(record, len(delivered))
    assert micros(account["balance"]) == balance - micros(record["cost"]) >= 0
    assert lowest[0] >= 0
    assert account["state"] == "active"


@pytest.mark.parametrize("route", ROUTES)
async def test_strict_stream_end_reads_cleanly_in_the_official_sdk(
    route: str, strict: Proc, redis_client: redis.Redis
) -> None:
    """The same stopped stream through the official SDKs, unchanged: openai's
    `responses.create(stream=True)` iterates to the end without error, its last event a
    `response.incomplete` whose usage counts the deltas it gave; anthropic's
    `messages.stream` finishes, and its final message has stop_reason "max_tokens", the
    text streamed and the output tokens relayed."""
    admin = Admin(strict.url)
    balance, most, cap = strict_balance(route)
    account_id, key = new_account(admin, balance)
    pace = {"x-mock-token-delay": "0.001", **cap}
    async with asyncio.timeout(15):
        if route == "responses":
            async with openai.AsyncOpenAI(
                base_url=strict.url + "/v1", api_key=key, max_retries=0
            ) as oai:
                raw = await oai.responses.with_raw_response.create(
                    model="m", input=HI, stream=True, extra_headers=pace
                )
                request_id = raw.headers["x-request-id"]
                events = [event async for event in raw.parse()]
            last = events[-1]
            assert last.type == "response.incomplete", [e.type for e in events[-3:]]
            deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
            assert last.response.status == "incomplete"
            assert last.response.incomplete_details is not None
            assert last.response.incomplete_details.reason == "max_output_tokens"
            assert last.response.usage is not None
            assert last.response.usage.output_tokens == len(deltas)
            assert last.response.output_text == "".join(deltas)
            delivered = len(deltas)
        else:
            async with (
                anthropic.AsyncAnthropic(base_url=strict.url, api_key=key, max_retries=0) as ai,
                ai.messages.stream(
                    model="m",
                    max_tokens=STRICT_NATURAL,
                    messages=[{"role": "user", "content": HI}],
                    extra_headers=pace,
                ) as stream,
            ):
                text = "".join([piece async for piece in stream.text_stream])
                final = await stream.get_final_message()
                request_id = stream.response.headers["x-request-id"]
            assert final.stop_reason == "max_tokens"
            assert final.content[0].text == text  # type: ignore[union-attr]
            delivered = final.usage.output_tokens
            assert delivered == tokens(text)
    assert 0 < delivered <= most, delivered
    account, records = assert_invariant(admin, redis_client, account_id, balance)
    (record,) = records
    assert record["request_id"] == request_id
    check_strict_record(record, delivered)
    assert micros(account["balance"]) >= 0


@pytest.mark.parametrize("route", ROUTES)
async def test_strict_never_below_zero_with_20_concurrent_streams(
    route: str, strict: Proc, redis_client: redis.Redis
) -> None:
    """20 concurrent strict streams on one small balance (Responses: 20 first holds of 10
    output tokens and 4 extensions; Messages, max_tokens 20: 14 first holds and a bit). The
    upstream's first byte comes 0.5 s late, so every admission is decided before any stream
    extends or settles: all 20 are answered on Responses, exactly 14 on Messages and 6
    refused with 402. Each answered stream ends cleanly (its API's end, the upstream's or the
    gateway's), with a usage that counts the pieces it relayed; each has exactly one record,
    of those tokens, charged exactly and all of it; the 402s none; the balance never goes
    below zero and the account stays active. Responses streams are stopped by the balance;
    Messages streams, held for the max_tokens they name, run to it."""
    admin = Admin(strict.url)
    price = int(STRICT_PRICE)
    limit = None if route == "responses" else 20
    first_hold = (STRICT_HI + (MODEL_HOLD if limit is None else limit)) * price
    balance = 20 * first_hold + 4 * MODEL_HOLD * price if limit is None else 400_000
    account_id, key = new_account(admin, balance)
    body = body_of(route, HI, stream=True, limit=limit)
    connector = aiohttp.TCPConnector(limit=100)
    async with (
        asyncio.timeout(30),
        lowest_balance(redis_client, account_id) as lowest,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        answers = await asyncio.gather(
            *(post(session, strict, route, key, body, {"x-mock-ttft": "0.5"}) for _ in range(20))
        )
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 402}, statuses
    admitted = 20 if route == "responses" else balance // first_hold
    assert (statuses.count(200), statuses.count(402)) == (admitted, 20 - admitted), statuses
    assert lowest[0] >= 0, lowest
    account, _ = assert_invariant(admin, redis_client, account_id, balance)
    answered = {rid: raw for status, rid, raw in answers if status == 200}
    by_request = records_by_request(admin, account_id, list(answered))
    cut = 0
    malformed: dict[str, tuple[list[str], list[str]]] = {}
    for request_id, raw in answered.items():
        events = parse_events(raw)
        names = [name for name, _ in events]
        delivered = len(texts_of(route, events))
        record = by_request[request_id]
        if route == "responses":
            assert names[-1] in ("response.completed", "response.incomplete"), names[-3:]
            assert events[-1][1]["response"]["usage"]["output_tokens"] == delivered
            stopped = names[-1] == "response.incomplete"
        else:
            assert names[-2:] == ["message_delta", "message_stop"], names[-3:]
            assert events[-2][1]["usage"]["output_tokens"] == delivered
            assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"  # the limit, or the gate
            stopped = "input_tokens" not in events[-2][1]["usage"]  # the gateway's own end
        faults = stream_faults(route, events)
        if faults:
            malformed[request_id] = (faults, names)
        assert record["completion_tokens"] == delivered, (record, names[-3:])
        if stopped:
            cut += 1
            check_strict_record(record, delivered)
        else:
            assert delivered == (STRICT_NATURAL if limit is None else limit)
            assert record["usage_source"] == "upstream"
        assert micros(record["cost"]) == expected_cost(
            record["prompt_tokens"], delivered, STRICT_PRICE, STRICT_PRICE
        )
        assert record["uncharged"] == "0.000000"
    if route == "responses":
        assert cut > 0  # the balance stopped some
    else:
        assert cut == 0  # each was held for its whole max_tokens
    assert micros(account["balance"]) >= 0, account
    assert account["state"] == "active"
    # Last, so that the money checks above report on their own: every answered stream,
    # stopped or not, is a whole stream of its API (its SDK's parser needs its first event).
    assert malformed == {}, f"{len(malformed)} of {len(answered)} streams: {malformed}"


@pytest.mark.parametrize("route", ROUTES)
async def test_strict_stream_stopped_at_its_first_chunk_still_reads_in_the_sdk(
    route: str, strict: Proc, redis_client: redis.Redis
) -> None:
    """A balance that covers the first hold exactly and no extension: the gate stops the
    stream at its very first chunk (Responses: the head's 4 events and the margin of 8 reach
    the 10 output tokens covered; Messages with a cost cap of its prompt and 5 tokens: the
    margin of 8 passes 5). The client is still owed a stream of its API, opened by the
    events of that chunk that carry no text: openai's SDK sees `response.created` first and
    a `response.incomplete` of the same response last; anthropic's `messages.stream`
    finishes, stop_reason "max_tokens". It is billed its prompt alone."""
    admin = Admin(strict.url)
    price = int(STRICT_PRICE)
    limit = MODEL_HOLD if route == "responses" else 5
    balance = (STRICT_HI + limit) * price  # the first hold, exactly
    cap = {} if route == "responses" else {"x-gateway-max-cost": _decimal(balance)}
    account_id, key = new_account(admin, balance)
    failure: Exception | None = None
    async with asyncio.timeout(15):
        if route == "responses":
            async with openai.AsyncOpenAI(
                base_url=strict.url + "/v1", api_key=key, max_retries=0
            ) as oai:
                raw = await oai.responses.with_raw_response.create(model="m", input=HI, stream=True)
                request_id = raw.headers["x-request-id"]
                events = [event async for event in raw.parse()]
        else:
            async with anthropic.AsyncAnthropic(
                base_url=strict.url, api_key=key, max_retries=0
            ) as ai:
                try:
                    async with ai.messages.stream(
                        model="m",
                        max_tokens=limit,
                        messages=[{"role": "user", "content": HI}],
                        extra_headers=cap,
                    ) as stream:
                        request_id = stream.response.headers["x-request-id"]
                        text = "".join([piece async for piece in stream.text_stream])
                        final = await stream.get_final_message()
                except Exception as exc:  # reported below, after the money checks
                    failure = exc
    account, records = assert_invariant(admin, redis_client, account_id, balance)
    (record,) = records
    assert record["request_id"] == request_id
    # The upstream's first read may hold its opening events alone, and the next one a single
    # piece (within the hold and its margin): then that piece goes out before the stop.
    delivered = record["completion_tokens"]
    assert delivered <= max(0, limit - MARGIN - 1), delivered
    check_strict_record(record, delivered)
    assert micros(account["balance"]) == balance - (STRICT_HI + delivered) * price
    if route == "responses":
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) == delivered
        types = [event.type for event in events]
        assert types[-1] == "response.incomplete", types
        last = events[-1]
        assert last.response.status == "incomplete"  # type: ignore[union-attr]
        assert types[0] == "response.created", types
        assert last.response.id == events[0].response.id  # type: ignore[union-attr]
    else:
        assert failure is None, "".join(traceback.format_exception(failure))
        assert final.stop_reason == "max_tokens"
        assert tokens(text) == delivered


# -- 5. strict whole answers -------------------------------------------------------------


async def test_strict_whole_response_is_sent_the_max_output_tokens_its_hold_covers(
    strict: Proc, strict_mock: Proc, redis_client: redis.Redis
) -> None:
    """A non-streamed strict Responses call that names no max_output_tokens is sent the
    max_output_tokens its hold covers: the model's hold_output_tokens (10) where it sets one,
    else the billing section's (12); the mock, which would answer 60 tokens, stops there
    (status incomplete), and the call is billed from its usage. One that names its own limit
    is sent it unchanged."""
    admin = Admin(strict.url)
    topped_up = micros("1.00")
    account_id, key = new_account(admin, topped_up, ("m", "d"))
    ids: list[str] = []
    expected: list[tuple[int, int]] = []
    async with asyncio.timeout(15), aiohttp.ClientSession() as session:
        for model, named, held in (("m", None, MODEL_HOLD), ("d", None, BILLING_HOLD), ("m", 5, 5)):
            body = body_of("responses", HI, stream=False, limit=named, model=model)
            status, request_id, raw = await post(session, strict, "responses", key, body)
            assert status == 200, raw
            sent = await last_forwarded(strict_mock)
            assert sent["max_output_tokens"] == held, (model, named, sent)
            answer = orjson.loads(raw)
            assert answer["status"] == "incomplete"
            assert answer["incomplete_details"] == {"reason": "max_output_tokens"}
            assert answer["usage"]["output_tokens"] == held
            ids.append(request_id)
            expected.append((answer["usage"]["input_tokens"], held))
    assert [prompt for prompt, _ in expected] == [tokens(HI)] * 3  # the mock's count
    wait_no_holds(redis_client, account_id)
    records = records_by_request(admin, account_id, ids)
    for request_id, (prompt, completion) in zip(ids, expected, strict=True):
        record = records[request_id]
        assert record["usage_source"] == "upstream"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
        assert micros(record["cost"]) == expected_cost(
            prompt, completion, STRICT_PRICE, STRICT_PRICE
        )
    assert_invariant(admin, redis_client, account_id, topped_up)
