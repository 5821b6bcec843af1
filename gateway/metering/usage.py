"""What a finished call is billed for: its tokens by class, and where the counts came from.

The upstream's `usage` is authoritative, but not beyond what the call could have produced:
no more prompt tokens than `billing.max_tokens_per_call`, no more completion tokens than the
request's own `max_tokens` / `max_completion_tokens` (times the choices it asked for) or that
bound, and no class bigger than the tokens it is part of (cached and cache-write tokens are
input tokens, reasoning tokens are output tokens). Usage above it is billed at the bound,
counted in `gateway_usage_anomalies_total` and logged: a buggy or hostile upstream cannot
charge an account trillions, nor hand the ledger's Lua arithmetic a number past 2**53
(gateway/money.py). The bound is applied here, where the bill's tokens are decided, and
nowhere else. This module counts; gateway/pricing.py prices.

How `usage` names the classes (chat and legacy completions, as OpenAI, vLLM and LiteLLM's
proxy send them): `prompt_tokens` is every input token; of those,
`prompt_tokens_details.cached_tokens` were read from a prompt cache (LiteLLM also sends
Anthropic's `cache_read_input_tokens`, the same tokens) and `cache_creation_input_tokens` (or
`prompt_tokens_details.cache_write_tokens`, as OpenAI's SDK names it, or `.cache_creation_tokens`)
were written to one; of `completion_tokens`,
`completion_tokens_details.reasoning_tokens` were reasoning. Audio tokens are input or output
tokens like any other and are billed at those prices.

The Responses API's `usage` (OpenAI's `response.usage`) says `input_tokens` (every input
token; `input_tokens_details.cached_tokens` of them cached, `.cache_write_tokens` written, as
some servers add) and `output_tokens` (`output_tokens_details.reasoning_tokens` of them
reasoning). Anthropic's Messages `usage` counts apart what chat counts together: its
`input_tokens` are the input tokens neither read from nor written to a cache, so the prompt is
`input_tokens + cache_read_input_tokens + cache_creation_input_tokens`; `output_tokens` are
the output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from gateway.metering.estimate import requested_output
from gateway.metering.prompt import CallKind
from gateway.money import MAX_TOKENS_PER_CALL
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.pricing import TokenUsage

__all__ = [
    "AnomalyHook",
    "CallStatus",
    "Counted",
    "UsageBound",
    "anomaly_reporter",
    "choices_of",
    "count_call",
    "read_messages_usage",
    "read_responses_usage",
    "read_usage",
]

CallStatus = Literal["ok", "client_disconnected", "upstream_error", "interrupted", "orphaned"]
UsageField = Literal[
    "prompt_tokens", "completion_tokens", "cached_tokens", "cache_write_tokens", "reasoning_tokens"
]
# (field, reported, billed): told once per field a bill was cut down on.
AnomalyHook = Callable[[UsageField, int, int], None]

log = get_logger("gateway.billing")


def choices_of(payload: dict[str, Any]) -> int:
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
        # (A Responses call with `previous_response_id` carries context the gateway cannot
        # see: its prompt is bounded by `maximum` alone, as every call's is.)
        # Upstreams differ in which field they read: the call may produce up to the larger.
        limits = requested_output(kind, payload, maximum)
        completion = min(maximum, max(limits) * choices_of(payload)) if limits else maximum
        return cls(maximum, completion, report)


# Without a bound of its own a bill is still cut to what any config allows (money.py).
_WIDEST = UsageBound(MAX_TOKENS_PER_CALL, MAX_TOKENS_PER_CALL)


def _count(value: object) -> int | None:
    """A token count as JSON gives it: a non-negative integer (not a bool, not a float)."""
    return value if type(value) is int and value >= 0 else None


def _detail(usage: dict[str, Any], details: str, field: str) -> int | None:
    block = usage.get(details)
    return _count(block.get(field)) if isinstance(block, dict) else None


# Where `usage` may name a token class.
_CLASS_FIELDS = frozenset(
    {
        "prompt_tokens_details",
        "completion_tokens_details",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    }
)


def read_usage(usage: dict[str, Any] | None) -> TokenUsage | None:
    """The classes of an upstream's `usage` object (see the module docstring), or None when
    it reports no usable prompt and completion counts (the gateway's own count is billed)."""
    if usage is None:
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens", 0))
    if prompt is None or completion is None:
        return None
    if _CLASS_FIELDS.isdisjoint(usage):  # no classes reported (most upstreams, most calls)
        return TokenUsage(prompt, completion)
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
    if cached is None:
        cached = _count(usage.get("cache_read_input_tokens"))
    written = _count(usage.get("cache_creation_input_tokens"))
    for name in ("cache_write_tokens", "cache_creation_tokens"):
        if written is None:
            written = _detail(usage, "prompt_tokens_details", name)
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    return TokenUsage(prompt, completion, cached or 0, written or 0, reasoning or 0)


def read_responses_usage(usage: dict[str, Any] | None) -> TokenUsage | None:
    """The classes of a Responses `usage` (see the module docstring), or None."""
    if usage is None:
        return None
    prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("output_tokens", 0))
    if prompt is None or completion is None:
        return None
    cached = _detail(usage, "input_tokens_details", "cached_tokens") or 0
    written = _detail(usage, "input_tokens_details", "cache_write_tokens") or 0
    reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens") or 0
    return TokenUsage(prompt, completion, cached, written, reasoning)


def read_messages_usage(usage: dict[str, Any] | None) -> TokenUsage | None:
    """The classes of an Anthropic Messages `usage` (see the module docstring), or None."""
    if usage is None:
        return None
    fresh = _count(usage.get("input_tokens"))
    completion = _count(usage.get("output_tokens"))
    if fresh is None or completion is None:
        return None
    cached = _count(usage.get("cache_read_input_tokens")) or 0
    written = _count(usage.get("cache_creation_input_tokens")) or 0
    return TokenUsage(fresh + cached + written, completion, cached, written)


@dataclass(slots=True)  # not frozen: slower to make, and one is made per call
class Counted:
    """The tokens a call is billed for, and the gateway's own counts beside them."""

    usage: TokenUsage
    source: Literal["upstream", "gateway"]
    gateway_prompt_tokens: int
    gateway_completion_tokens: int


def count_call(
    reported: TokenUsage | None,
    gateway_prompt_tokens: int,
    local_completion: int,
    bound: UsageBound | None = None,
) -> Counted:
    """The upstream's usage when it reported one (authoritative), the gateway's count else;
    either cut down to `bound`. A reported value above it is an anomaly, told to
    `bound.report`; the gateway's own count above it is not (its tokenizer may not be the
    upstream's, and the client asked for no more than the bound)."""
    bound = bound or _WIDEST
    if reported is not None:
        usage, source = reported, "upstream"
    else:
        usage = TokenUsage(gateway_prompt_tokens, local_completion)
        source = "gateway"
    if (
        usage.prompt_tokens <= bound.prompt_tokens
        and usage.completion_tokens <= bound.completion_tokens
        and usage.cached_tokens + usage.cache_write_tokens <= usage.prompt_tokens
        and usage.reasoning_tokens <= usage.completion_tokens
    ):  # within every bound: the usual case
        return Counted(usage, source, gateway_prompt_tokens, local_completion)  # type: ignore[arg-type]
    report = bound.report if source == "upstream" else None
    prompt = _within(usage.prompt_tokens, bound.prompt_tokens, "prompt_tokens", report)
    completion = _within(
        usage.completion_tokens, bound.completion_tokens, "completion_tokens", report
    )
    cached = _within(usage.cached_tokens, prompt, "cached_tokens", report)
    written = _within(usage.cache_write_tokens, prompt - cached, "cache_write_tokens", report)
    reasoning = _within(usage.reasoning_tokens, completion, "reasoning_tokens", report)
    billed = TokenUsage(prompt, completion, cached, written, reasoning)
    return Counted(billed, source, gateway_prompt_tokens, local_completion)  # type: ignore[arg-type]


def _within(value: int, most: int, field: UsageField, report: AnomalyHook | None) -> int:
    if value <= most:
        return value
    if report is not None:
        report(field, value, most)
    return most


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
