"""Money as integer micro-units (10^-6 of the currency): parsing, printing, pricing.

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
    "call_cost",
    "format_micros",
    "parse_amount",
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

# ASCII digits only, matched whole: no sign, no spaces, no exponent, no trailing newline.
_AMOUNT = re.compile(r"([0-9]{1,10})(?:\.([0-9]{1,6}))?")


def parse_amount(text: object) -> int:
    """A positive decimal string (`"10.00"`, at most 6 decimals) -> micro-units. The string
    is the amount exactly: nothing around it (`" 1"` is refused, not trimmed)."""
    if not isinstance(text, str):
        raise ValueError('amount must be a decimal string such as "10.00"')
    match = _AMOUNT.fullmatch(text)
    if match is None:
        raise ValueError(
            "amount must be a decimal string of ASCII digits with at most 6 decimals and "
            f'nothing around it, e.g. "10.00" (at most {format_micros(MAX_AMOUNT_MICROS)})'
        )
    whole, frac = match.group(1), match.group(2) or ""
    micros = int(whole) * MICROS + int(frac.ljust(6, "0"))
    if micros <= 0:
        raise ValueError("amount must be greater than zero")
    if micros > MAX_AMOUNT_MICROS:
        raise ValueError(f"amount is too large: at most {format_micros(MAX_AMOUNT_MICROS)}")
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
