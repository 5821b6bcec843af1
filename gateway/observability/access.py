"""One access log line and the call metrics for every data-plane call.

The handler fills a `CallLog` as it learns things (account, tokens, cost, upstream); this
middleware, outermost, times the call and writes both at its end, whatever the outcome. The
line carries ids and numbers only: never a key's secret, never a prompt or an answer.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.keys import CONFIG, METRICS, REQUEST_ID
from gateway.money import format_micros
from gateway.observability.logging import get_access_logger
from gateway.request_ids import new_request_id

__all__ = ["CALL_LOG", "ERROR_CODE", "CallLog", "access_middleware"]

log = get_access_logger("gateway.access")


@dataclass(slots=True)
class CallLog:
    """What one call did, as far as it got."""

    model: str | None = None
    account: str | None = None
    key_id: str | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: int | None = None
    usage_source: str | None = None
    upstream: str | None = None
    outcome: str | None = None  # ok, client_disconnected, upstream_error, interrupted
    local_prompt_tokens: int | None = None  # the gateway's own counts, beside the billed ones
    local_completion_tokens: int | None = None
    ttft: float | None = None  # seconds from arrival to the first relayed chunk


CALL_LOG = web.RequestKey("call_log", CallLog)
ERROR_CODE = web.RequestKey("error_code", str)


@web.middleware
async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time data-plane calls; count, observe and log each one at its end."""
    request[REQUEST_ID] = new_request_id()
    if request.method != "POST" or not request.path.startswith("/v1/"):
        return await handler(request)
    metrics = request.app[METRICS]
    started = time.perf_counter()
    entry = request[CALL_LOG] = CallLog()
    metrics.in_flight.inc()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except asyncio.CancelledError:
        status = 499  # nginx's "client closed request"; also a call cut at shutdown's end
        raise
    finally:
        metrics.in_flight.dec()
        elapsed = time.perf_counter() - started
        _record(request, entry, status, elapsed)


def _record(request: web.Request, entry: CallLog, status: int, elapsed: float) -> None:
    metrics = request.app[METRICS]
    settings = request.app[CONFIG].snapshot.settings
    model = entry.model if entry.model and settings.model(entry.model) else "other"
    metrics.child(metrics.requests, model, str(status)).inc()
    metrics.child(metrics.duration, model).observe(elapsed)
    if entry.ttft is not None:
        metrics.child(metrics.ttft, model).observe(entry.ttft)
    if entry.prompt_tokens:
        metrics.child(metrics.tokens, model, "prompt").inc(entry.prompt_tokens)
    if entry.completion_tokens:
        metrics.child(metrics.tokens, model, "completion").inc(entry.completion_tokens)
    if entry.cost:
        metrics.child(metrics.billed, model).inc(entry.cost)
    if entry.usage_source == "upstream":
        for kind, upstream, local in (
            ("prompt", entry.prompt_tokens, entry.local_prompt_tokens),
            ("completion", entry.completion_tokens, entry.local_completion_tokens),
        ):
            metrics.child(metrics.drift_upstream, model, kind).inc(upstream or 0)
            metrics.child(metrics.drift_local, model, kind).inc(local or 0)
    code = request.get(ERROR_CODE)
    if code is not None and status < 500:
        metrics.child(metrics.rejections, code).inc()
    log.info(
        "call",
        request_id=request[REQUEST_ID],
        method=request.method,
        path=request.path,
        status=status,
        error=code,
        account=entry.account,
        key_id=entry.key_id,
        model=entry.model,
        stream=entry.stream,
        outcome=entry.outcome,
        prompt_tokens=entry.prompt_tokens,
        completion_tokens=entry.completion_tokens,
        usage_source=entry.usage_source,
        cost=None if entry.cost is None else format_micros(entry.cost),
        upstream=entry.upstream,
        latency_ms=round(elapsed * 1000, 3),
        ttft_ms=None if entry.ttft is None else round(entry.ttft * 1000, 3),
    )
