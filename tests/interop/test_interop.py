"""Real upstreams (LiteLLM's proxy, llama-cpp-python's server) and real clients (plain HTTP,
the OpenAI Python SDK, the OpenAI Node SDK) through the gateway.

Every check makes the same call twice with the same client, once straight to the upstream and
once through the gateway, and compares: a non-streamed answer JSON-equal, a stream event by
event byte-equal, once per-call fields (id, created, system_fingerprint) are normalised.
Billing checks read the usage record the call left and the balance it moved.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from tests.admin_client import Admin
from tests.billing.checks import expected_cost, micros, wait_no_holds
from tests.interop.clients import CLIENTS, Call, Reply, run_calls
from tests.interop.servers import Upstream
from tests.interop.sse import (
    drop_zero_usage,
    drop_zero_usage_json,
    events,
    normalise_json,
    usage_events,
    without_cost,
    without_cost_json,
)
from tests.procs import Proc

# The first test also waits for both servers and the gateway to start.
pytestmark = pytest.mark.timeout(600)

UPSTREAMS = ["litellm", "llama"]
KINDS = ["chat", "completions"]
PROMPT = "Say hello to the gateway."


@pytest.fixture(params=UPSTREAMS)
def upstream(request: pytest.FixtureRequest, upstreams: dict[str, Upstream]) -> Upstream:
    return upstreams[request.param]


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest, node: tuple[str, Any] | None) -> str:
    if request.param == "openai-node" and node is None:
        pytest.skip("node or npm is not installed: the Node SDK is not tried")
    return str(request.param)


@pytest.fixture
def account(interop_admin: Admin) -> tuple[str, str]:
    """A fresh funded account (id, key) subscribed to every interop model."""
    return interop_admin.funded(["mock-chat", "tiny", "lite-refused"], amount="100.00")


def body(up: Upstream, kind: str, **extra: Any) -> dict[str, Any]:
    if kind == "chat":
        call: dict[str, Any] = {"messages": [{"role": "user", "content": PROMPT}]}
    else:
        call = {"prompt": PROMPT}
    # 32: more than the LiteLLM mock's whole answer (it ignores max_tokens, and the gateway
    # bills no more completion tokens than the call allowed).
    return {"model": up.model, **call, "max_tokens": 32, "temperature": 0, **extra}


async def pair(
    client: str,
    node: Any,
    up: Upstream,
    gateway: Proc,
    key: str,
    kind: str,
    payload: dict[str, Any],
    mode: str = "raw",
    gateway_payload: dict[str, Any] | None = None,
) -> tuple[Reply, Reply]:
    """The same call straight to `up` and through the gateway, by the same client."""
    calls = [
        Call(up.base, up.key, kind, payload, mode),  # type: ignore[arg-type]
        Call(gateway.url + "/v1", key, kind, gateway_payload or payload, mode),  # type: ignore[arg-type]
    ]
    direct, via = await run_calls(client, calls, node)
    return direct, via


def _ok(reply: Reply, who: str) -> None:
    assert reply.status == 200, f"{who} answered {reply.status}: {reply.body[:500]!r}"


STREAM_OPTIONS = {
    "no-usage": {"stream": True},
    "usage": {"stream": True, "stream_options": {"include_usage": True}},
}


# ---------------------------------------------------------------------------------------------
# Answers equal to direct calls


@pytest.mark.parametrize("kind", KINDS)
async def test_plain_answer_equals_direct(
    upstream: Upstream,
    client: str,
    node: Any,
    interop_gateway: Proc,
    account: tuple[str, str],
    kind: str,
) -> None:
    """A non-streamed answer through the gateway is JSON-equal to the direct one (per-call
    fields aside), with the same content type, and the SDK parses both alike."""
    payload = body(upstream, kind)
    direct, via = await pair(client, node, upstream, interop_gateway, account[1], kind, payload)
    _ok(direct, f"{upstream.name} directly")
    _ok(via, "the gateway")
    assert normalise_json(via.json()) == normalise_json(direct.json())
    assert via.headers.get("content-type") == direct.headers.get("content-type")
    direct, via = await pair(
        client, node, upstream, interop_gateway, account[1], kind, payload, mode="parsed"
    )
    assert direct.parsed, direct
    assert normalise_json(via.parsed) == normalise_json(direct.parsed)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("usage", list(STREAM_OPTIONS))
async def test_stream_equals_direct(
    upstream: Upstream,
    client: str,
    node: Any,
    interop_gateway: Proc,
    account: tuple[str, str],
    kind: str,
    usage: str,
) -> None:
    """A stream through the gateway is, event for event, the bytes of the direct stream
    (ids and timestamps normalised). A client that did not ask for usage gets no usage event
    (the gateway asks the upstream for one, to bill by, and must strip it); one that asked
    gets the upstream's. The SDK parses both streams alike.

    One allowance, for the client that did not ask: LiteLLM's legacy-completions stream then
    carries an all-zero `usage` on every chunk, which it drops when usage is asked for (as
    the gateway does); those members are not expected through the gateway."""
    payload = body(upstream, kind, **STREAM_OPTIONS[usage])
    direct, via = await pair(client, node, upstream, interop_gateway, account[1], kind, payload)
    _ok(direct, f"{upstream.name} directly")
    _ok(via, "the gateway")
    assert direct.headers.get("content-type", "").startswith("text/event-stream")
    assert via.headers.get("content-type") == direct.headers.get("content-type")
    expected = events(direct.body)
    if usage == "no-usage":
        expected = [drop_zero_usage(event) for event in expected]
    relayed, costs = without_cost(events(via.body))
    assert relayed == expected
    assert via.body.replace(b"\r\n", b"\n").rstrip().endswith(b"data: [DONE]")
    if usage == "usage" and upstream.stream_usage:
        assert len(usage_events(direct.body)) == 1, direct.body
        assert len(costs) == 1, via.body  # the only change: the cost, in the usage chunk
    else:
        assert usage_events(b"\n\n".join(expected)) == []
        assert usage_events(via.body) == []
        assert costs == []
    direct, via = await pair(
        client, node, upstream, interop_gateway, account[1], kind, payload, mode="parsed"
    )
    assert direct.parsed, direct
    expected = direct.parsed if usage == "usage" else drop_zero_usage_json(direct.parsed)
    parsed, costs = without_cost_json(via.parsed)
    assert normalise_json(parsed) == normalise_json(expected)
    assert len(costs) == (1 if usage == "usage" and upstream.stream_usage else 0)


async def test_upstream_headers_stay_behind(
    upstream: Upstream, client: str, node: Any, interop_gateway: Proc, account: tuple[str, str]
) -> None:
    """The upstream's own bookkeeping headers (LiteLLM's x-litellm-*: its call id, model id,
    API base, version, key spend, costs) do not reach the gateway's clients; the gateway's
    request id does."""
    for extra in ({}, STREAM_OPTIONS["no-usage"]):
        payload = body(upstream, "chat", **extra)
        direct, via = await pair(
            client, node, upstream, interop_gateway, account[1], "chat", payload
        )
        _ok(direct, f"{upstream.name} directly")
        _ok(via, "the gateway")
        if upstream.name == "litellm":
            assert any(name.startswith("x-litellm-") for name in direct.headers)
        leaked = sorted(name for name in via.headers if name.startswith("x-litellm-"))
        assert leaked == [], leaked
        assert via.headers["x-request-id"].startswith("req_")


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded"], ids=["none", "curl-default"]
)
async def test_client_content_type_does_not_matter(
    upstream: Upstream,
    interop_gateway: Proc,
    account: tuple[str, str],
    content_type: str | None,
) -> None:
    """The gateway reads the body as JSON whatever the client's Content-Type says (none, or
    curl's default for -d), and the upstream gets JSON labelled as JSON: the answer equals a
    direct call made with `Content-Type: application/json`."""
    payload = body(upstream, "chat")
    direct, via = await run_calls(
        "http",
        [
            Call(upstream.base, upstream.key, "chat", payload),
            Call(
                interop_gateway.url + "/v1", account[1], "chat", payload, content_type=content_type
            ),
        ],
    )
    _ok(direct, f"{upstream.name} directly")
    _ok(via, "the gateway")
    assert normalise_json(via.json()) == normalise_json(direct.json())


# ---------------------------------------------------------------------------------------------
# Billing


def _usage_of(reply: Reply, stream: bool) -> dict[str, int]:
    if not stream:
        return dict(reply.json()["usage"])
    found = usage_events(reply.body)
    assert len(found) == 1, found
    return dict(json.loads(found[0][len(b"data: ") :])["usage"])


def _records(admin: Admin, account_id: str) -> list[dict[str, Any]]:
    return [r for r in admin.usage(account_id) if r["kind"] == "inference"]


def _wait_record(admin: Admin, account_id: str, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        found = [r for r in _records(admin, account_id) if r["request_id"] == request_id]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no usage record for {request_id} within 15s")


@pytest.mark.parametrize("mode", ["plain", *STREAM_OPTIONS])
async def test_billed_from_upstream_usage(
    upstream: Upstream,
    client: str,
    node: Any,
    interop_gateway: Proc,
    interop_admin: Admin,
    redis_client: redis.Redis,
    account: tuple[str, str],
    mode: str,
) -> None:
    """A call through the gateway leaves exactly one usage record under its x-request-id,
    sourced from the upstream's usage with the upstream's token counts, and the balance moves
    by exactly those tokens at the model's prices. A streaming client that did not ask for
    usage is billed from the usage the gateway asked for on its behalf. A stream from an
    upstream that reports no usage (llama-cpp-python) is billed from the gateway's own count,
    and the record says so."""
    account_id, key = account
    stream = mode != "plain"
    payload = body(upstream, "chat", **STREAM_OPTIONS.get(mode, {}))
    # What the upstream counts for this very call (the answers are deterministic): a direct
    # call that reports usage.
    reference = payload if mode != "no-usage" else body(upstream, "chat", **STREAM_OPTIONS["usage"])
    direct, via = await pair(
        client, node, upstream, interop_gateway, key, "chat", reference, gateway_payload=payload
    )
    _ok(direct, f"{upstream.name} directly")
    _ok(via, "the gateway")
    request_id = via.headers["x-request-id"]
    record = _wait_record(interop_admin, account_id, request_id)
    wait_no_holds(redis_client, account_id)
    assert record["stream"] is stream
    assert record["model"] == upstream.model
    assert record["status"] == "ok"
    if stream and not upstream.stream_usage:
        assert usage_events(direct.body) == []
        assert usage_events(via.body) == []
        assert record["usage_source"] == "gateway", record
        # Its own count (o200k_base, not the tiny model's vocabulary), no more completion
        # tokens than the call allowed.
        billed = {
            "prompt_tokens": record["gateway_prompt_tokens"],
            "completion_tokens": min(record["gateway_completion_tokens"], payload["max_tokens"]),
        }
        assert billed["completion_tokens"] > 0
    else:
        billed = _usage_of(direct, stream)
        if mode != "no-usage":
            relayed = _usage_of(via, stream)
            if stream:  # the gateway's one addition to a stream: its cost, in the usage
                assert relayed.pop("cost") == record["cost"], relayed
            assert relayed == billed
        assert record["usage_source"] == "upstream", record
    if not stream:  # the cost on a whole answer, as the client's own library read it
        assert via.headers["x-gateway-cost"] == record["cost"]
    assert record["prompt_tokens"] == billed["prompt_tokens"], record
    assert record["completion_tokens"] == billed["completion_tokens"], record
    cost = expected_cost(billed["prompt_tokens"], billed["completion_tokens"], *upstream.prices)
    assert micros(record["cost"]) == cost
    balance = micros(interop_admin.account(account_id)["balance"])
    assert micros("100.00") - balance == cost
    records = _records(interop_admin, account_id)
    assert [r["request_id"] for r in records] == [request_id]


# ---------------------------------------------------------------------------------------------
# Upstream errors


def _error(reply: Reply) -> Any:
    """An error answer's body; the Node SDK gives only the parsed `error` object of it."""
    if reply.body:
        return json.loads(reply.body)
    return {"error": reply.parsed}


async def test_upstream_error_passes_through_and_costs_nothing(
    upstream: Upstream,
    client: str,
    node: Any,
    interop_gateway: Proc,
    interop_admin: Admin,
    redis_client: redis.Redis,
    account: tuple[str, str],
) -> None:
    """A call the upstream refuses (LiteLLM: a model it does not know; llama.cpp: a prompt
    over its context) comes back with the upstream's status and error body, as a direct call
    does, and costs nothing: no usage record, the balance untouched. Streamed too, where the
    upstream refuses a stream with a status."""
    account_id, key = account
    direct_payload, gateway_payload = upstream.refused
    tries: list[dict[str, Any]] = [{}]
    if upstream.refuses_streams:
        tries.append(STREAM_OPTIONS["no-usage"])
    for extra in tries:
        direct, via = await pair(
            client,
            node,
            upstream,
            interop_gateway,
            key,
            "chat",
            {**direct_payload, **extra},
            gateway_payload={**gateway_payload, **extra},
        )
        assert 400 <= direct.status < 500, (direct.status, direct.body)
        assert via.status == direct.status, (via.status, via.body, direct.body)
        assert normalise_json(_error(via)) == normalise_json(_error(direct))
        assert via.headers.get("content-type") == direct.headers.get("content-type")
    wait_no_holds(redis_client, account_id)
    assert _records(interop_admin, account_id) == []
    assert interop_admin.account(account_id)["balance"] == "100.000000"
