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
from gateway.accounts.holds import hold_info
from gateway.api.body import parse_call_body, read_body
from gateway.config.schema import ModelConfig
from gateway.errors import (
    AccountCleared,
    AccountFrozen,
    GatewayError,
    InsufficientBalance,
    InternalError,
    InvalidApiKey,
    LedgerUnavailable,
    ModelNotFound,
    ModelNotSubscribed,
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
)
from gateway.ledger import Admission, Ledger, Reservation, TokenCharge
from gateway.ledger.journal import Entry, SettlementJournal
from gateway.metering.completion import CompletionMeter
from gateway.metering.enforcement import StrictGuard, strict_charge
from gateway.metering.estimate import (
    OUTPUT_LIMIT_FIELDS,
    check_prompt_size,
    hold_amount,
    output_allowance,
)
from gateway.metering.lease import LeaseKeeper
from gateway.metering.prompt import CallKind, count_prompt
from gateway.metering.tokenizers import get_encoding
from gateway.metering.usage import CallStatus, UsageBound, anomaly_reporter, bill_call
from gateway.money import format_micros
from gateway.observability.access import CALL_LOG, CallLog
from gateway.observability.logging import get_logger
from gateway.proxy.forward import RelayOutcome, open_upstream, relay
from gateway.proxy.routing import Upstream
from gateway.ratelimit import headers_of, rate_rules
from gateway.state import Snapshot

__all__ = ["require_key", "routes"]

log = get_logger("gateway.billing")

_REFUSALS: dict[str, type[GatewayError]] = {
    "invalid_api_key": InvalidApiKey,
    "account_frozen": AccountFrozen,
    "account_cleared": AccountCleared,
    "model_not_subscribed": ModelNotSubscribed,
}
_MESSAGES = {
    "invalid_api_key": "Incorrect API key provided",
    "account_frozen": "the account is frozen for arrears; top up to use models again",
    "account_cleared": "the account was cleared for arrears; top up and subscribe again",
    "model_not_subscribed": "the account is not subscribed to model '{model}'",
}


def require_key(request: web.Request) -> ParsedKey:
    """The caller's key, well-formed, or 401 (checked against the ledger later)."""
    key = parse_api_key(request.headers.get("Authorization"))
    if key is None:
        raise InvalidApiKey("Incorrect or missing API key; send 'Authorization: Bearer <key>'")
    return key


async def _known_key(ledger: Ledger, key: ParsedKey) -> None:
    """401 unless the ledger knows the key (an extra round trip, on refusals only)."""
    if await ledger.authenticate(key.account_id, key.key_id, key.key_hash) is None:
        raise InvalidApiKey(_MESSAGES["invalid_api_key"])


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
    error = _REFUSALS.get(admission.code)
    if error is None:
        return InternalError(f"admission failed: {admission.code}")
    return error(_MESSAGES[admission.code].format(model=model))


def _upstream_body(
    body: bytes,
    payload: dict[str, Any],
    public_name: str,
    add_usage: bool,
    max_tokens: int | None = None,
) -> Callable[[Upstream], bytes]:
    """Bytes for each upstream: the client's own when nothing needs to change; else the same
    object with the upstream's model name, `stream_options.include_usage` and/or (strict
    enforcement, a call that named no limit) the `max_tokens` its hold covers set."""
    changed: dict[str, bytes] = {}

    def for_upstream(upstream: Upstream) -> bytes:
        if upstream.model == public_name and not add_usage and max_tokens is None:
            return body
        cached = changed.get(upstream.model)
        if cached is None:
            new = {**payload, "model": upstream.model}
            if max_tokens is not None:
                new["max_tokens"] = max_tokens
            if add_usage:
                options = payload.get("stream_options")
                new["stream_options"] = {
                    **(options if isinstance(options, dict) else {}),
                    "include_usage": True,
                }
            cached = changed[upstream.model] = orjson.dumps(new)
        return cached

    return for_upstream


def _names_limit(payload: dict[str, Any]) -> bool:
    """The request gives its own output limit (which its hold then covers)."""
    return any(payload.get(field) is not None for field in OUTPUT_LIMIT_FIELDS)


class _Call:
    """One metered call's state between admission and settlement."""

    def __init__(
        self,
        journal: SettlementJournal,
        key: ParsedKey,
        model: ModelConfig,
        request_id: str,
        stream: bool,
    ) -> None:
        self.journal = journal
        self.charge: TokenCharge | None = None
        self.key = key
        self.model = model
        self.request_id = request_id
        self.stream = stream
        self.encoding = get_encoding(model.tokenizer)
        self.prompt_tokens = 0
        self.upstream_label = ""
        self.finished = False
        # How the call ended once that is known: relayed to its end, or the client left.
        self.status: CallStatus | None = None
        self.strict_hold: int | None = None  # strict enforcement: what admission held
        self.guard: StrictGuard | None = None
        self.log: CallLog | None = None
        self.bound: UsageBound | None = None  # what its usage is billed at, at most

    async def settle(self, meter: CompletionMeter, status: CallStatus) -> None:
        """Bill the call and write its settlement."""
        await (await self.bill(meter, status))

    async def bill(self, meter: CompletionMeter, status: CallStatus) -> Coroutine[Any, Any, None]:
        """Count and price the call (its log entry filled in); return the settlement's write,
        for the caller to await or to run as a task of its own."""
        local_completion = await meter.count_local_tokens(self.encoding)
        bill = bill_call(self.model, meter, self.prompt_tokens, local_completion, self.bound)
        cost, uncharged = bill.cost, 0
        if self.strict_hold is not None:
            extra = self.guard.extra_held if self.guard is not None else 0
            cost, uncharged = strict_charge(cost, self.strict_hold + extra)
        if self.log is not None:
            self.log.prompt_tokens = bill.prompt_tokens
            self.log.completion_tokens = bill.completion_tokens
            self.log.cost = cost
            self.log.usage_source = bill.usage_source
            self.log.local_prompt_tokens = bill.gateway_prompt_tokens
            self.log.local_completion_tokens = bill.gateway_completion_tokens
            self.log.outcome = status
        now_ms = int(time.time() * 1000)
        record = {
            "request_id": self.request_id,
            "time": now_ms,
            "kind": "inference",
            "model": self.model.name,
            "prompt_tokens": bill.prompt_tokens,
            "completion_tokens": bill.completion_tokens,
            "cost": cost,
            "usage_source": bill.usage_source,
            "status": status,
            "stream": "1" if self.stream else "0",
            "gateway_prompt_tokens": bill.gateway_prompt_tokens,
            "gateway_completion_tokens": bill.gateway_completion_tokens,
            "key_id": self.key.key_id,
            "upstream": self.upstream_label,
        }
        if uncharged:
            record["uncharged"] = uncharged
            log.warning(
                "strict call used more than it held; the rest is not charged",
                request_id=self.request_id,
                model=self.model.name,
                cost=format_micros(bill.cost),
                uncharged=format_micros(uncharged),
            )
        self.finished = True
        return self._write(cost, now_ms, record, bill.prompt_tokens + bill.completion_tokens)

    async def _write(
        self, cost: int, now_ms: int, record: dict[str, Any], actual_tokens: int
    ) -> None:
        """The settlement, through the journal: on disk before the store is asked, so a store
        that does not answer now (or a gateway stopped meanwhile) loses nothing; the journal
        replays it, idempotently per request, when the store answers again."""
        await self.journal.submit(
            Entry(
                self.key.account_id,
                self.request_id,
                cost=cost,
                now_ms=now_ms,
                record=record,
                charge=self.charge,
                actual_tokens=actual_tokens,
            )
        )

    async def release(self) -> None:
        self.finished = True
        await self.journal.submit(Entry(self.key.account_id, self.request_id, release=True))


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
    request: web.Request, snapshot: Snapshot, body: bytes, payload: dict[str, Any], path: str
) -> web.StreamResponse:
    """`billing.metering: false`: forward and relay, nothing counted or billed."""
    name = payload["model"]
    route = snapshot.routing.get(name)
    if route is None:
        raise ModelNotFound(f"the model '{name}' does not exist", param="model")
    timeouts = snapshot.settings.proxy.timeouts
    upstream_call = await open_upstream(
        request.app[HTTP],
        route.candidates(),
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


async def _forward(request: web.Request, kind: CallKind, path: str) -> web.StreamResponse:
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
        return await _proxy_only(request, snapshot, body, payload, path)
    key = require_key(request)
    entry.account, entry.key_id = key.account_id, key.key_id
    ledger = request.app[LEDGER]
    try:
        body = await read_body(
            request, settings.server.max_body_bytes, settings.server.read_timeout
        )
        payload = parse_call_body(body)
        name = payload["model"]
        entry.model = name
        route = snapshot.routing.get(name)
        if route is None:
            raise ModelNotFound(f"the model '{name}' does not exist", param="model")
        model = route.config
        request_id: str = request[REQUEST_ID]
        stream = payload.get("stream") is True and kind != "embeddings"
        options = payload.get("stream_options")
        client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        add_usage = stream and not client_wants_usage
        entry.stream = stream
        call = _Call(request.app[JOURNAL], key, model, request_id, stream)
        call.log = entry
        call.prompt_tokens = await count_prompt(kind, payload, call.encoding, len(body))
        default_out = model.hold_output_tokens
        if default_out is None:
            default_out = settings.billing.hold_output_tokens
        most = settings.billing.max_tokens_per_call
        output_tokens = output_allowance(kind, payload, default_out, most)
        check_prompt_size(kind, call.prompt_tokens, most)
        report = anomaly_reporter(request.app[METRICS], model.name, request_id)
        call.bound = UsageBound.of_call(kind, payload, most, report)
        hold = hold_amount(model, call.prompt_tokens, output_tokens)
    except GatewayError:
        # A caller the ledger does not know learns nothing of the configuration (which
        # models exist, their limits): its refusal is the key's, checked first.
        await _known_key(ledger, key)
        raise
    billing = settings.billing
    now = int(time.time() * 1000)
    lease_until = now + int(billing.hold_lease * 1000)
    pricing = model.pricing
    info = hold_info(
        model.name,
        call.prompt_tokens,
        pricing.input_per_million if pricing and model.billing == "tokens" else 0,
        pricing.output_per_million if pricing and model.billing == "tokens" else 0,
        key.key_id,
        stream,
    )
    try:
        reservation = Reservation(
            key.account_id,
            key.key_id,
            key.key_hash,
            model.name,
            hold,
            request_id,
            lease_until,
            model.billing == "dedicated",
            info,
            now,
            call.prompt_tokens + output_tokens,
            rate_rules(settings.rate_limits, model),
        )
        admission = await ledger.reserve(reservation)
    except (asyncio.CancelledError, LedgerUnavailable):
        # The client left while the store was deciding, or the store's answer was lost (a
        # timeout, a dropped connection): the script may have run all the same. A release
        # sent after it (through the journal, so it lands even after an outage) drops
        # whatever it held; where it never ran, the release finds nothing.
        _track(request, call.release())
        raise
    if admission.code != "ok":
        raise _refuse(admission, model.name, hold)
    call.charge = admission.charge
    limit_headers = headers_of(admission.rate)

    meter = CompletionMeter(strip_usage=add_usage)
    keeper = LeaseKeeper(
        ledger,
        key.account_id,
        request_id,
        meter,
        call.encoding,
        billing.hold_lease,
        billing.checkpoint_tokens,
    )
    keeper.start()

    strict = billing.enforcement == "strict" and pricing is not None and model.billing == "tokens"
    limit = None
    if strict:
        call.strict_hold = admission.held
        if not stream and kind != "embeddings" and not _names_limit(payload):
            limit = output_tokens  # the one body change strict makes: what the hold covers
    guard = None
    if stream and strict and pricing is not None:
        guard = call.guard = StrictGuard(
            ledger,
            key.account_id,
            request_id,
            meter,
            covered_tokens=output_tokens,
            extension_tokens=default_out,
            output_price=pricing.output_per_million,
            send_usage=client_wants_usage,
            prompt_tokens=call.prompt_tokens,
            encoding=call.encoding,
        )

    def transform(chunk: bytes) -> bytes:
        out = meter.feed(chunk)
        keeper.on_chunk()
        return out

    metrics = request.app[METRICS]
    try:
        timeouts = settings.proxy.timeouts
        upstream_call = await open_upstream(
            request.app[HTTP],
            route.candidates(),
            path,
            _upstream_body(body, payload, name, add_usage, limit),
            request.headers,
            request_id,
            timeouts,
        )
        call.upstream_label = entry.upstream = upstream_call.upstream.label
        for label in upstream_call.refused:  # failed over: the call goes on, the error counts
            metrics.upstream_errors.labels(label, "upstream_unavailable").inc()
        if upstream_call.response.status >= 400:
            # The upstream's own error passes through as it came and costs nothing.
            response, _ = await relay(
                request,
                upstream_call,
                timeouts,
                extra_headers=limit_headers,
                passed_headers=settings.proxy.response_headers,
            )
            await call.release()
            return response
        response, outcome = await relay(
            request,
            upstream_call,
            timeouts,
            transform=transform,
            gate=guard,
            flush=meter.flush,
            extra_headers=limit_headers,
            send_whole=True,
            passed_headers=settings.proxy.response_headers,
        )
        status = _status_of(outcome)
        if outcome.body is not None and status == "ok":
            # A whole answer the connection did not take was never seen: prompt only.
            meter.observe_body(outcome.body)
        if outcome.first_chunk_at is not None:
            entry.ttft = outcome.first_chunk_at - started
        if outcome.status in ("upstream_error", "upstream_timeout"):
            metrics.upstream_errors.labels(call.upstream_label, outcome.status).inc()
        call.status = status
        # The answer is out: the settlement script runs as a task of its own (tracked, so a
        # shutdown waits for it), and this connection is free for the client's next call.
        _track(request, await call.bill(meter, status))
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
        if call.status is None and not request.app[STOPPING].is_set():
            call.status = "client_disconnected"
        raise
    finally:
        keeper.stop()
        if not call.finished:
            # One rule for every call cut short, streamed or not: a client that left is billed
            # the prompt and what was relayed to it (`client_disconnected`); a call the gateway
            # cut itself (shutdown) what was produced (`interrupted`); a call that failed
            # before the client got a byte (release) nothing. Shielded and tracked: the money
            # is settled even though this task is being cancelled.
            if call.status is not None:
                end = call.settle(meter, call.status)
            elif meter.texts:
                end = call.settle(meter, "interrupted")
            else:
                end = call.release()
            await asyncio.shield(_track(request, end))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/chat/completions"""
    return await _forward(request, "chat", "/chat/completions")


async def completions(request: web.Request) -> web.StreamResponse:
    """POST /v1/completions"""
    return await _forward(request, "completions", "/completions")


async def embeddings(request: web.Request) -> web.StreamResponse:
    """POST /v1/embeddings"""
    return await _forward(request, "embeddings", "/embeddings")


routes = [
    web.post("/v1/chat/completions", chat_completions),
    web.post("/v1/completions", completions),
    web.post("/v1/embeddings", embeddings),
]
