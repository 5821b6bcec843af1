"""The OpenAI-compatible model calls: admit and hold, forward, relay while metering, settle.

One Redis round trip admits a call (key, state, subscription and hold in one script) and one
settles it (debit, release, usage record in one script). A call that fails before its first
byte reaches the client costs nothing; one that ends early is billed for what was produced.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web

from gateway.accounts.apikeys import ParsedKey, parse_api_key
from gateway.api.body import parse_call_body, read_body
from gateway.billing.call import CallServices, MeteredCall, cost_cap
from gateway.config.schema import API_ROUTES, PassthroughRoute
from gateway.errors import (
    AccountCleared,
    AccountFrozen,
    ApiNotServed,
    GatewayError,
    InsufficientBalance,
    InternalError,
    InvalidApiKey,
    InvalidRequest,
    KeyBudgetExceeded,
    KeyExpired,
    ModelNotAllowedForKey,
    ModelNotFound,
    ModelNotSubscribed,
    NotFound,
    RateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.keys import (
    CONFIG,
    HTTP,
    JOURNAL,
    LEDGER,
    METRICS,
    REQUEST_ID,
    SETTLEMENTS,
    STOPPING,
    STORE,
)
from gateway.ledger import Admission, Ledger
from gateway.ledger.records import KeyBudgetState
from gateway.metering.prompt import CallKind
from gateway.metering.usage import CallStatus
from gateway.money import format_micros
from gateway.observability.access import CALL_LOG, CallLog
from gateway.observability.logging import get_logger
from gateway.proxy.forward import RelayOutcome, open_upstream, relay
from gateway.proxy.response_ids import ResponseIds, ResponseOwner
from gateway.proxy.routing import ANY_API, ModelRoute, Upstream
from gateway.ratelimit import headers_of
from gateway.state import Snapshot
from gateway.timefmt import iso_ms, now_ms

__all__ = ["known_key", "require_key", "routes"]

log = get_logger("gateway.billing")

_REFUSALS: dict[str, type[GatewayError]] = {
    "invalid_api_key": InvalidApiKey,
    "account_frozen": AccountFrozen,
    "account_cleared": AccountCleared,
    "model_not_subscribed": ModelNotSubscribed,
    "model_not_allowed_for_key": ModelNotAllowedForKey,
}
_MESSAGES = {
    "invalid_api_key": "Incorrect API key provided",
    "account_frozen": "the account is frozen for arrears; top up to use models again",
    "account_cleared": "the account was cleared for arrears; top up and subscribe again",
    "model_not_subscribed": "the account is not subscribed to model '{model}'",
    "model_not_allowed_for_key": "this API key may not call model '{model}' (its own model list)",
}


def require_key(request: web.Request, anthropic: bool = False) -> ParsedKey:
    """The caller's key, well-formed, or 401 (checked against the ledger later). On
    Anthropic's routes it may come as `x-api-key` (as Anthropic's SDKs send it) as well."""
    authorization = request.headers.get("Authorization")
    if anthropic and authorization is None and "x-api-key" in request.headers:
        authorization = "Bearer " + request.headers["x-api-key"]
    key = parse_api_key(authorization)
    if key is None:
        how = "'x-api-key: <key>' or " if anthropic else ""
        raise InvalidApiKey(
            f"Incorrect or missing API key; send {how}'Authorization: Bearer <key>'"
        )
    return key


async def known_key(
    ledger: Ledger, key: ParsedKey
) -> tuple[str, tuple[str, ...], tuple[str, ...] | None]:
    """The key's account state, its subscriptions and the models the key may call (None:
    all); 401 unless the ledger knows the key and it has not expired (a round trip of its
    own: for the model list, and for refusals)."""
    found = await ledger.authenticate(key.account_id, key.key_id, key.key_hash, now_ms())
    if found == "key_expired":
        raise KeyExpired("this API key has expired")
    if isinstance(found, str):
        raise InvalidApiKey(_MESSAGES["invalid_api_key"])
    return found


def _refuse(admission: Admission, model: str, hold: int) -> GatewayError:
    if admission.code == "rate_limited":
        retry_after = max(1, -(-admission.retry_after_ms // 1000))
        headers = headers_of(admission.rate)
        return RateLimited(f"rate limit reached for {admission.refused}", retry_after, headers)
    if admission.code == "insufficient_balance":
        available = format_micros(admission.available or 0)
        return InsufficientBalance(
            f"available balance {available} does not cover this call's hold of "
            f"{format_micros(hold)}"
        )
    if admission.code == "key_budget_exceeded" and admission.budget is not None:
        return KeyBudgetExceeded(_budget_message(admission.budget, hold))
    if admission.code == "key_expired" and admission.expired_ms is not None:
        return KeyExpired(f"this API key expired at {iso_ms(admission.expired_ms)}")
    error = _REFUSALS.get(admission.code)
    if error is None:
        return InternalError(f"admission failed: {admission.code}")
    return error(_MESSAGES[admission.code].format(model=model))


def _budget_message(state: KeyBudgetState, hold: int) -> str:
    left = max(0, state.budget - state.spent - state.held)
    when = (
        "over the key's life"
        if state.period_end_ms is None
        else f"until {iso_ms(state.period_end_ms)}"
    )
    return (
        f"this API key's budget of {format_micros(state.budget)} has {format_micros(left)} "
        f"left {when} ({format_micros(state.spent)} spent, {format_micros(state.held)} held "
        f"by calls in flight), less than this call's hold of {format_micros(hold)}"
    )


def _route(snapshot: Snapshot, name: str, kind: CallKind, passthrough: bool = False) -> ModelRoute:
    """The model's route for a call of `kind` (or a passthrough route's: any upstream): 404
    for a model the config lacks, 400 `api_not_served` for one none of whose upstreams speaks
    that API."""
    route = snapshot.routing.get(name)
    if route is None:
        raise ModelNotFound(f"the model '{name}' does not exist", param="model")
    if not passthrough and not route.speaks(kind):
        raise ApiNotServed(
            f"the model '{name}' is not served on {API_ROUTES[kind]}: its upstreams speak "
            + ", ".join(API_ROUTES[api] for api in route.apis()),
            param="model",
        )
    return route


def _upstream_body(
    body: bytes,
    payload: dict[str, Any],
    public_name: str,
    add_usage: bool,
    limits: dict[str, int] | None = None,
) -> Callable[[Upstream], bytes]:
    """Bytes for each upstream: the client's own when nothing needs to change; else the same
    object with the upstream's model name, `stream_options.include_usage` and/or the output
    limits the call's hold or cost cap covers (MeteredCall.body_limits) set."""
    changed: dict[str, bytes] = {}

    def for_upstream(upstream: Upstream) -> bytes:
        if upstream.model == public_name and not add_usage and not limits:
            return body
        cached = changed.get(upstream.model)
        if cached is None:
            new = {**payload, "model": upstream.model}
            if limits:
                new.update(limits)
            if add_usage:
                options = payload.get("stream_options")
                new["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
            cached = changed[upstream.model] = orjson.dumps(new)
        return cached

    return for_upstream


def _track(request: web.Request, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
    """Run a settlement or release as a task the app keeps until it is done: one cut off from
    its call still finishes, and shutdown waits for it before the store closes."""
    task = asyncio.ensure_future(work)
    pending = request.app[SETTLEMENTS]
    pending.add(task)
    task.add_done_callback(pending.discard)
    return task


def _status_of(outcome: RelayOutcome) -> CallStatus:
    if outcome.status == "ok":
        return "ok"
    if outcome.status == "client_disconnected":
        return "client_disconnected"
    return "upstream_error"


async def _proxy_only(
    request: web.Request,
    snapshot: Snapshot,
    body: bytes,
    payload: dict[str, Any],
    kind: CallKind,
    path: str,
    passthrough: bool = False,
) -> web.StreamResponse:
    """`billing.metering: false`: forward and relay, nothing counted or billed."""
    name = payload["model"]
    route = _route(snapshot, name, kind, passthrough)
    timeouts = snapshot.settings.proxy.timeouts
    upstream_call = await open_upstream(
        request.app[HTTP],
        route.candidates(ANY_API if passthrough else kind),
        path,
        _upstream_body(body, payload, name, add_usage=False),
        request.headers,
        request[REQUEST_ID],
        timeouts,
    )
    request[CALL_LOG].upstream = upstream_call.upstream.label
    passed = snapshot.settings.proxy.response_headers
    response, _ = await relay(request, upstream_call, timeouts, passed_headers=passed)
    return response


async def _forward(
    request: web.Request, kind: CallKind, path: str, flat: PassthroughRoute | None = None
) -> web.StreamResponse:
    """One call of `kind` (or, with `flat`, of a passthrough route at its price) from its
    body to its settlement."""
    started = time.perf_counter()  # not loop.time(): uvloop's counts whole milliseconds
    snapshot = request.app[CONFIG].snapshot
    settings = snapshot.settings
    entry: CallLog = request[CALL_LOG]
    if not settings.billing.metering:
        body = await read_body(
            request, settings.server.max_body_bytes, settings.server.read_timeout
        )
        payload = parse_call_body(body)
        entry.model = payload["model"]
        return await _proxy_only(request, snapshot, body, payload, kind, path, flat is not None)
    key = require_key(request, anthropic=kind == "messages")
    entry.account, entry.key_id = key.account_id, key.key_id
    app = request.app
    ledger = app[LEDGER]
    try:
        body = await read_body(
            request, settings.server.max_body_bytes, settings.server.read_timeout
        )
        payload = parse_call_body(body)
        _check_meterable(kind, payload)
        name = payload["model"]
        entry.model = name
        route = _route(snapshot, name, kind, flat is not None)
        services = CallServices(
            ledger, app[JOURNAL], app[METRICS], lambda work: _track(request, work)
        )
        call = MeteredCall(
            services,
            snapshot,
            route.config,
            key,
            request[REQUEST_ID],
            kind,
            payload,
            cost_cap(request.headers),
            entry,
        )
        entry.stream = call.stream
        if flat is not None:
            call.plan_flat(flat.price_per_call)
        else:
            await call.plan(len(body))
    except GatewayError:
        # A caller the ledger does not know learns nothing of the configuration (which
        # models exist, their limits): its refusal is the key's, checked first.
        await known_key(ledger, key)
        raise
    admission = await call.admit()
    if admission.code != "ok":
        raise _refuse(admission, call.model.name, call.hold)
    limit_headers = headers_of(admission.rate)
    transform, gate, keeper = call.relay_hooks()
    meter_flush = call.meter.flush
    answer_headers: Callable[[bytes], Coroutine[Any, Any, dict[str, str]]] = call.quote
    if kind == "responses":
        transform, answer_headers = _recording_ids(request, call, transform)

    metrics = app[METRICS]
    try:
        timeouts = settings.proxy.timeouts
        upstream_call = await open_upstream(
            app[HTTP],
            route.candidates(ANY_API if flat is not None else kind),
            path,
            _upstream_body(body, payload, name, call.add_usage, call.body_limits),
            request.headers,
            call.request_id,
            timeouts,
        )
        call.upstream_label = entry.upstream = upstream_call.upstream.label
        for label in upstream_call.refused:  # failed over: the call goes on, the error counts
            metrics.upstream_errors.labels(label, "upstream_unavailable").inc()
        if upstream_call.response.status >= 400:
            # The upstream's own error passes through as it came and costs nothing (and says
            # so, as every whole answer says what it cost).
            response, _ = await relay(
                request,
                upstream_call,
                timeouts,
                extra_headers={**limit_headers, **call.free_headers()},
                passed_headers=settings.proxy.response_headers,
            )
            await call.release()
            return response
        response, outcome = await relay(
            request,
            upstream_call,
            timeouts,
            transform=transform,
            gate=gate,
            flush=meter_flush,
            extra_headers=limit_headers,
            send_whole=True,
            passed_headers=settings.proxy.response_headers,
            answer_headers=answer_headers,
            after_chunk=keeper.on_chunk,
        )
        status = _status_of(outcome)
        if outcome.body is not None and status != "ok":
            call.forget_answer()  # a whole answer the connection did not take was never seen
        if outcome.first_chunk_at is not None:
            entry.ttft = outcome.first_chunk_at - started
        if outcome.status in ("upstream_error", "upstream_timeout"):
            metrics.upstream_errors.labels(call.upstream_label, outcome.status).inc()
        call.status = status
        # The answer is out: the settlement script runs as a task of its own (tracked, so a
        # shutdown waits for it), and this connection is free for the client's next call.
        bill = call.quoted if call.quoted and status == "ok" else await call.bill(status)
        _track(request, call.settlement(bill))
        return response
    except (UpstreamUnavailable, UpstreamTimeout) as exc:
        # Each upstream that failed the call, by its own label: a connection refused by one
        # and a timeout on the next are two failures, of two upstreams.
        for label, how in exc.failures or ((call.upstream_label or "(none)", exc.code),):
            metrics.upstream_errors.labels(label, how).inc()
        raise
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client's connection goes (handler_cancellation),
        # and at the end of a shutdown's drain. Unwinding closes the upstream request, which
        # vLLM and llama.cpp take as an abort.
        if call.status is None and not app[STOPPING].is_set():
            call.status = "client_disconnected"
        raise
    finally:
        keeper.stop()
        if not call.finished:
            # Shielded and tracked: the money is settled even though this task is being
            # cancelled.
            await asyncio.shield(_track(request, call.end_unfinished()))


def _check_meterable(kind: CallKind, payload: dict[str, Any]) -> None:
    """400 for a call whose usage the gateway could never see: a background response is
    answered at once, its output and usage fetched later by id."""
    if kind == "responses" and payload.get("background") is True:
        raise InvalidRequest(
            "background responses are not served through this gateway: their usage is not "
            "known when the call is answered, so they cannot be metered; call without "
            "'background' (streaming works)",
            param="background",
        )


def _recording_ids(
    request: web.Request, call: MeteredCall, transform: Callable[[bytes], bytes]
) -> tuple[Callable[[bytes], bytes], Callable[[bytes], Coroutine[Any, Any, dict[str, str]]]]:
    """The relay hooks of a Responses call that also record who created its response: a
    stream's as soon as its `response.created` passes, a whole answer's before it is sent.
    A store that cannot take the record costs the client nothing but that later access."""
    ids = ResponseIds(request.app[STORE])
    meter = call.meter
    ttl = int(call.settings.proxy.response_ttl)
    recorded = False

    async def remember(response_id: str) -> None:
        owner = ResponseOwner(call.key.account_id, call.model.name, call.upstream_label)
        try:
            await ids.remember(response_id, owner, ttl)
        except GatewayError as exc:
            log.warning(
                "could not record who created a response; its id cannot be read back",
                request_id=call.request_id,
                response_id=response_id,
                error=exc.message,
            )

    def on_chunk(chunk: bytes) -> bytes:
        nonlocal recorded
        out = transform(chunk)
        response_id = getattr(meter, "response_id", None)
        if not recorded and response_id:
            recorded = True
            _track(request, remember(response_id))
        return out

    async def quote(body: bytes) -> dict[str, str]:
        headers = await call.quote(body)
        response_id = getattr(meter, "response_id", None)
        if response_id:
            await remember(response_id)
        return headers

    return on_chunk, quote


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    return await _forward(request, "chat", "/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    return await _forward(request, "completions", "/completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings"""
    return await _forward(request, "embeddings", "/embeddings")


async def responses(request: web.Request) -> web.StreamResponse:
    """POST /v1/responses (OpenAI's Responses API)"""
    return await _forward(request, "responses", "/responses")


async def messages(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages (Anthropic's Messages API; errors in Anthropic's shape)"""
    return await _forward(request, "messages", "/messages")


async def _free_call(
    request: web.Request, upstream: Upstream, method: str, path: str, body: bytes | None
) -> web.StreamResponse:
    """Forward a call that costs nothing (a token count, a stored response's read) and relay
    its answer as it comes."""
    settings = request.app[CONFIG].snapshot.settings
    timeouts = settings.proxy.timeouts
    entry = request.get(CALL_LOG)  # a GET or DELETE is not logged as a call
    if entry is not None:
        entry.upstream = upstream.label
    upstream_call = await open_upstream(
        request.app[HTTP],
        (upstream,),
        path,
        None if body is None else (lambda _: body),
        request.headers,
        request[REQUEST_ID],
        timeouts,
        method=method,
    )
    response, _ = await relay(
        request, upstream_call, timeouts, passed_headers=settings.proxy.response_headers
    )
    return response


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """POST /v1/messages/count_tokens: forwarded to an upstream of the model that speaks
    Messages, free (a known key needed)."""
    snapshot = request.app[CONFIG].snapshot
    settings = snapshot.settings
    metering = settings.billing.metering
    if metering:  # a caller the ledger does not know learns nothing of the configuration
        await known_key(request.app[LEDGER], require_key(request, anthropic=True))
    body = await read_body(request, settings.server.max_body_bytes, settings.server.read_timeout)
    payload = parse_call_body(body)
    name = payload["model"]
    request[CALL_LOG].model = name
    route = _route(snapshot, name, "messages")
    upstream = route.candidates("messages")[0]
    if upstream.model != name:
        body = orjson.dumps({**payload, "model": upstream.model})
    return await _free_call(request, upstream, "POST", "/messages/count_tokens", body)


async def stored_response(request: web.Request) -> web.StreamResponse:
    """GET or DELETE /v1/responses/{id}, GET .../input_items, POST .../cancel: forwarded,
    free, to the upstream that created the response, only for the account that created it
    through the gateway (gateway/proxy/response_ids.py); 404 for anyone else."""
    response_id = request.match_info["response_id"]
    key = require_key(request)
    await known_key(request.app[LEDGER], key)
    owner = await ResponseIds(request.app[STORE]).owner(response_id)
    missing = NotFound(f"No response found with id '{response_id}'.", param="response_id")
    if owner is None or owner.account_id != key.account_id:
        raise missing
    route = request.app[CONFIG].snapshot.routing.get(owner.model)
    upstream = next(
        (u for u in (route.upstreams if route else ()) if u.label == owner.upstream), None
    )
    if upstream is None:  # the model or its upstream left the config since
        raise missing
    entry = request.get(CALL_LOG)
    if entry is not None:
        entry.model = owner.model
    body = await request.read() if request.method == "POST" else None
    path = request.path[len("/v1") :]
    if request.query_string:
        path += "?" + request.query_string
    return await _free_call(request, upstream, request.method, path, body or None)


async def passthrough(request: web.Request) -> web.StreamResponse:
    """POST to a route of `proxy.passthrough`: held and charged its flat price, forwarded to
    the upstreams of the model its body names. Any other route is 404: nothing passes
    unmetered."""
    listed = request.app[CONFIG].snapshot.settings.proxy.passthrough_route(request.path)
    if listed is None:
        raise NotFound("no such route")
    return await _forward(request, "chat", request.path[len("/v1") :], listed)


routes = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.post("/v1/embeddings", embeddings),
    web.post("/v1/responses", responses),
    web.get("/v1/responses/{response_id}", stored_response),
    web.delete("/v1/responses/{response_id}", stored_response),
    web.get("/v1/responses/{response_id}/input_items", stored_response),
    web.post("/v1/responses/{response_id}/cancel", stored_response),
    web.post("/v1/messages", messages),
    web.post("/v1/messages/count_tokens", count_tokens),
    web.post("/v1/{route:.+}", passthrough),  # after every route of the gateway's own
]
