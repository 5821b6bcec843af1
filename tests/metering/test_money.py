"""Money as integer micro-units: parsing, printing and per-call cost, never a float."""

from __future__ import annotations

import math
import random
from decimal import Decimal
from fractions import Fraction
from typing import Any

import pytest

from gateway.money import MAX_AMOUNT_MICROS, format_micros, parse_amount
from tests.billing.checks import gateway_cost as call_cost

SEED = 20241126


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        ("10.00", 10_000_000),
        ("10", 10_000_000),
        ("0.000001", 1),
        ("0.1", 100_000),
        ("0.10", 100_000),
        ("1.5", 1_500_000),
        ("12.345678", 12_345_678),
        ("007.5", 7_500_000),
        ("0.999999", 999_999),
        ("1000000000", 10**15),
    ],
)
def test_parse_amount_accepts_decimal_strings(text: str, micros: int) -> None:
    """Positive decimal strings with at most six decimals parse to exact micro-units."""
    value = parse_amount(text)
    assert value == micros
    assert type(value) is int


@pytest.mark.parametrize(
    "value",
    [
        "-1",
        "0",
        "0.0",
        "0.000000",
        "1.0000001",
        "0.0000001",
        "abc",
        "",
        " ",
        "1e3",
        "1E-6",
        "1,00",
        "1.",
        ".5",
        "+1",
        "1.2.3",
        "0x10",
        "1_000",
        "NaN",
        "Infinity",
        "1000000000.000001",
        " 2.50 ",  # nothing around the digits: an amount is taken as written, not trimmed
        " 1",
        "1\n",
        "9999999999.999999",
        "99999999999",
        5,
        5.0,
        0.1,
        Decimal("1.00"),
        None,
        True,
        b"1.00",
        ["1.00"],
    ],
)
def test_parse_amount_refuses_everything_else(value: Any) -> None:
    """Zero, negatives, over six decimals, other notations, amounts over the maximum and
    non-strings (numbers included: an amount never passes through a float) raise ValueError."""
    with pytest.raises(ValueError, match="amount"):
        parse_amount(value)


@pytest.mark.parametrize(
    "text", ["\u0661\u0660", "\uff11\uff10.\uff15", "\u0e51"], ids=["arabic", "fullwidth", "thai"]
)
def test_parse_amount_accepts_ascii_digits_only(text: str) -> None:
    """Only ASCII digits make an amount: other scripts' digits are refused."""
    with pytest.raises(ValueError, match="amount"):
        parse_amount(text)


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        (0, "0.000000"),
        (1, "0.000001"),
        (-1, "-0.000001"),
        (-123, "-0.000123"),
        (999_999, "0.999999"),
        (1_000_000, "1.000000"),
        (-1_000_000, "-1.000000"),
        (12_345_678, "12.345678"),
        (-12_345_678, "-12.345678"),
        (10**15, "1000000000.000000"),
        (10**24 + 5, "1000000000000000000.000005"),
        (-(10**24) - 5, "-1000000000000000000.000005"),
    ],
)
def test_format_micros(micros: int, text: str) -> None:
    """Micro-units print with exactly six decimals, a minus sign only below zero, and no
    limit on size."""
    assert format_micros(micros) == text


def test_format_and_parse_round_trip() -> None:
    """parse_amount(format_micros(x)) == x for random amounts up to the maximum, and the
    printed string equals Decimal's exact six-decimal rendering."""
    rng = random.Random(SEED)
    samples = [1, MAX_AMOUNT_MICROS, *(rng.randint(1, MAX_AMOUNT_MICROS) for _ in range(2000))]
    for micros in samples:
        text = format_micros(micros)
        assert parse_amount(text) == micros
        assert text == f"{Decimal(micros).scaleb(-6):.6f}"
        assert format_micros(-micros) == "-" + text


def _exact_cost(prompt: int, completion: int, input_micros: int, output_micros: int) -> int:
    """SPEC section 2's cost, computed with fractions: ceil(total / 10**6)."""
    return math.ceil(Fraction(prompt * input_micros + completion * output_micros, 10**6))


def test_call_cost_matches_exact_fractions() -> None:
    """call_cost equals ceil((p * in + c * out) / 10**6) in exact rational arithmetic, for
    many random values across small and huge magnitudes, and is always an int."""
    rng = random.Random(SEED)
    for _ in range(20_000):
        magnitude = rng.choice([10, 1000, 10**6, 10**9, 10**15])
        prompt = rng.randint(0, magnitude)
        completion = rng.randint(0, magnitude)
        input_micros = rng.randint(0, rng.choice([1, 1000, 10**6, 10**9]))
        output_micros = rng.randint(0, rng.choice([1, 1000, 10**6, 10**9]))
        cost = call_cost(prompt, completion, input_micros, output_micros)
        assert type(cost) is int
        assert cost == _exact_cost(prompt, completion, input_micros, output_micros)


def test_call_cost_beyond_float_precision() -> None:
    """Totals past 2**53, where a float cannot even hold the answer, are still exact."""
    odd = 2**53 + 1  # no float holds this integer
    assert call_cost(10**6 * odd, 0, 1, 0) == odd
    assert math.ceil(float(10**6 * odd) / 10**6) != odd
    assert call_cost(10**6 * odd - 1, 0, 1, 0) == odd
    assert call_cost(0, 10**6 * odd + 1, 0, 1) == odd + 1
    prompt = 2**60 + 1
    assert call_cost(prompt, prompt, 3, 7) == _exact_cost(prompt, prompt, 3, 7)


@pytest.mark.parametrize(
    ("args", "cost"),
    [
        ((0, 0, 150_000, 600_000), 0),
        ((1, 0, 150_000, 600_000), 1),  # 0.15 micro-units rounds up to 1
        ((0, 1, 150_000, 600_000), 1),
        ((1_000_000, 0, 150_000, 600_000), 150_000),  # an exact multiple: no rounding
        ((1_000_000, 1_000_000, 150_000, 600_000), 750_000),
        ((20, 10, 150_000, 600_000), 9),  # 3 + 6 = 9 exactly
        ((21, 10, 150_000, 600_000), 10),  # 9.15 -> 10
        ((7, 0, 1, 0), 1),
        ((10**6, 0, 1, 0), 1),
        ((10**6 + 1, 0, 1, 0), 2),
        ((5, 5, 0, 0), 0),  # free model
    ],
)
def test_call_cost_rounds_up_once_per_call(args: tuple[int, int, int, int], cost: int) -> None:
    """The rounding is a ceiling applied once to the call's total, not to each part."""
    assert call_cost(*args) == cost


def test_call_cost_is_monotonic_and_subadditive_by_at_most_one() -> None:
    """More tokens never cost less, and one call costs at most one micro-unit less than the
    same tokens split into two calls (each rounded up)."""
    rng = random.Random(SEED + 1)
    for _ in range(5000):
        p, c = rng.randint(0, 10**6), rng.randint(0, 10**6)
        i, o = rng.randint(0, 10**7), rng.randint(0, 10**7)
        base = call_cost(p, c, i, o)
        assert call_cost(p + 1, c, i, o) >= base
        assert call_cost(p, c + 1, i, o) >= base
        p1, c1 = rng.randint(0, p), rng.randint(0, c)
        split = call_cost(p1, c1, i, o) + call_cost(p - p1, c - c1, i, o)
        assert base <= split <= base + 1
