"""Money as integer micro-units (10^-6 of the currency): parsing, printing, and the bounds that
keep it exact (gateway/pricing.py turns tokens into it).

No float ever holds an amount: API strings are parsed digit by digit and costs are computed
in exact integer arithmetic, rounded up to the next micro-unit once per call.

The ledger's Lua scripts read amounts with `tonumber`, and a Lua number is a double: exact
only up to 2**53 (about 9.007e15). So every amount that reaches a script has a documented
maximum, and what would exceed it is refused before it gets there:

- a top-up is at most MAX_AMOUNT_MICROS, and none may take a balance above
  MAX_BALANCE_MICROS (topup.lua checks it, before its first write, so concurrent top-ups
  cannot pass it together); the script's own sum is then at most 2 * 10**15;
- a price per million tokens is at most MAX_PRICE_PER_MILLION_MICROS (the config refuses more);
- a call is billed for at most `billing.max_tokens_per_call` prompt tokens and as many
  completion tokens (usage reported above that is billed at the bound; a request asking for
  more is refused), and that key is at most MAX_TOKENS_PER_CALL. A call's cost, and its hold,
  is therefore at most
      ceil((10**8 * 10**12 + 10**8 * 10**12) / 10**6) = 2 * 10**14 micro-units,
  a fifth of MAX_BALANCE_MICROS and 45 times below 2**53 (tests/billing/test_bounds.py
  checks this arithmetic against the constants).
A balance changes only by HINCRBY (exact 64-bit integers in the store), each time by one of
these amounts.
"""

from __future__ import annotations

import re

__all__ = [
    "MAX_AMOUNT_MICROS",
    "MAX_BALANCE_MICROS",
    "MAX_PRICE_PER_MILLION_MICROS",
    "MAX_TOKENS_PER_CALL",
    "format_micros",
    "parse_amount",
    "parse_micros",
]

MICROS = 1_000_000
LUA_EXACT = 2**53  # the largest range a Lua number (a double) holds every integer of
# One top-up, at most: 1,000,000,000.000000 of the currency.
MAX_AMOUNT_MICROS = 10**15
# A balance, at most (a top-up beyond it is refused): also 1,000,000,000.000000.
MAX_BALANCE_MICROS = 10**15
# A price per million tokens, at most: 1,000,000.000000 of the currency (room for currencies
# with small units; today's dearest models cost some hundreds of US dollars per million).
MAX_PRICE_PER_MILLION_MICROS = 10**12
# `billing.max_tokens_per_call`, at most: ten times the longest context windows of today.
MAX_TOKENS_PER_CALL = 10**8

# ASCII digits only, matched whole: no sign, no spaces, no exponent, no trailing newline; at
# most 30 before the point (far past any maximum, short enough to parse at once).
_AMOUNT = re.compile(r"([0-9]{1,30})(?:\.([0-9]{1,6}))?")


def parse_micros(text: object, *, minimum: int = 0, maximum: int = MAX_AMOUNT_MICROS) -> int:
    """A decimal string (`"10.00"`, at most 6 decimals) -> micro-units, in [minimum, maximum].
    The one parser of money written by people (API bodies, headers, the config file): the
    string is the amount exactly, nothing around it (`" 1"` is refused, not trimmed), and a
    float never stands in for one (YAML's `0.1` is a binary float)."""
    if not isinstance(text, str):
        raise ValueError('expected a decimal string with at most 6 decimals, such as "0.15"')
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise ValueError(
            "expected a decimal string of ASCII digits with at most 6 decimals and "
            f'nothing around it, e.g. "10.00" (at most {format_micros(maximum)})'
        )
    whole, frac = match.group(1), match.group(2) or ""
    micros = int(whole) * MICROS + int(frac.ljust(6, "0"))
    if micros < minimum:
        if minimum == 1:
            raise ValueError("must be greater than zero")
        raise ValueError(f"must be at least {format_micros(minimum)}")
    if micros > maximum:
        raise ValueError(f"too large: at most {format_micros(maximum)}")
    return micros


def parse_amount(text: object) -> int:
    """An amount of money to move (a top-up, a cost cap): positive, at most
    MAX_AMOUNT_MICROS."""
    try:
        return parse_micros(text, minimum=1)
    except ValueError as exc:
        raise ValueError(f"amount {exc}") from None


def format_micros(micros: int) -> str:
    """Micro-units -> a decimal string with six decimals (`-0.000123`, `12.345678`)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS)
    return f"{sign}{whole}.{frac:06d}"
