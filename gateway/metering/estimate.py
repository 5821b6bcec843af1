"""How many tokens a call may use, as its hold counts them (SPEC section 3): the request's own
output limits, checked as OpenAI checks them, and the prompt's size.

A request's `max_tokens` / `max_completion_tokens` sizes its hold and bounds its bill, so a
value the gateway cannot hold for (0 or less, which some upstreams read as "no limit"; a
float, a string, a bool; more than `billing.max_tokens_per_call`) is refused with 400 before
anything is held or forwarded. null is the same as absent. Embeddings have no such field.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest
from gateway.metering.prompt import CallKind
from gateway.money import MAX_TOKENS_PER_CALL

__all__ = [
    "OUTPUT_LIMIT_FIELDS",
    "check_prompt_size",
    "output_allowance",
    "requested_output",
]

# In the order the upstreams read them (vLLM: `max_completion_tokens or max_tokens`).
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
_PROMPT_FIELD: dict[CallKind, str] = {
    "chat": "messages",
    "completions": "prompt",
    "embeddings": "input",
}


def _json_type(value: object) -> str:
    """The JSON type of a parsed value, in the words OpenAI's errors use."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, float):
        return "a decimal number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "an integer"  # pragma: no cover - JSON has no other types


def _checked_limit(field: str, value: object, maximum: int) -> int:
    if type(value) is not int:  # bool is an int subclass; 5.0 is a float
        raise InvalidRequest(
            f"Invalid type for '{field}': expected an integer, but got {_json_type(value)} "
            "instead.",
            param=field,
        )
    if value < 1:
        raise InvalidRequest(
            f"Invalid '{field}': integer below minimum value. Expected a value >= 1, but got "
            f"{value} instead.",
            param=field,
        )
    if value > maximum:
        raise InvalidRequest(
            f"Invalid '{field}': integer above maximum value. Expected a value <= {maximum}, "
            f"but got {value} instead.",
            param=field,
        )
    return value


def requested_output(kind: CallKind, payload: dict[str, Any], maximum: int) -> list[int]:
    """The output limits the request gives (each an integer in 1..maximum, else 400 naming
    it), in OUTPUT_LIMIT_FIELDS order; empty when it gives none (null = absent)."""
    if kind == "embeddings":
        return []
    limits = []
    for field in OUTPUT_LIMIT_FIELDS:
        value = payload.get(field)
        if value is not None:
            limits.append(_checked_limit(field, value, maximum))
    return limits


def output_allowance(
    kind: CallKind, payload: dict[str, Any], default: int, maximum: int = MAX_TOKENS_PER_CALL
) -> int:
    """Completion tokens to hold for: the request's own limit, else the configured default.
    A limit the gateway cannot hold for is refused here (see the module docstring); `maximum`
    is `billing.max_tokens_per_call` (without it, the most any config allows)."""
    if kind == "embeddings":
        return 0
    limits = requested_output(kind, payload, maximum)
    return limits[0] if limits else default


def check_prompt_size(kind: CallKind, prompt_tokens: int, maximum: int) -> None:
    """400 for a prompt over `billing.max_tokens_per_call`: no call is billed for more prompt
    tokens than that, so one that already has more is not admitted (as OpenAI refuses a
    prompt over the model's context)."""
    if prompt_tokens > maximum:
        field = _PROMPT_FIELD[kind]
        raise InvalidRequest(
            f"This gateway takes at most {maximum} prompt tokens per call. However, your "
            f"{field} resulted in {prompt_tokens} tokens. Please reduce the length of the "
            f"{field}.",
            param=field,
        )
