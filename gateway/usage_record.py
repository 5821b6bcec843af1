"""A usage record: what one billed event (a model call, a notification) cost and why.

The one type behind every record of an account's usage stream: the call, the orphan sweeper
and the notifier write it (`fields`, the stream's field/value pairs), and the admin API, its
CSV and the audit read it (`from_fields`, then `view`). A record written by an older version
lacks the newer fields; it reads as having none of those tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from gateway.money import format_micros
from gateway.timefmt import iso_ms

__all__ = ["USAGE_FIELDS", "UsageRecord"]

RecordKind = Literal["inference", "notification", "passthrough"]
_KINDS: dict[str, RecordKind] = {kind: kind for kind in get_args(RecordKind)}

# The API's (and the CSV's) fields of a record, in order.
USAGE_FIELDS = (
    "id",
    "request_id",
    "time",
    "kind",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "cost",
    "uncharged",
    "price_version",
    "usage_source",
    "status",
    "stream",
    "gateway_prompt_tokens",
    "gateway_completion_tokens",
    "key_id",
    "upstream",
    "channel",
    "event",
    "bytes",
)


def _int(fields: Mapping[str, str], name: str) -> int | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    return int(value)


@dataclass(slots=True)  # not frozen: slower to make, and one is made per call
class UsageRecord:
    """One record; amounts in micro-units, time in ms since the epoch."""

    request_id: str
    time: int
    kind: RecordKind
    cost: int
    status: str = "ok"
    usage_source: str = "gateway"
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    uncharged: int = 0  # what the call's usage cost beyond what it was charged (strict, cap)
    price_version: str = ""  # the price sheet the call was billed under
    stream: bool = False
    gateway_prompt_tokens: int | None = None  # the gateway's own counts (calls only)
    gateway_completion_tokens: int | None = None
    key_id: str = ""
    upstream: str = ""
    channel: str = ""  # notifications: the channel kind, the event, the bytes sent
    event: str = ""
    bytes: int | None = None

    def fields(self) -> dict[str, str | int]:
        """The record as the usage stream stores it (field -> value). Token classes and other
        optional fields are kept only when set: most calls have none of them, and every byte
        of a record stays in the store."""
        out: dict[str, str | int] = {
            "request_id": self.request_id,
            "time": self.time,
            "kind": self.kind,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": self.cost,
            "usage_source": self.usage_source,
            "status": self.status,
            "stream": "1" if self.stream else "0",
        }
        if self.cached_tokens:
            out["cached_tokens"] = self.cached_tokens
        if self.cache_write_tokens:
            out["cache_write_tokens"] = self.cache_write_tokens
        if self.reasoning_tokens:
            out["reasoning_tokens"] = self.reasoning_tokens
        if self.uncharged:
            out["uncharged"] = self.uncharged
        if self.price_version:
            out["price_version"] = self.price_version
        if self.gateway_prompt_tokens is not None:
            out["gateway_prompt_tokens"] = self.gateway_prompt_tokens
        if self.gateway_completion_tokens is not None:
            out["gateway_completion_tokens"] = self.gateway_completion_tokens
        if self.key_id:
            out["key_id"] = self.key_id
        if self.upstream:
            out["upstream"] = self.upstream
        if self.channel:
            out["channel"] = self.channel
        if self.event:
            out["event"] = self.event
        if self.bytes is not None:
            out["bytes"] = self.bytes
        return out

    @classmethod
    def from_fields(cls, fields: Mapping[str, str]) -> UsageRecord:
        """A record read back from the stream (decoded field -> value)."""
        kind = _KINDS.get(fields.get("kind", ""), "inference")
        return cls(
            request_id=fields.get("request_id", ""),
            time=_int(fields, "time") or 0,
            kind=kind,
            cost=_int(fields, "cost") or 0,
            status=fields.get("status", ""),
            usage_source=fields.get("usage_source", ""),
            model=fields.get("model", ""),
            prompt_tokens=_int(fields, "prompt_tokens") or 0,
            completion_tokens=_int(fields, "completion_tokens") or 0,
            cached_tokens=_int(fields, "cached_tokens") or 0,
            cache_write_tokens=_int(fields, "cache_write_tokens") or 0,
            reasoning_tokens=_int(fields, "reasoning_tokens") or 0,
            uncharged=_int(fields, "uncharged") or 0,
            price_version=fields.get("price_version", ""),
            stream=fields.get("stream") == "1",
            gateway_prompt_tokens=_int(fields, "gateway_prompt_tokens"),
            gateway_completion_tokens=_int(fields, "gateway_completion_tokens"),
            key_id=fields.get("key_id", ""),
            upstream=fields.get("upstream", ""),
            channel=fields.get("channel", ""),
            event=fields.get("event", ""),
            bytes=_int(fields, "bytes"),
        )

    def view(self, entry_id: str) -> dict[str, Any]:
        """The record as the admin API shows it (SPEC section 6): money as decimal strings,
        the time in ISO 8601, absent values as null; keys in USAGE_FIELDS order."""
        return {
            "id": entry_id,
            "request_id": self.request_id,
            "time": iso_ms(self.time) if self.time else None,
            "kind": self.kind,
            "model": self.model,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost": format_micros(self.cost),
            "uncharged": format_micros(self.uncharged),
            "price_version": self.price_version or None,
            "usage_source": self.usage_source or None,
            "status": self.status or None,
            "stream": self.stream,
            "gateway_prompt_tokens": self.gateway_prompt_tokens,
            "gateway_completion_tokens": self.gateway_completion_tokens,
            "key_id": self.key_id or None,
            "upstream": self.upstream or None,
            "channel": self.channel or None,
            "event": self.event or None,
            "bytes": self.bytes,
        }
