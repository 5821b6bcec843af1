"""Times in APIs: ISO 8601 UTC with milliseconds; stored as integer ms since the epoch."""

from __future__ import annotations

import time
from datetime import UTC, datetime

__all__ = ["iso_ms", "now_ms", "parse_iso_ms"]


def now_ms() -> int:
    """Wall-clock time in ms since the epoch, the unit every stored time uses."""
    return int(time.time() * 1000)


def iso_ms(ms: int | None) -> str | None:
    """`1700000000123` -> `"2023-11-14T22:13:20.123Z"`; None stays None."""
    if ms is None:
        return None
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ms % 1000:03d}Z"


def parse_iso_ms(text: str) -> int:
    """An ISO 8601 time (`2026-12-01T00:00:00Z`, with an offset, or a date alone, taken as
    UTC midnight) -> ms since the epoch; ValueError for anything else."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)
