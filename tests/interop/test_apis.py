"""LiteLLM's proxy serving OpenAI's Responses API (POST /v1/responses) and Anthropic's
Messages API (POST /v1/messages, /v1/messages/count_tokens), straight and behind the gateway,
driven by the official SDKs (api_clients.py).

LiteLLM's two API_MODELS have the project's mock upstream as their provider, so the usage is
true and carries cache classes (servers.py). `lite-openai` passes Responses calls through to
the mock's /v1/responses and translates Messages calls to Responses calls; `lite-claude`
passes Messages calls through to the mock's /v1/messages and translates Responses calls to
Messages calls: between them every way LiteLLM serves the two APIs.

The first test pins what LiteLLM itself answers (direct calls only). The others make each call
twice with the same SDK, straight to LiteLLM and through the gateway, and compare the answers
(per-call ids and timestamps normalised), the usage record the gateway call left with the
usage LiteLLM reported, and the balance it moved with the cost of those tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import redis

from gateway.metering.tokenizers import get_encoding
from gateway.request_ids import upstream_request_id
from tests.admin_client import Admin
from tests.billing.checks import expected_cost, micros, records_by_request, wait_no_holds
from tests.interop.api_clients import (
    API_OF,
    CALLS,
    PROMPT,
    ApiReply,
    count_tokens,
    make_call,
    normalise_reply,
)
from tests.interop.conftest import LITELLM_PRICES
from tests.interop.servers import API_MODELS, CACHE_READ, CACHE_WRITE, LITELLM_KEY, Server
from tests.procs import Proc

# The first test also waits for the servers and the gateway to start.
pytestmark = pytest.mark.timeout(600)

STREAMED = {"responses-stream", "messages-create-stream", "messages-stream"}
# The model on whose provider LiteLLM serves each API natively (the other translates it).
NATIVE = {"responses": "lite-openai", "messages": "lite-claude"}


@pytest.fixture(params=API_MODELS)
def model(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=CALLS)
def call(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def account(interop_admin: Admin) -> tuple[str, str]:
    """A fresh funded account (id, key) subscribed to the models these tests call."""
    return interop_admin.funded([*API_MODELS, "lite-refused"], amount="100.00")


def _ok(reply: ApiReply, who: str) -> None:
    assert reply.status == 200, f"{who} answered {reply.status}: {reply.error!r}"


def _tokens(text: str) -> int:
    """Tokens of `text` as the mock counts them (its default encoding)."""
    return len(get_encoding("o200k_base").encode(text))


def billed(api: str, usage: dict[str, Any]) -> dict[str, int]:
    """What a call with this usage is billed for, by the gateway's reading of each API: a
    Responses usage's `input_tokens` is every prompt token (cached ones among them, in
    `input_tokens_details`); a Messages usage's `input_tokens` only the uncached ones, the
    cache reads and writes counted beside it."""
    if api == "responses":
        return {
            "prompt_tokens": usage["input_tokens"],
            "completion_tokens": usage["output_tokens"],
            "cached_tokens": usage["input_tokens_details"]["cached_tokens"],
            "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"],
        }
    read = usage.get("cache_read_input_tokens") or 0
    write = usage.get("cache_creation_input_tokens") or 0
    return {
        "prompt_tokens": usage["input_tokens"] + read + write,
        "completion_tokens": usage["output_tokens"],
        "cached_tokens": read,
        "cache_write_tokens": write,
    }


async def pair(
    litellm: Server, gateway: Proc, key: str, model: str, call: str
) -> tuple[ApiReply, ApiReply]:
    """The same call straight to LiteLLM and through the gateway, by the same SDK."""
    direct = await make_call(litellm.url, LITELLM_KEY, model, call)
    via = await make_call(gateway.url, key, model, call)
    return direct, via


# ---------------------------------------------------------------------------------------------
# LiteLLM on its own


async def test_litellm_serves_both_apis(litellm_server: Server, model: str, call: str) -> None:
    """Straight to LiteLLM (no gateway): each API answers on both models, whole and streamed,
    with the mock's true usage, in the API's own usage shape. What LiteLLM 1.106.12 does
    that the gateway must bill right:
    - a Responses stream has no `event:` lines (only `data:`), ends with `data: [DONE]`, and
      its usage is in `response.completed` alone;
    - a Messages stream that LiteLLM translates (`lite-openai`) says 0 input tokens in
      `message_start` and the real input and cache counts in `message_delta`, beside the
      output count; a native one (`lite-claude`) has them in both, and `message_start` says
      1 output token."""
    api = API_OF[call]
    reply = await make_call(litellm_server.url, LITELLM_KEY, model, call)
    _ok(reply, "LiteLLM")
    assert reply.headers["content-type"].startswith(
        "text/event-stream" if call in STREAMED else "application/json"
    )
    assert reply.text
    tokens = billed(api, reply.usage)
    assert tokens["prompt_tokens"] == _tokens(PROMPT), reply.usage
    assert tokens["completion_tokens"] == _tokens(reply.text), reply.usage
    assert tokens["cached_tokens"] == CACHE_READ, reply.usage
    if api == "responses":
        assert reply.usage["input_tokens_details"]["cache_write_tokens"] == CACHE_WRITE
        assert reply.usage["total_tokens"] == tokens["prompt_tokens"] + tokens["completion_tokens"]
    else:
        assert tokens["cache_write_tokens"] == CACHE_WRITE, reply.usage
    if call == "responses-stream":
        with_usage = [e["type"] for e in reply.answer if (e.get("response") or {}).get("usage")]
        assert with_usage == ["response.completed"], reply.answer
    if call == "messages-create-stream":
        (start,) = [e["message"]["usage"] for e in reply.answer if e["type"] == "message_start"]
        (delta,) = [e["usage"] for e in reply.answer if e["type"] == "message_delta"]
        assert delta["output_tokens"] == tokens["completion_tokens"], delta
        assert delta["input_tokens"] == reply.usage["input_tokens"], delta
        if model == NATIVE["messages"]:
            assert start["input_tokens"] == reply.usage["input_tokens"], start
            assert start["output_tokens"] == 1, start
        else:
            assert start["input_tokens"] == start["output_tokens"] == 0, start


async def test_litellm_counts_tokens(litellm_server: Server, model: str) -> None:
    """LiteLLM serves /v1/messages/count_tokens: from the provider on `lite-claude` (the mock's
    count of the prompt), and by its own local estimate on `lite-openai` (not the mock's:
    LiteLLM counts a chat prompt, with its per-message overhead)."""
    reply = await count_tokens(litellm_server.url, LITELLM_KEY, model)
    _ok(reply, "LiteLLM")
    if model == NATIVE["messages"]:
        assert reply.answer == {"input_tokens": _tokens(PROMPT), "litellm_count_source": "provider"}
    else:
        assert reply.answer["litellm_count_source"] == "local_estimate", reply.answer
        assert reply.answer["input_tokens"] > _tokens(PROMPT), reply.answer


# ---------------------------------------------------------------------------------------------
# Through the gateway


async def test_answer_equals_direct(
    litellm_server: Server, interop_gateway: Proc, account: tuple[str, str], model: str, call: str
) -> None:
    """Through the gateway, the SDK reads the answer a direct call gets: the same text, the
    same whole answer or the same stream events (per-call ids and timestamps normalised), the
    same content type."""
    direct, via = await pair(litellm_server, interop_gateway, account[1], model, call)
    _ok(direct, "LiteLLM directly")
    _ok(via, "the gateway")
    assert via.text == direct.text
    assert normalise_reply(via.answer) == normalise_reply(direct.answer)
    assert via.headers.get("content-type") == direct.headers.get("content-type")
    assert via.headers["x-request-id"].startswith("req_")
    leaked = sorted(name for name in via.headers if name.startswith("x-litellm-"))
    assert leaked == [], leaked


async def test_billed_from_litellm_usage(
    litellm_server: Server,
    interop_gateway: Proc,
    interop_admin: Admin,
    redis_client: redis.Redis,
    account: tuple[str, str],
    model: str,
    call: str,
) -> None:
    """A call through the gateway leaves exactly one usage record under its x-request-id,
    sourced from the usage LiteLLM reported (the same to a direct client and through the
    gateway): a Responses call's prompt its `input_tokens`, a Messages call's its
    `input_tokens` with the cache reads and writes (a stream's as `message_delta` left them),
    the completion its `output_tokens`; and the balance moves by exactly those tokens at the
    model's prices."""
    account_id, key = account
    api = API_OF[call]
    direct, via = await pair(litellm_server, interop_gateway, key, model, call)
    _ok(direct, "LiteLLM directly")
    _ok(via, "the gateway")
    reported = normalise_reply({"usage": via.usage})["usage"]
    assert reported == normalise_reply({"usage": direct.usage})["usage"]
    tokens = billed(api, direct.usage)
    request_id = via.headers["x-request-id"]
    record = records_by_request(interop_admin, account_id, [request_id])[request_id]
    wait_no_holds(redis_client, account_id)
    assert record["kind"] == "inference", record
    assert record["model"] == model, record
    assert record["stream"] is (call in STREAMED), record
    assert record["status"] == "ok", record
    assert record["usage_source"] == "upstream", record
    assert {name: record[name] for name in tokens} == tokens, record
    cost = expected_cost(tokens["prompt_tokens"], tokens["completion_tokens"], *LITELLM_PRICES)
    assert micros(record["cost"]) == cost, record
    if call not in STREAMED:
        assert via.headers["x-gateway-cost"] == record["cost"]
    if isinstance(via.usage.get("cost"), str):  # a cost the gateway reports in the usage
        assert via.usage["cost"] == record["cost"], via.usage
    balance = micros(interop_admin.account(account_id)["balance"])
    assert micros("100.00") - balance == cost


async def test_count_tokens_is_free(
    litellm_server: Server,
    interop_gateway: Proc,
    interop_admin: Admin,
    redis_client: redis.Redis,
    account: tuple[str, str],
    model: str,
) -> None:
    """/v1/messages/count_tokens through the gateway answers what LiteLLM answers and costs
    nothing: the balance untouched, no usage record that costs anything."""
    account_id, key = account
    direct = await count_tokens(litellm_server.url, LITELLM_KEY, model)
    via = await count_tokens(interop_gateway.url, key, model)
    _ok(direct, "LiteLLM directly")
    _ok(via, "the gateway")
    assert via.answer == direct.answer
    assert via.headers.get("content-type") == direct.headers.get("content-type")
    wait_no_holds(redis_client, account_id)
    assert [r for r in interop_admin.usage(account_id) if micros(r["cost"])] == []
    assert interop_admin.account(account_id)["balance"] == "100.000000"


async def test_refused_call_passes_through_free(
    litellm_server: Server,
    interop_gateway: Proc,
    interop_admin: Admin,
    redis_client: redis.Redis,
    account: tuple[str, str],
    call: str,
) -> None:
    """A call LiteLLM refuses (a model it does not know: `lite-refused` routes to one) comes
    back through the gateway with LiteLLM's status and error body, in the API's own error
    shape (Anthropic's `{"type": "error", "error": {...}}` on /v1/messages), as a direct call
    does, and costs nothing: no usage record, the balance untouched."""
    account_id, key = account
    direct = await make_call(litellm_server.url, LITELLM_KEY, "no-such-model", call)
    via = await make_call(interop_gateway.url, key, "lite-refused", call)
    assert 400 <= direct.status < 500, (direct.status, direct.error)
    expected = direct.error
    if API_OF[call] == "messages":
        assert direct.error["type"] == "error", direct.error
        # LiteLLM names the caller's X-Request-Id in a Messages error (a direct call sends
        # none): through the gateway, the gateway's id, as the UUID it sends upstreams.
        assert "request_id" not in direct.error, direct.error
        expected = {**expected, "request_id": upstream_request_id(via.headers["x-request-id"])}
    assert (via.status, via.error) == (direct.status, expected)
    assert via.headers.get("content-type") == direct.headers.get("content-type")
    wait_no_holds(redis_client, account_id)
    assert interop_admin.usage(account_id) == []
    assert interop_admin.account(account_id)["balance"] == "100.000000"
