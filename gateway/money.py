"""Money as integer micro-units (10^-6 of the currency): parsing, printing, pricing.

No float ever holds an amount: API strings are parsed digit by digit and costs are computed
in exact integer arithmetic, rounded up to the next micro-unit once per call.
"""

from __future__ import annotations

import re

__all__ = ["MAX_AMOUNT_MICROS", "call_cost", "format_micros", "parse_amount"]

MICROS = 1_000_000
# Redis' Lua numbers are doubles, exact to 2**53; keep every amount far below that.
MAX_AMOUNT_MICROS = 10**15
_AMOUNT = re.compile(r"^([0-9]{1,10})(?:\.([0-9]{1,6}))?$")  # ASCII digits only


def parse_amount(text: object) -> int:
    """A positive decimal string (`"10.00"`, at most 6 decimals) -> micro-units."""
    if not isinstance(text, str):
        raise ValueError('amount must be a decimal string such as "10.00"')
    match = _AMOUNT.match(text.strip())
    if match is None:
        raise ValueError('amount must be a decimal string with at most 6 decimals, e.g. "10.00"')
    whole, frac = match.group(1), match.group(2) or ""
    micros = int(whole) * MICROS + int(frac.ljust(6, "0"))
    if micros <= 0:
        raise ValueError("amount must be greater than zero")
    if micros > MAX_AMOUNT_MICROS:
        raise ValueError("amount is too large")
    return micros


def format_micros(micros: int) -> str:
    """Micro-units -> a decimal string with six decimals (`-0.000123`, `12.345678`)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"


def call_cost(
    prompt_tokens: int, completion_tokens: int, input_per_million: int, output_per_million: int
) -> int:
    """SPEC section 2: ceil((p * in + c * out) / 1e6) micro-units, in integers."""
    total = prompt_tokens * input_per_million + completion_tokens * output_per_million
    return -(-total // MICROS)
