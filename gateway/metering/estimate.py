"""What a call may cost at most, held before it runs (SPEC section 3)."""

from __future__ import annotations

from typing import Any

from gateway.config.schema import ModelConfig
from gateway.metering.prompt import CallKind
from gateway.money import call_cost

__all__ = ["hold_amount", "output_allowance"]


def output_allowance(kind: CallKind, payload: dict[str, Any], default: int) -> int:
    """Completion tokens to hold for: the request's own limit, else the configured default."""
    if kind == "embeddings":
        return 0
    for field in ("max_completion_tokens", "max_tokens"):
        value = payload.get(field)
        if type(value) is int and value >= 0:
            return value
    return default


def hold_amount(model: ModelConfig, prompt_tokens: int, output_tokens: int) -> int:
    """Micro-units to hold: the cost of the counted prompt plus the allowed output."""
    if model.billing == "dedicated" or model.pricing is None:
        return 0
    return call_cost(
        prompt_tokens,
        output_tokens,
        model.pricing.input_per_million,
        model.pricing.output_per_million,
    )
