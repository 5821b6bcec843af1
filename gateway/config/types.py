"""Scalar types of the config file: durations, decimal money, rate-limit strings.

Each parses the operator's text into what the code uses (seconds, integer micro-units) and
fails with a message that says what was expected, so the loader can prefix the field's path.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from limits import parse_many
from pydantic import BeforeValidator

__all__ = ["Duration", "Micros", "RateLimit", "parse_duration", "parse_micros"]

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DECIMAL = re.compile(r"^[0-9]+(\.[0-9]{1,6})?$")


def parse_duration(value: Any) -> float:
    """`"15d"`, `"1h"`, `"2s"`, `"250ms"` (or a bare number of seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '15d', '1h', '2s' or '250ms'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (match := _DURATION.match(value)):
        seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    else:
        raise ValueError("expected a duration such as '15d', '1h', '2s' or '250ms'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_micros(value: Any) -> int:
    """A decimal string with at most six decimals (`"0.15"`) -> integer micro-units.

    Floats are refused: YAML turns `0.1` into a binary float, and money never passes through one.
    """
    if not isinstance(value, str) or not _DECIMAL.match(value.strip()):
        raise ValueError('expected a decimal string with at most 6 decimals, such as "0.15"')
    try:
        micros = Decimal(value.strip()) * 1_000_000
    except InvalidOperation as exc:  # pragma: no cover - the regex already refuses these
        raise ValueError("expected a decimal string") from exc
    return int(micros)


def _parse_rate_limit(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError("expected a rate limit string such as '600/minute'")
    try:
        parse_many(value)
    except ValueError as exc:
        raise ValueError(f"expected a rate limit string such as '600/minute' ({exc})") from exc
    return value


Duration = Annotated[float, BeforeValidator(parse_duration)]
Micros = Annotated[int, BeforeValidator(parse_micros)]
RateLimit = Annotated[str, BeforeValidator(_parse_rate_limit)]
