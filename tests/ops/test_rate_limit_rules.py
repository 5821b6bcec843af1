"""Multi-limit strings ("2/second;5/minute"): every rule parsed, each held to its bounds
(config load and the admin API share `check_rate_limit`)."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.config import ConfigError, parse_settings
from gateway.config.types import LimitRule, check_rate_limit, parse_rate_limit

# --- parsing -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["2/second;5/minute", "5/minute;2/second", "2/second,5/minute", "5/minute | 2/second"]
)
def test_every_rule_of_a_limit_string_is_kept(text: str) -> None:
    """`;`, `,` and `|` separate rules (as in `limits.parse_many`); the order does not matter."""
    assert check_rate_limit(text) == text
    assert parse_rate_limit(text) == (LimitRule(2, 1), LimitRule(5, 60))


def test_one_window_named_twice_keeps_the_tightest() -> None:
    rules = parse_rate_limit("10/second;60/minute;3/1second;50/60seconds")
    assert rules == (LimitRule(3, 1), LimitRule(50, 60))
    assert parse_rate_limit("3/2seconds;4/10seconds") == (LimitRule(3, 2), LimitRule(4, 10))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0/minute", "'0/minute': a limit is at least 1 (call or token) per window"),
        ("2/second;0/minute", "'0/minute' in '2/second;0/minute': a limit is at least 1"),
        ("1/0seconds", "'1/0seconds': a window is at least 1 second"),
        ("1/2years", "'1/2years': a window is at most 1 year"),
        ("1000000000000001/day", "'1000000000000001/day': a limit is at most 1000000000000000"),
        ("lots", "expected a rate limit string such as '600/minute'"),
        ("2/second;", "expected a rate limit string such as '600/minute'"),
        ("", "expected a rate limit string such as '600/minute'"),
    ],
)
def test_a_limit_out_of_bounds_is_refused_with_a_clear_message(text: str, message: str) -> None:
    """Every rule allows at least 1 per window (a zero limit is refused, not stored), over a
    window of 1 second to 1 year; the message names the rule and the string."""
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        check_rate_limit(text)


def test_the_largest_rule_allowed_is_accepted() -> None:
    assert parse_rate_limit("1000000000000000/year") == (LimitRule(10**15, 360 * 86400),)
    assert parse_rate_limit("1/1second") == (LimitRule(1, 1),)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"rate_limits": {"requests": "0/minute"}}, "rate_limits.requests: '0/minute': a limit"),
        (
            {"rate_limits": {"tokens": "1000/second;0/minute"}},
            "rate_limits.tokens: '0/minute' in '1000/second;0/minute': a limit is at least 1",
        ),
        (
            {
                "models": [
                    {
                        "name": "m",
                        "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
                        "upstreams": [{"url": "http://127.0.0.1:9000/v1"}],
                        "rate_limits": {"requests": "5/0minutes"},
                    }
                ]
            },
            "models[0].rate_limits.requests: '5/0minutes': a window is at least 1 second",
        ),
    ],
)
def test_the_config_loader_refuses_a_zero_limit_at_its_path(
    data: dict[str, Any], expected: str
) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
