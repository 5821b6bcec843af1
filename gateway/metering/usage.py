"""What a finished call is billed for, and the usage record that says so.

The upstream's `usage` is authoritative, but not beyond what the call could have produced:
no more prompt tokens than `billing.max_tokens_per_call`, no more completion tokens than the
request's own `max_tokens` / `max_completion_tokens` (times the choices it asked for) or that
bound. Usage above it is billed at the bound, counted in `gateway_usage_anomalies_total` and
logged: a buggy or hostile upstream cannot charge an account trillions, nor hand the ledger's
Lua arithmetic a number past 2**53 (gateway/money.py). The bound is applied here, where the
bill is computed, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.config.schema import ModelConfig
from gateway.metering.completion import CompletionMeter
from gateway.metering.estimate import requested_output
from gateway.metering.prompt import CallKind
from gateway.money import MAX_TOKENS_PER_CALL, call_cost
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics

__all__ = ["AnomalyHook", "Bill", "CallStatus", "UsageBound", "anomaly_reporter", "bill_call"]

CallStatus = Literal["ok", "client_disconnected", "upstream_error", "interrupted", "orphaned"]
UsageField = Literal["prompt_tokens", "completion_tokens"]
# (field, reported, billed): told once per field a bill was cut down on.
AnomalyHook = Callable[[UsageField, int, int], None]

log = get_logger("gateway.billing")


def _choices(payload: dict[str, Any]) -> int:
    """How many completions the request asks for (`n`, `best_of`): each has its own limit."""
    most = 1
    for field in ("n", "best_of"):
        value = payload.get(field)
        if type(value) is int and value > most:
            most = value
    return most


@dataclass(frozen=True, slots=True)
class UsageBound:
    """The most tokens a call can have used, per field: what its bill is cut down to."""

    prompt_tokens: int
    completion_tokens: int
    report: AnomalyHook | None = None

    @classmethod
    def of_call(
        cls,
        kind: CallKind,
        payload: dict[str, Any],
        maximum: int,
        report: AnomalyHook | None = None,
    ) -> UsageBound:
        """The bound of one request, under `billing.max_tokens_per_call` = `maximum`."""
        if kind == "embeddings":
            return cls(maximum, 0, report)
        # Upstreams differ in which field they read: the call may produce up to the larger.
        limits = requested_output(kind, payload, maximum)
        completion = min(maximum, max(limits) * _choices(payload)) if limits else maximum
        return cls(maximum, completion, report)


# Without a bound of its own a bill is still cut to what any config allows (money.py).
_WIDEST = UsageBound(MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_CALL)


@dataclass(frozen=True, slots=True)
class Bill:
    prompt_tokens: int
    completion_tokens: int
    cost: int
    usage_source: Literal["upstream", "gateway"]
    gateway_prompt_tokens: int
    gateway_completion_tokens: int


def bill_call(
    model: ModelConfig,
    meter: CompletionMeter,
    gateway_prompt_tokens: int,
    local_completion: int,
    bound: UsageBound | None = None,
) -> Bill:
    """The upstream's `usage` when it reported one (authoritative), the gateway's count else;
    either cut down to `bound`. A reported value above it is an anomaly, told to
    `bound.report`; the gateway's own count above it is not (its tokenizer may not be the
    upstream's, and the client asked for no more than the bound)."""
    bound = bound or _WIDEST
    reported = meter.upstream_tokens()
    if reported is not None:
        prompt, completion = reported
        source: Literal["upstream", "gateway"] = "upstream"
    else:
        prompt, completion = gateway_prompt_tokens, local_completion
        source = "gateway"
    report = bound.report if source == "upstream" else None
    if prompt > bound.prompt_tokens:
        if report is not None:
            report("prompt_tokens", prompt, bound.prompt_tokens)
        prompt = bound.prompt_tokens
    if completion > bound.completion_tokens:
        if report is not None:
            report("completion_tokens", completion, bound.completion_tokens)
        completion = bound.completion_tokens
    cost = 0
    if model.billing == "tokens" and model.pricing is not None:
        cost = call_cost(
            prompt, completion, model.pricing.input_per_million, model.pricing.output_per_million
        )
    return Bill(prompt, completion, cost, source, gateway_prompt_tokens, local_completion)


def anomaly_reporter(metrics: Metrics, model: str, request_id: str) -> AnomalyHook:
    """The hook that counts an anomaly (`gateway_usage_anomalies_total{model,field}`) and
    logs one warning line with what was reported and what was billed."""

    def report(field: UsageField, reported: int, billed: int) -> None:
        metrics.child(metrics.usage_anomalies, model, field).inc()
        log.warning(
            "upstream usage above what the call could produce; billed at the bound",
            request_id=request_id,
            model=model,
            field=field,
            reported=reported,
            billed=billed,
        )

    return report
