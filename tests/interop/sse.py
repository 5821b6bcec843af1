"""Comparing answers: per-call fields normalised, the rest byte for byte."""

from __future__ import annotations

import re
from typing import Any

__all__ = [
    "PER_CALL",
    "drop_zero_usage",
    "drop_zero_usage_json",
    "events",
    "normalise",
    "normalise_json",
    "usage_events",
    "without_cost",
    "without_cost_json",
]

# Fields that differ between two identical calls: the completion's id, its creation time and
# the serving build's fingerprint.
PER_CALL = ("id", "created", "system_fingerprint")
_VOLATILE = re.compile(rb'"(id|created|system_fingerprint)":\s*("(?:[^"\\]|\\.)*"|-?\d+|null)')


def normalise(raw: bytes) -> bytes:
    """`raw` with every per-call field's value replaced by a placeholder, nothing else
    touched (spacing, key order and escapes stay as the server wrote them)."""
    return _VOLATILE.sub(lambda m: b'"' + m.group(1) + b'":"<' + m.group(1) + b'>"', raw)


def events(raw: bytes) -> list[bytes]:
    """The SSE events of a stream body, each normalised, in order (blank separators
    dropped, so the split into TCP chunks does not matter)."""
    text = raw.replace(b"\r\n", b"\n")
    return [normalise(event) for event in text.split(b"\n\n") if event.strip()]


def usage_events(raw: bytes) -> list[bytes]:
    """The events that carry a usage object."""
    return [e for e in events(raw) if re.search(rb'"usage":\s*\{', e)]


def normalise_json(value: Any) -> Any:
    """A parsed answer with the per-call fields replaced, at any depth."""
    if isinstance(value, dict):
        return {k: (f"<{k}>" if k in PER_CALL else normalise_json(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [normalise_json(v) for v in value]
    return value


# LiteLLM's proxy (1.106) puts this on every chunk of a legacy-completions stream whose client
# did not ask for usage, and nothing of the kind when usage is asked for (then one usage chunk
# closes the stream). The gateway always asks, to bill by, so its client gets the second
# shape without the usage chunk: these all-zero members are not there. They carry nothing.
_ZERO_USAGE = re.compile(
    rb',\s*"usage":\s*\{"completion_tokens":\s*0,\s*"prompt_tokens":\s*0,\s*"total_tokens":\s*0\}'
)


def drop_zero_usage(event: bytes) -> bytes:
    return _ZERO_USAGE.sub(b"", event)


def drop_zero_usage_json(chunks: list[Any]) -> list[Any]:
    """Parsed chunks without an all-zero `usage` (as drop_zero_usage does to the bytes)."""
    zero = {"completion_tokens": 0, "prompt_tokens": 0, "total_tokens": 0}
    return [
        {k: v for k, v in chunk.items() if k != "usage"}
        if isinstance(chunk, dict) and chunk.get("usage") == zero
        else chunk
        for chunk in chunks
    ]


# The call's cost, which the gateway adds as the last member of a stream's usage object.
_COST = re.compile(rb',"cost":"([0-9]+\.[0-9]{6})"\}')


def without_cost(events: list[bytes]) -> tuple[list[bytes], list[str]]:
    """The events with the gateway's cost member taken out again, and the costs found."""
    costs: list[str] = []
    out = []
    for event in events:
        found = _COST.search(event)
        if found:
            costs.append(found.group(1).decode())
            event = event[: found.start()] + b"}" + event[found.end() :]
        out.append(event)
    return out, costs


def without_cost_json(chunks: list[Any]) -> tuple[list[Any], list[str]]:
    """Parsed chunks without the `cost` of their usage, and the costs found."""
    costs: list[str] = []
    out = []
    for chunk in chunks:
        usage = chunk.get("usage") if isinstance(chunk, dict) else None
        if isinstance(usage, dict) and "cost" in usage:
            costs.append(usage["cost"])
            chunk = {**chunk, "usage": {k: v for k, v in usage.items() if k != "cost"}}
        out.append(chunk)
    return out, costs
