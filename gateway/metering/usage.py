"""What a finished call is billed for, and the usage record that says so."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from gateway.config.schema import ModelConfig
from gateway.metering.completion import CompletionMeter
from gateway.money import call_cost

__all__ = ["Bill", "CallStatus", "bill_call"]

CallStatus = Literal["ok", "client_disconnected", "upstream_error", "interrupted", "orphaned"]


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
) -> Bill:
    """The upstream's `usage` when it reported one (authoritative), the gateway's count else."""
    reported = meter.upstream_tokens()
    if reported is not None:
        prompt, completion = reported
        source: Literal["upstream", "gateway"] = "upstream"
    else:
        prompt, completion = gateway_prompt_tokens, local_completion
        source = "gateway"
    cost = 0
    if model.billing == "tokens" and model.pricing is not None:
        cost = call_cost(
            prompt, completion, model.pricing.input_per_million, model.pricing.output_per_million
        )
    return Bill(prompt, completion, cost, source, gateway_prompt_tokens, local_completion)
