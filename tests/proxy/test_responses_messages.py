"""OpenAI's Responses API and Anthropic's Messages API through the gateway, driven by the
official `openai` and `anthropic` SDKs unchanged: each call answered as the upstream answered
it, and billed exactly once, from the upstream's usage when it reports one (with its token
classes), else from the gateway's own count of what it saw. The clients' parsers are the
oracle of each wire format; tiktoken over the texts the SDKs return is the oracle of the
local counts."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from fractions import Fraction
from typing import Any

import aiohttp
import anthropic
import openai
import orjson
import pytest
import redis

from gateway.metering.tokenizers import get_encoding
from tests.admin_client import Admin
from tests.billing.checks import micros, records_by_request, wait_no_holds
from tests.conftest import model_entry
from tests.procs import Proc

INPUT, OUTPUT = "0.15", "0.60"  # model_entry's prices per million tokens
CACHED = "0.075"
ENCODING = get_encoding("o200k_base")
APIS = ["chat", "completions", "responses", "messages"]
WEATHER_TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city."}},
        "required": ["city"],
    },
}


def cost(prompt: int, completion: int, cached: int = 0, cached_price: str = INPUT) -> int:
    """SPEC section 2 with token classes, in exact fractions, rounded up once."""
    exact = (
        Fraction(prompt - cached) * Fraction(INPUT)
        + Fraction(cached) * Fraction(cached_price)
        + Fraction(completion) * Fraction(OUTPUT)
    )
    return -(-exact.numerator // exact.denominator)


def tokens(text: str) -> int:
    return len(ENCODING.encode_ordinary(text))


def chat_prompt(*messages: tuple[str, str]) -> int:
    """The cookbook's count of (role, content) messages: 3 each plus their strings, and 3
    to prime the reply."""
    return 3 + sum(3 + tokens(role) + tokens(content) for role, content in messages)


@pytest.fixture
def gw(make_gateway: Callable[..., Proc], mock_a: Proc) -> Proc:
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    entry["upstreams"][0]["apis"] = APIS
    return make_gateway([entry])


@pytest.fixture
def account(gw: Proc) -> tuple[str, str]:
    return Admin(gw.url).funded(["m"], amount="10.00")


@pytest.fixture
async def oai(gw: Proc, account: tuple[str, str]) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=gw.url + "/v1", api_key=account[1], max_retries=0
    ) as client:
        yield client


@pytest.fixture
async def claude(gw: Proc, account: tuple[str, str]) -> AsyncIterator[anthropic.AsyncAnthropic]:
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, api_key=account[1], max_retries=0
    ) as client:
        yield client


def _settled(gw: Proc, redis_client: redis.Redis, account_id: str, ids: list[str]) -> Any:
    wait_no_holds(redis_client, account_id)
    admin = Admin(gw.url)
    return records_by_request(admin, account_id, ids), admin.account(account_id)


# -- OpenAI Responses ------------------------------------------------------------------------


async def test_responses_create_is_billed_from_upstream_usage(
    gw: Proc, oai: openai.AsyncOpenAI, account: tuple[str, str], redis_client: redis.Redis
) -> None:
    """Non-streamed, streamed and with tools: each answer parses in the SDK, and each call
    has one record of the tokens its `usage` reported, charged exactly."""
    account_id, _ = account
    raw = await oai.responses.with_raw_response.create(
        model="m", input="Say hello to the gateway.", max_output_tokens=40
    )
    whole = raw.parse()
    ids = [raw.headers["x-request-id"]]
    assert whole.status == "completed"
    assert whole.output_text
    reported = [(whole.usage.input_tokens, whole.usage.output_tokens, 0)]
    assert raw.headers["x-gateway-cost"] == f"{cost(*reported[0]) / 1e6:.6f}"

    stream = await oai.responses.with_raw_response.create(
        model="m",
        instructions="Be brief.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hello there"}]}],
        stream=True,
    )
    ids.append(stream.headers["x-request-id"])
    events = [event async for event in stream.parse()]
    assert events[0].type == "response.created"
    assert events[-1].type == "response.completed"
    usage = events[-1].response.usage
    assert usage is not None
    texts = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert texts == events[-1].response.output_text
    reported.append((usage.input_tokens, usage.output_tokens, 0))

    tooled = await oai.responses.with_raw_response.create(
        model="m",
        input="What is the weather in Paris?",
        tools=[WEATHER_TOOL],  # type: ignore[list-item]
        extra_headers={"x-mock-usage-cached-tokens": "3"},
    )
    ids.append(tooled.headers["x-request-id"])
    answer = tooled.parse()
    assert answer.usage is not None
    assert answer.usage.input_tokens_details.cached_tokens == 3
    reported.append((answer.usage.input_tokens, answer.usage.output_tokens, 3))

    records, balance = _settled(gw, redis_client, account_id, ids)
    spent = 0
    for request_id, (prompt, completion, cached) in zip(ids, reported, strict=True):
        record = records[request_id]
        assert record["usage_source"] == "upstream"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
        assert record["cached_tokens"] == cached
        assert micros(record["cost"]) == cost(prompt, completion, cached)
        spent += cost(prompt, completion, cached)
    assert micros(balance["balance"]) == micros("10.00") - spent


async def test_responses_without_usage_are_billed_by_local_count(
    gw: Proc, oai: openai.AsyncOpenAI, account: tuple[str, str], redis_client: redis.Redis
) -> None:
    """An upstream that reports no usage: the call is billed from the gateway's count, the
    input as the chat request it renders to (instructions a system message, the input a
    user message: 3 per message + 3 priming) and the output text the client got."""
    account_id, _ = account
    omit = {"x-mock-omit-usage": "true"}
    raw = await oai.responses.with_raw_response.create(
        model="m", instructions="Be brief.", input="Hello there", extra_headers=omit
    )
    whole = raw.parse()
    assert whole.usage is None
    stream = await oai.responses.with_raw_response.create(
        model="m", input="Hello there", stream=True, extra_headers=omit
    )
    events = [event async for event in stream.parse()]
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    ids = [raw.headers["x-request-id"], stream.headers["x-request-id"]]
    records, _ = _settled(gw, redis_client, account_id, ids)
    expected = [
        (chat_prompt(("system", "Be brief."), ("user", "Hello there")), tokens(whole.output_text)),
        (chat_prompt(("user", "Hello there")), tokens(streamed)),
    ]
    for request_id, (prompt, completion) in zip(ids, expected, strict=True):
        record = records[request_id]
        assert record["usage_source"] == "gateway"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
        assert micros(record["cost"]) == cost(prompt, completion)


async def test_a_previous_response_id_call_is_billed_from_upstream_usage(
    gw: Proc, oai: openai.AsyncOpenAI, account: tuple[str, str], redis_client: redis.Redis
) -> None:
    """Context the gateway cannot see (an earlier response's) is billed as the upstream
    reports it, far above the visible input's count."""
    account_id, _ = account
    first = await oai.responses.create(model="m", input="Remember the number 7.")
    raw = await oai.responses.with_raw_response.create(
        model="m",
        input="Which number?",
        previous_response_id=first.id,
        extra_headers={"x-mock-usage-prompt-tokens": "5000"},
    )
    answer = raw.parse()
    assert answer.usage is not None
    assert answer.usage.input_tokens == 5000
    wait_no_holds(redis_client, account_id)
    records = Admin(gw.url).usage(account_id)
    (record,) = [r for r in records if r["request_id"] == raw.headers["x-request-id"]]
    assert record["prompt_tokens"] == 5000
    assert micros(record["cost"]) == cost(5000, answer.usage.output_tokens)


async def test_a_background_response_is_refused(
    oai: openai.AsyncOpenAI, gw: Proc, account: tuple[str, str]
) -> None:
    """Its usage would come on a later read: it cannot be metered, so it is 400, nothing
    held (the balance is untouched)."""
    with pytest.raises(openai.BadRequestError) as info:
        await oai.responses.create(model="m", input="hi", background=True)
    assert info.value.param == "background"
    assert Admin(gw.url).account(account[0])["balance"] == "10.000000"


async def _call(
    method: str, url: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method,
            url,
            headers={"Authorization": f"Bearer {key}"},
            data=None if body is None else orjson.dumps(body),
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_a_stored_response_is_reached_only_by_its_account(
    gw: Proc, oai: openai.AsyncOpenAI, account: tuple[str, str]
) -> None:
    """GET, input_items, cancel and DELETE of a response id reach the upstream for the
    account that created it (streamed or not), and are 404 for any other account, for an
    id never created through the gateway, and without a key 401; nothing is charged."""
    whole = await oai.responses.create(model="m", input="Keep this one.")
    async with await oai.responses.create(model="m", input="And this.", stream=True) as stream:
        events = [event async for event in stream]
    streamed_id = events[0].response.id
    admin = Admin(gw.url)
    _, other = admin.funded(["m"], amount="1.00")
    before = admin.account(account[0])["balance"]
    for response_id in (whole.id, streamed_id):
        url = f"{gw.url}/v1/responses/{response_id}"
        fetched = await oai.responses.retrieve(response_id)
        assert fetched.id == response_id
        assert fetched.status == "completed"
        items = await oai.responses.input_items.list(response_id)
        assert items.data
        for method, path in (
            ("GET", ""),
            ("GET", "/input_items"),
            ("POST", "/cancel"),
            ("DELETE", ""),
        ):
            status, reply = await _call(method, url + path, other)
            assert status == 404, (method, path, reply)
            assert reply["error"]["code"] == "not_found"
        with pytest.raises(openai.BadRequestError):  # the upstream's own answer, passed on
            await oai.responses.cancel(response_id)
    await oai.responses.delete(whole.id)
    with pytest.raises(openai.NotFoundError):  # deleted upstream: its 404 passes through
        await oai.responses.retrieve(whole.id)
    status, _ = await _call("GET", f"{gw.url}/v1/responses/resp_never_seen", account[1])
    assert status == 404
    status, _ = await _call("GET", f"{gw.url}/v1/responses/{streamed_id}", "sk-nonsense")
    assert status == 401
    assert admin.account(account[0])["balance"] == before


# -- Anthropic Messages ----------------------------------------------------------------------


async def test_messages_create_and_stream_are_billed_from_upstream_usage(
    gw: Proc,
    claude: anthropic.AsyncAnthropic,
    account: tuple[str, str],
    redis_client: redis.Redis,
) -> None:
    """`messages.create` and `messages.stream` (with a system prompt, content blocks and
    tools): each parses in the SDK; its record's prompt is Anthropic's input_tokens plus
    the cache reads and writes, each class billed at its price."""
    account_id, _ = account
    raw = await claude.messages.with_raw_response.create(
        model="m",
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hello."}]}],
        tools=[
            {
                "name": "get_weather",
                "description": "The weather in a city.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
            }
        ],
        extra_headers={"x-mock-usage-cached-tokens": "2", "x-mock-usage-cache-write-tokens": "1"},
    )
    message = await raw.parse()
    ids = [raw.headers["x-request-id"]]
    usage = message.usage
    assert usage.cache_read_input_tokens == 2
    assert usage.cache_creation_input_tokens == 1
    prompt = usage.input_tokens + 2 + 1
    reported = [(prompt, usage.output_tokens, 2, 1)]

    async with claude.messages.stream(
        model="m", max_tokens=64, messages=[{"role": "user", "content": "Hello there"}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
        ids.append(stream.response.headers["x-request-id"])
    assert text == final.content[0].text  # type: ignore[union-attr]
    reported.append((final.usage.input_tokens, final.usage.output_tokens, 0, 0))

    records, balance = _settled(gw, redis_client, account_id, ids)
    spent = 0
    for request_id, (prompt, completion, read, written) in zip(ids, reported, strict=True):
        record = records[request_id]
        assert record["usage_source"] == "upstream"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
        assert (record["cached_tokens"], record["cache_write_tokens"]) == (read, written)
        # No cache prices configured: each class at the input price.
        assert micros(record["cost"]) == cost(prompt, completion)
        spent += cost(prompt, completion)
    assert micros(balance["balance"]) == micros("10.00") - spent


async def test_messages_without_usage_are_billed_by_local_count(
    gw: Proc,
    claude: anthropic.AsyncAnthropic,
    account: tuple[str, str],
    redis_client: redis.Redis,
) -> None:
    account_id, _ = account
    omit = {"x-mock-omit-usage": "true"}
    raw = await claude.messages.with_raw_response.create(
        model="m",
        max_tokens=64,
        system="Be brief.",
        messages=[{"role": "user", "content": "Hello there"}],
        extra_headers=omit,
    )
    message = await raw.parse()
    status, body = await _raw_messages(gw, account[1], {"stream": True}, omit)
    assert status == 200
    streamed = "".join(
        event["delta"]["text"] for event in _data(body) if event["type"] == "content_block_delta"
    )
    ids = [raw.headers["x-request-id"], body_ids.pop()]
    records, _ = _settled(gw, redis_client, account_id, ids)
    expected = [
        (
            chat_prompt(("system", "Be brief."), ("user", "Hello there")),
            tokens(message.content[0].text),  # type: ignore[union-attr]
        ),
        (chat_prompt(("user", "Hello there")), tokens(streamed)),
    ]
    for request_id, (prompt, completion) in zip(ids, expected, strict=True):
        record = records[request_id]
        assert record["usage_source"] == "gateway"
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
        assert micros(record["cost"]) == cost(prompt, completion)


body_ids: list[str] = []


def _data(raw: bytes) -> list[dict[str, Any]]:
    return [orjson.loads(line[6:]) for line in raw.splitlines() if line.startswith(b"data: ")]


async def _raw_messages(
    gw: Proc,
    key: str,
    extra: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    key_header: str = "x-api-key",
) -> tuple[int, bytes]:
    body = {
        "model": "m",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello there"}],
        **(extra or {}),
    }
    sent = {"anthropic-version": "2023-06-01", **(headers or {})}
    if key_header == "x-api-key":
        sent["x-api-key"] = key
    elif key:
        sent["Authorization"] = f"Bearer {key}"
    async with (
        aiohttp.ClientSession() as session,
        session.post(gw.url + "/v1/messages", data=orjson.dumps(body), headers=sent) as resp,
    ):
        body_ids.append(resp.headers["x-request-id"])
        return resp.status, await resp.read()


async def test_messages_headers_pass_and_the_key_stays_behind(
    gw: Proc, mock_a: Proc, account: tuple[str, str]
) -> None:
    """`anthropic-version` and `anthropic-beta` reach the upstream as sent; the client's
    `x-api-key` (the gateway's key) does not: the upstream gets its own key."""
    status, _ = await _raw_messages(
        gw, account[1], headers={"anthropic-beta": "prompt-caching-2024-07-31"}
    )
    assert status == 200
    async with (
        aiohttp.ClientSession() as session,
        session.get(mock_a.url + "/debug/last-request") as resp,
    ):
        seen = orjson.loads(await resp.read())
    headers = {name.lower(): value for name, value in seen["headers"].items()}
    assert seen["path"] == "/v1/messages"
    assert headers["anthropic-version"] == "2023-06-01"
    assert headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert account[1] not in str(seen["headers"])
    assert headers["x-api-key"] != account[1]


async def test_messages_errors_are_in_anthropic_shape(
    gw: Proc, claude: anthropic.AsyncAnthropic, account: tuple[str, str]
) -> None:
    """The gateway's own refusals on /v1/messages, with its table's statuses, in the shape
    Anthropic's SDK raises as its typed errors."""
    admin = Admin(gw.url)
    status, raw = await _raw_messages(gw, "sk-not-a-key")
    assert status == 401
    body = orjson.loads(raw)
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert body["error"]["message"]
    status, raw = await _raw_messages(gw, account[1], {"max_tokens": None})  # it is required
    assert status == 400
    body = orjson.loads(raw)
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"] == "max_tokens: Field required"
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.create(
            model="nope", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    poor_id, poor_key = admin.funded(["m"], amount="0.000001")
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=poor_key, max_retries=0) as poor:
        with pytest.raises(anthropic.APIStatusError) as broke:
            await poor.messages.create(
                model="m", max_tokens=500, messages=[{"role": "user", "content": "hi"}]
            )
    assert broke.value.status_code == 402
    assert broke.value.body["error"]["type"] == "billing_error"  # type: ignore[index]
    assert broke.value.body["error"]["code"] == "insufficient_balance"  # type: ignore[index]
    status, raw = await _raw_messages(gw, account[1], headers={"x-mock-status": "529"})
    assert status == 529  # the upstream's own error passes through as it came
    assert orjson.loads(raw)["type"] == "error"
    assert admin.account(poor_id)["balance"] == "0.000001"


async def test_a_bearer_key_works_on_messages_too(gw: Proc, account: tuple[str, str]) -> None:
    status, raw = await _raw_messages(gw, account[1], key_header="bearer")
    assert status == 200, raw
    status, raw = await _raw_messages(gw, "", key_header="none")
    assert status == 401
    assert orjson.loads(raw)["error"]["type"] == "authentication_error"


async def test_count_tokens_is_forwarded_and_free(
    gw: Proc, claude: anthropic.AsyncAnthropic, account: tuple[str, str]
) -> None:
    counted = await claude.messages.count_tokens(
        model="m", messages=[{"role": "user", "content": "Hello there"}]
    )
    assert counted.input_tokens == tokens("Hello there")  # the mock's count, passed on
    assert Admin(gw.url).account(account[0])["balance"] == "10.000000"
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key="sk-x", max_retries=0) as bad:
        with pytest.raises(anthropic.AuthenticationError):
            await bad.messages.count_tokens(model="m", messages=[{"role": "user", "content": "hi"}])


# -- token classes and holds -----------------------------------------------------------------

CLASS_PRICES = {
    "input_per_million": "0.15",
    "output_per_million": "0.60",
    "cached_input_per_million": "0.075",
    "cache_write_per_million": "0.1875",
    "reasoning_per_million": "1.20",
}


def class_cost(
    prompt: int, completion: int, cached: int = 0, written: int = 0, reasoning: int = 0
) -> int:
    """Each class at its own price (CLASS_PRICES), exact, rounded up once."""
    p = {k: Fraction(v) for k, v in CLASS_PRICES.items()}
    exact = (
        (prompt - cached - written) * p["input_per_million"]
        + cached * p["cached_input_per_million"]
        + written * p["cache_write_per_million"]
        + (completion - reasoning) * p["output_per_million"]
        + reasoning * p["reasoning_per_million"]
    )
    return -(-exact.numerator // exact.denominator)


@pytest.fixture
def priced(make_gateway: Callable[..., Proc], mock_a: Proc) -> Proc:
    """The model with a price for every class, and 100 output tokens held by default."""
    entry = model_entry("m", mock_a.url, upstream_model="mock-model")
    entry["upstreams"][0]["apis"] = APIS
    entry["pricing"] = CLASS_PRICES
    return make_gateway([entry], billing={"hold_output_tokens": 100})


async def test_each_token_class_is_billed_at_its_price_on_both_apis(
    priced: Proc, redis_client: redis.Redis
) -> None:
    """Responses' cached and reasoning tokens, Messages' cache reads and writes: each at its
    class's price, as the upstream's usage put them."""
    admin = Admin(priced.url)
    account_id, key = admin.funded(["m"], amount="10.00")
    async with openai.AsyncOpenAI(base_url=priced.url + "/v1", api_key=key) as oai:
        raw = await oai.responses.with_raw_response.create(
            model="m",
            input="Think about it.",
            extra_headers={
                "x-mock-usage-cached-tokens": "4",
                "x-mock-usage-reasoning-tokens": "5",
            },
        )
    answer = raw.parse()
    assert answer.usage is not None
    expected = {
        raw.headers["x-request-id"]: (
            answer.usage.input_tokens,
            answer.usage.output_tokens,
            4,
            0,
            5,
        )
    }
    async with anthropic.AsyncAnthropic(base_url=priced.url, api_key=key) as claude:
        message = await claude.messages.with_raw_response.create(
            model="m",
            max_tokens=50,
            messages=[{"role": "user", "content": "Think about it."}],
            extra_headers={
                "x-mock-usage-cached-tokens": "3",
                "x-mock-usage-cache-write-tokens": "2",
            },
        )
    usage = (await message.parse()).usage
    expected[message.headers["x-request-id"]] = (
        usage.input_tokens + 3 + 2,
        usage.output_tokens,
        3,
        2,
        0,
    )
    wait_no_holds(redis_client, account_id)
    records = records_by_request(admin, account_id, list(expected))
    for request_id, (prompt, completion, cached, written, reasoning) in expected.items():
        record = records[request_id]
        assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
        assert record["cached_tokens"] == cached
        assert record["cache_write_tokens"] == written
        assert record["reasoning_tokens"] == reasoning
        assert micros(record["cost"]) == class_cost(prompt, completion, cached, written, reasoning)


def _hold(prompt: int, output: int) -> int:
    """A hold: the prompt at the dearest input class, the output at the dearest output."""
    exact = prompt * Fraction("0.1875") + output * Fraction("1.20")
    return -(-exact.numerator // exact.denominator)


async def _balance_decides(gw: Proc, hold: int, call: Callable[[str], Any]) -> tuple[int, int]:
    """The statuses of `call` for an account holding one micro-unit less than `hold`, and
    for one holding exactly it."""
    admin = Admin(gw.url)
    statuses = []
    for amount in (hold - 1, hold):
        _, key = admin.funded(["m"], amount=f"{amount // 1_000_000}.{amount % 1_000_000:06d}")
        statuses.append(await call(key))
    return statuses[0], statuses[1]


async def test_a_previous_response_id_call_holds_the_visible_input_and_hold_output_tokens(
    priced: Proc,
) -> None:
    """The hidden context is not held: the hold is the visible input (as the chat request it
    renders to) plus `hold_output_tokens` (100) of output; one micro-unit less is 402."""
    prompt = chat_prompt(("user", "And the next one?"))

    async def call(key: str) -> int:
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "input": "And the next one?", "previous_response_id": "resp_x"}
            async with session.post(
                priced.url + "/v1/responses",
                data=orjson.dumps(body),
                headers={"Authorization": f"Bearer {key}"},
            ) as resp:
                return resp.status

    assert await _balance_decides(priced, _hold(prompt, 100), call) == (402, 200)


async def test_max_output_tokens_and_max_tokens_size_the_holds(priced: Proc) -> None:
    """A Responses call's `max_output_tokens` and a Messages call's `max_tokens` are the
    output its hold covers."""
    prompt = chat_prompt(("user", "Hello there"))

    async def responses_call(key: str) -> int:
        async with openai.AsyncOpenAI(
            base_url=priced.url + "/v1", api_key=key, max_retries=0
        ) as oai:
            try:
                await oai.responses.create(model="m", input="Hello there", max_output_tokens=7)
            except openai.APIStatusError as exc:
                return exc.status_code
            return 200

    async def messages_call(key: str) -> int:
        async with anthropic.AsyncAnthropic(
            base_url=priced.url, api_key=key, max_retries=0
        ) as claude:
            try:
                await claude.messages.create(
                    model="m", max_tokens=9, messages=[{"role": "user", "content": "Hello there"}]
                )
            except anthropic.APIStatusError as exc:
                return exc.status_code
            return 200

    assert await _balance_decides(priced, _hold(prompt, 7), responses_call) == (402, 200)
    assert await _balance_decides(priced, _hold(prompt, 9), messages_call) == (402, 200)
