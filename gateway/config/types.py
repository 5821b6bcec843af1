"""Scalar types of the config file: durations, decimal money, rate-limit strings.

Each parses the operator's text into what the code uses (seconds, integer micro-units) and
fails with a message that says what was expected, so the loader can prefix the field's path.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, NamedTuple

from limits import parse_many
from limits.util import SEPARATORS, SINGLE_EXPR
from pydantic import BeforeValidator

from gateway import money

__all__ = [
    "RATE_LIMIT_MAX_AMOUNT",
    "RATE_LIMIT_MAX_WINDOW_SECONDS",
    "Duration",
    "LimitRule",
    "Micros",
    "RateLimit",
    "check_rate_limit",
    "parse_duration",
    "parse_micros",
    "parse_rate_limit",
]

_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


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
    """A decimal string with at most six decimals (`"0.15"`) -> integer micro-units, zero
    allowed (a free model, a free channel): money.parse_micros, the one parser of written
    money, so the config file and the API read amounts by the same rule. Its bound is the
    field's own (a price's, schema._price_at_most_max)."""
    return money.parse_micros(value, maximum=10**36)


# The bounds of every rule of a rate-limit string. An amount is at least 1 (a limit of 0 would
# refuse every call: freeze the account or drop its subscription for that) and at most 10**15,
# so the admission script's counts stay exact in Lua's doubles (2**53 is about 9.007e15). A
# window is whole seconds (the smallest `limits` names is a second; `limits` reads "1/0seconds"
# as 1/second, so a zero multiple is refused here) and at most one year as `limits` counts it
# (360 days): a counter lives twice its longest window.
RATE_LIMIT_MAX_AMOUNT = 10**15
RATE_LIMIT_MAX_WINDOW_SECONDS = 360 * 86400
_RATE_LIMIT_EXAMPLE = "'600/minute' or '10/second;600/minute'"


class LimitRule(NamedTuple):
    """One rule of a rate-limit string: at most `amount` per `seconds`."""

    amount: int
    seconds: int


def parse_rate_limit(text: str) -> tuple[LimitRule, ...]:
    """Every rule of a rate-limit string (`limits`' notation: `"2/second;5/minute"`, rules
    separated by `;`, `,` or `|`), one per window length (the tightest where a string names
    one window twice), shortest window first. ValueError says what is wrong and where."""
    if not isinstance(text, str):
        raise ValueError(f"expected a rate limit string such as {_RATE_LIMIT_EXAMPLE}")
    try:
        items = parse_many(text)
    except ValueError:
        raise ValueError(
            f"expected a rate limit string such as {_RATE_LIMIT_EXAMPLE} (rules separated by"
            f" ';', ',' or '|'), not {text!r}"
        ) from None
    parts = SEPARATORS.split(text)
    if len(parts) != len(items):  # pragma: no cover - parse_many splits the same way
        raise ValueError(f"expected a rate limit string such as {_RATE_LIMIT_EXAMPLE}")
    tightest: dict[int, int] = {}
    for part, item in zip(parts, items, strict=True):
        where = repr(part.strip()) + (f" in {text!r}" if len(parts) > 1 else "")
        match = SINGLE_EXPR.match(part)
        if match and match.group(3) is not None and int(match.group(3)) == 0:
            raise ValueError(f"{where}: a window is at least 1 second")
        if item.amount < 1:
            raise ValueError(f"{where}: a limit is at least 1 (call or token) per window")
        if item.amount > RATE_LIMIT_MAX_AMOUNT:
            raise ValueError(f"{where}: a limit is at most {RATE_LIMIT_MAX_AMOUNT} per window")
        seconds = item.get_expiry()
        if seconds > RATE_LIMIT_MAX_WINDOW_SECONDS:
            raise ValueError(f"{where}: a window is at most 1 year")
        tightest[seconds] = min(item.amount, tightest.get(seconds, item.amount))
    return tuple(LimitRule(amount, seconds) for seconds, amount in sorted(tightest.items()))


def check_rate_limit(text: str) -> str:
    """`text` if it is a valid rate-limit string (see `parse_rate_limit`), else ValueError
    with a message fit to show the operator (config loader, admin API)."""
    parse_rate_limit(text)
    return text


def _parse_rate_limit(value: Any) -> str:
    return check_rate_limit(value)


Duration = Annotated[float, BeforeValidator(parse_duration)]
Micros = Annotated[int, BeforeValidator(parse_micros)]
RateLimit = Annotated[str, BeforeValidator(_parse_rate_limit)]
