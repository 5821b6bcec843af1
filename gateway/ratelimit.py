"""Rate limits per account and per (account, model), checked and charged at admission.

`limits` parses the limit strings: "600/minute", or several rules at once, every one enforced
("10/second;600/minute"; config.types.parse_rate_limit has the bounds). It also gives the
algorithm its name: a sliding window counter (the current fixed window's count plus the
previous one's, weighted by how much of it the sliding window still overlaps). The counting
runs inside the ledger's admission script (`ledger/lua/_prelude.lua`), on counters in the
account's own slot, so checking and charging every rule costs no round trip beyond the hold's,
and a refused call charges nothing. Tokens are charged the hold's estimate at admission and
corrected at settlement by the same script that debits the call. Limits hold across instances
because the counters live in Redis.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

from gateway.config.schema import ModelConfig, RateLimitsConfig
from gateway.config.types import check_rate_limit, parse_rate_limit

__all__ = ["RateRules", "check_rate_limit", "format_reset", "headers_of", "rate_rules", "rule_spec"]


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `1s`, `6m0s`, `20ms`."""
    if seconds < 1:
        return f"{max(0, int(seconds * 1000))}ms"
    whole = math.ceil(seconds)
    minutes, secs = divmod(whole, 60)
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


@functools.lru_cache(maxsize=4096)
def rule_spec(text: str | None) -> str:
    """Every rule of a limit string as the admission script reads it: `amount:window_ms`,
    comma-separated, one per window length, shortest window first ('' = none). ValueError
    for a string `check_rate_limit` refuses."""
    if not text:
        return ""
    return ",".join(f"{rule.amount}:{rule.seconds * 1000}" for rule in parse_rate_limit(text))


class RateRules(NamedTuple):
    """The rules one call is checked against (each a `rule_spec`); the account's own limits
    (admin API, stored with the account) replace the two account defaults inside the script."""

    account_requests: str
    account_tokens: str
    model_requests: str
    model_tokens: str


def rate_rules(defaults: RateLimitsConfig, model: ModelConfig) -> RateRules:
    own = model.rate_limits
    return RateRules(
        rule_spec(defaults.requests),
        rule_spec(defaults.tokens),
        rule_spec(own.requests if own else None),
        rule_spec(own.tokens if own else None),
    )


def headers_of(values: Sequence[str]) -> dict[str, str]:
    """OpenAI's x-ratelimit-* headers from the script's six values (limit, remaining, reset
    ms for requests, then tokens; '' where no rule applies). For each kind they describe the
    tightest of the rules that apply, account's and model's (see reserve.lua)."""
    headers: dict[str, str] = {}
    for kind, (limit, remaining, reset_ms) in (
        ("requests", values[0:3]),
        ("tokens", values[3:6]),
    ):
        if limit:
            headers[f"x-ratelimit-limit-{kind}"] = limit
            headers[f"x-ratelimit-remaining-{kind}"] = remaining
            headers[f"x-ratelimit-reset-{kind}"] = format_reset(int(reset_ms) / 1000)
    return headers
