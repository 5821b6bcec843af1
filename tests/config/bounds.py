"""The documented bounds of every duration and numeric limit of the config (README's table).

Written out here, not read from the schema, so the tests that use it also run, and fail, on a
tree without the bounds; `test_minimums.py` checks that the schema declares exactly these.
"""

from __future__ import annotations

import copy
import re
from typing import Any, NamedTuple

from gateway.config.schema import format_duration

CEILING = "36500d"  # every duration without a maximum of its own
MAX_TOKENS_PER_CALL = 10**8


class Bound(NamedTuple):
    path: str  # as the loader names it: "proxy.timeouts.first_byte", "models[0].weight"
    low: Any  # a duration string (the config's units) or an int
    high: Any  # the same, or None: no maximum (durations: the ceiling)


DURATIONS = (
    Bound("server.drain_timeout", "100ms", "1h"),
    Bound("server.read_timeout", "100ms", None),
    Bound("server.idle_timeout", "1s", None),
    Bound("proxy.timeouts.connect", "100ms", None),
    Bound("proxy.timeouts.first_byte", "100ms", None),
    Bound("proxy.timeouts.idle", "100ms", None),
    Bound("proxy.keepalive", "100ms", None),
    Bound("proxy.response_ttl", "1s", "3650d"),
    Bound("billing.grace_period", "1s", None),
    Bound("billing.retention_period", "1s", None),
    Bound("billing.sweep_interval", "50ms", "1h"),
    Bound("billing.hold_lease", "1s", "1h"),
    Bound("notifications.retry_base", "100ms", "1d"),
    Bound("notifications.retry_max", "100ms", "1d"),
    Bound("notifications.poll_interval", "50ms", "1h"),
    Bound("notifications.timeout", "100ms", "1m"),
    Bound("history.keep_in_store", "1s", "3650d"),
    Bound("history.export_interval", "50ms", "1h"),
    Bound("history.settled_ttl", "10m", "7d"),
    Bound("console.session_ttl", "1m", "30d"),
)

INTS = (
    Bound("server.port", 1, 65535),
    Bound("server.workers", 1, 256),
    Bound("server.max_body_bytes", 1024, 1024**3),
    Bound("proxy.max_connections", 1, None),
    Bound("billing.hold_output_tokens", 1, MAX_TOKENS_PER_CALL),
    Bound("billing.max_tokens_per_call", 1, MAX_TOKENS_PER_CALL),
    Bound("billing.checkpoint_tokens", 1, None),
    Bound("billing.image_tokens", 0, MAX_TOKENS_PER_CALL),
    Bound("billing.audio_tokens", 0, MAX_TOKENS_PER_CALL),
    Bound("notifications.max_attempts", 1, 100),
    Bound("notifications.smtp.port", 1, 65535),
    Bound("history.batch_size", 1, 100_000),
    Bound("models[0].hold_output_tokens", 1, MAX_TOKENS_PER_CALL),
    Bound("models[0].upstreams[0].weight", 1, 1000),
)

# Fields whose accepted values depend on another's: set together in the boundary configs.
TOGETHER = {
    "notifications.retry_base": "notifications.retry_max",
    "notifications.retry_max": "notifications.retry_base",
    "billing.hold_output_tokens": "billing.max_tokens_per_call",
    "models[0].hold_output_tokens": "billing.max_tokens_per_call",
}

_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def millis(text: str) -> int:
    """Milliseconds of a bound: `"250ms"` -> 250, `"1h"` -> 3600000 (whole units only)."""
    match = re.fullmatch(r"([0-9]+)(ms|s|m|h|d)", text)
    assert match, text
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def high_of(bound: Bound) -> Any:
    """The maximum: its own, or for a duration without one the ceiling."""
    if bound.high is None and isinstance(bound.low, str):
        return CEILING
    return bound.high


def model() -> dict[str, Any]:
    """A model that needs no key and no price."""
    return {"name": "m", "billing": "dedicated", "upstreams": [{"url": "http://127.0.0.1:9/v1"}]}


def base_config() -> dict[str, Any]:
    return {"models": [model()]}


def with_value(config: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `config` with `value` at `path` (sections and list items made as needed)."""
    out = copy.deepcopy(config)
    parts = re.findall(r"[^.\[\]]+|\[\d+\]", path)
    node: Any = out
    for part, after in zip(parts, [*parts[1:], None], strict=True):
        key: Any = int(part[1:-1]) if part.startswith("[") else part
        if after is None:
            node[key] = value
            break
        if isinstance(key, str) and node.get(key) is None:
            node[key] = [] if after.startswith("[") else {}
        node = node[key]
    return out


def with_values(config: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    for path, value in values.items():
        config = with_value(config, path, value)
    return config


def boundary(bound: Bound, value: Any) -> dict[str, Any]:
    """`base_config()` with `value` at the bound's path, and its companion set to match."""
    values = {bound.path: value}
    other = TOGETHER.get(bound.path)
    if other is not None and other not in values:
        if other == "billing.max_tokens_per_call":
            values[other] = max(value, 1)
        else:
            values[other] = value
    return with_values(base_config(), values)


def values_at(which: str) -> dict[str, Any]:
    """Every bounded field's minimum ("low") or maximum ("high", where it has one), by path."""
    values: dict[str, Any] = {}
    for bound in (*DURATIONS, *INTS):
        value = bound.low if which == "low" else high_of(bound)
        if value is not None:
            values[bound.path] = value
    return values


def all_at(which: str) -> dict[str, Any]:
    """`base_config()` with every bounded field at its minimum or at its maximum at once."""
    return with_values(base_config(), values_at(which))


def too_small(bound: Bound) -> Any:
    """Zero for a duration (the issue's case), one below the minimum for an int."""
    return "0s" if isinstance(bound.low, str) else bound.low - 1


def just_below(bound: Bound) -> Any:
    return f"{millis(bound.low) - 1}ms" if isinstance(bound.low, str) else bound.low - 1


def too_large(bound: Bound) -> Any:
    """One second above a duration's maximum, one above an int's (None: no maximum)."""
    high = high_of(bound)
    if high is None:
        return None
    return f"{millis(high) // 1000 + 1}s" if isinstance(high, str) else high + 1


def too_small_message(bound: Bound, value: Any) -> str:
    if isinstance(bound.low, str):
        got = format_duration(millis(value) / 1000) if isinstance(value, str) else value
        return f"{bound.path}: must be at least {bound.low} (got {got})"
    return f"{bound.path}: Input should be greater than or equal to {bound.low}"


def too_large_message_start(bound: Bound) -> str:
    high = high_of(bound)
    if isinstance(high, str):
        return f"{bound.path}: must be at most {high} (got "
    return f"{bound.path}: Input should be less than or equal to {high}"
