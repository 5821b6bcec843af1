"""How many tokens a call may use, as its hold counts them (SPEC section 3): the request's own
output limits, checked as OpenAI checks them, and the prompt's size.

A request's `max_tokens` / `max_completion_tokens` (a Responses request's
`max_output_tokens`, a Messages request's required `max_tokens`) sizes its hold and bounds
its bill, so a value the gateway cannot hold for (0 or less, which some upstreams read as
"no limit"; a float, a string, a bool; more than `billing.max_tokens_per_call`) is refused
with 400 before anything is held or forwarded. null is the same as absent. Embeddings have
no such field.
"""

from __future__ import annotations

from typing import Any

from gateway.errors import InvalidRequest
from gateway.metering.prompt import CallKind
from gateway.money import MAX_TOKENS_PER_CALL

__all__ = [
    "OUTPUT_LIMIT_FIELDS",
    "check_prompt_size",
    "limit_field",
    "limit_fields",
    "output_allowance",
    "requested_output",
]

# In the order the upstreams read them (vLLM: `max_completion_tokens or max_tokens`).
OUTPUT_LIMIT_FIELDS = ("max_completion_tokens", "max_tokens")
# Each API's output limits.
_LIMIT_FIELDS: dict[CallKind, tuple[str, ...]] = {
    "chat": OUTPUT_LIMIT_FIELDS,
    "completions": OUTPUT_LIMIT_FIELDS,
    "embeddings": (),
    "responses": ("max_output_tokens",),
    "messages": ("max_tokens",),  # required there
}
_PROMPT_FIELD: dict[CallKind, str] = {
    "chat": "messages",
    "completions": "prompt",
    "embeddings": "input",
    "responses": "input",
    "messages": "messages",
}


def limit_fields(kind: CallKind) -> tuple[str, ...]:
    """The output limit fields of an API's requests, in the order they are read."""
    return _LIMIT_FIELDS[kind]


def limit_field(kind: CallKind) -> str:
    """The output limit the gateway sets on a request that names none (every upstream of
    chat and legacy completions reads `max_tokens`)."""
    return "max_output_tokens" if kind == "responses" else "max_tokens"


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
    it), in `limit_fields(kind)` order; empty when it gives none (null = absent). A Messages
    request must give its `max_tokens` (as Anthropic's API requires)."""
    limits = []
    for field in _LIMIT_FIELDS[kind]:
        value = payload.get(field)
        if value is not None:
            limits.append(_checked_limit(field, value, maximum))
    if kind == "messages" and not limits:
        raise InvalidRequest("max_tokens: Field required", param="max_tokens")
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
