"""Every duration and numeric limit has a documented minimum (and a maximum where a large value
does harm), checked at load with an error that names the path and the bound in the config's
units: `billing.sweep_interval: must be at least 50ms (got 0s)`. The reload side is in
tests/ops/test_reload.py; the table is tests/config/bounds.py."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.config import ConfigError, load_settings, parse_settings
from tests.config.bounds import (
    CEILING,
    DURATIONS,
    INTS,
    Bound,
    all_at,
    base_config,
    boundary,
    high_of,
    just_below,
    millis,
    too_large,
    too_large_message_start,
    too_small,
    too_small_message,
    with_value,
    with_values,
)

ALL = (*DURATIONS, *INTS)
WITH_MAX = tuple(b for b in ALL if high_of(b) is not None)


def _ids(bounds: tuple[Bound, ...]) -> list[str]:
    return [b.path for b in bounds]


def _problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    return info.value.problems


def _value_at(settings: Any, path: str) -> Any:
    node = settings
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        node = node[int(part[1:-1])] if part.startswith("[") else getattr(node, part)
    return node


def _seconds(text: str) -> float:
    return millis(text) / 1000


@pytest.mark.parametrize("bound", ALL, ids=_ids(ALL))
def test_zero_is_refused_at_its_path(bound: Bound) -> None:
    """A zero duration (an int one below its minimum) is refused, with the path and the
    minimum in the config's units."""
    value = too_small(bound)
    assert _problems(with_value(base_config(), bound.path, value)) == [
        too_small_message(bound, value)
    ]


@pytest.mark.parametrize("bound", DURATIONS, ids=_ids(DURATIONS))
def test_just_below_the_minimum_is_refused(bound: Bound) -> None:
    """One millisecond below the minimum is refused too: the bound is the documented one."""
    value = just_below(bound)
    assert _problems(with_value(base_config(), bound.path, value)) == [
        too_small_message(bound, value)
    ]


@pytest.mark.parametrize("bound", ALL, ids=_ids(ALL))
def test_the_minimum_itself_is_accepted(bound: Bound) -> None:
    settings = parse_settings(boundary(bound, bound.low))
    expected = _seconds(bound.low) if isinstance(bound.low, str) else bound.low
    assert _value_at(settings, bound.path) == pytest.approx(expected)


@pytest.mark.parametrize("bound", WITH_MAX, ids=_ids(WITH_MAX))
def test_above_the_maximum_is_refused(bound: Bound) -> None:
    problems = _problems(with_value(base_config(), bound.path, too_large(bound)))
    assert len(problems) == 1, problems
    assert problems[0].startswith(too_large_message_start(bound)), problems


@pytest.mark.parametrize("bound", WITH_MAX, ids=_ids(WITH_MAX))
def test_the_maximum_itself_is_accepted(bound: Bound) -> None:
    high = high_of(bound)
    settings = parse_settings(boundary(bound, high))
    expected = _seconds(high) if isinstance(high, str) else high
    assert _value_at(settings, bound.path) == pytest.approx(expected)


def test_messages_use_the_configs_units() -> None:
    """The value given back is written as the operator would write it."""
    cases = {
        ("billing.sweep_interval", 0): "billing.sweep_interval: must be at least 50ms (got 0s)",
        ("billing.sweep_interval", "2h"): "billing.sweep_interval: must be at most 1h (got 2h)",
        ("billing.hold_lease", "0.5s"): "billing.hold_lease: must be at least 1s (got 500ms)",
        ("server.drain_timeout", "90m"): "server.drain_timeout: must be at most 1h (got 90m)",
        ("notifications.timeout", 90): "notifications.timeout: must be at most 1m (got 90s)",
        ("billing.grace_period", "36501d"): "billing.grace_period: must be at most 36500d (got "
        "36501d)",
    }
    for (path, value), expected in cases.items():
        assert _problems(with_value(base_config(), path, value)) == [expected]


@pytest.mark.parametrize("text", [".nan", ".inf", "1.0e+999"])
def test_non_finite_durations_are_refused(text: str, tmp_path: Path) -> None:
    """YAML reads `.nan`, `.inf` and `1.0e+999` as floats that no timer or int() can take."""
    path = tmp_path / "c.yaml"
    path.write_text(f"billing:\n  sweep_interval: {text}\n  grace_period: {text}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    got = "nan" if text == ".nan" else "inf"
    assert info.value.problems == [
        f"billing.{field}: expected a finite duration such as '2s' (got {got})"
        for field in ("grace_period", "sweep_interval")
    ]


@pytest.mark.parametrize(
    ("notifications", "expected"),
    [
        (
            {"retry_base": "2s", "retry_max": "1s"},
            "notifications.retry_max: must be at least retry_base, 2s (got 1s)",
        ),
        (  # retry_max left at its default (5m): still checked
            {"retry_base": "10m"},
            "notifications.retry_max: must be at least retry_base, 10m (got 5m)",
        ),
    ],
)
def test_retry_max_is_at_least_retry_base(notifications: dict[str, Any], expected: str) -> None:
    assert _problems({"notifications": notifications}) == [expected]


def test_retry_max_equal_to_retry_base_is_accepted() -> None:
    settings = parse_settings({"notifications": {"retry_base": "5m"}})
    assert settings.notifications.retry_max == settings.notifications.retry_base == 300.0


def test_defaults_and_shipped_configs_are_within_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    parse_settings(None)
    monkeypatch.setenv("UPSTREAM_API_KEY", "x")
    repo = Path(__file__).resolve().parents[2]
    for name in ("demo.yaml", "gateway.example.yaml"):
        load_settings(repo / "config" / name)


def test_every_bounded_field_is_in_the_documented_table() -> None:
    """The schema declares exactly the table's bounds: a new duration or int field cannot come
    without a documented minimum (prices, Micros, are bounded by their own validators)."""
    from pydantic import AfterValidator, BaseModel, BeforeValidator

    from gateway.config.schema import DurationRange, Settings
    from gateway.config.types import parse_duration

    durations: dict[str, tuple[str, str]] = {}
    ints: dict[str, tuple[int | None, int | None]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            path, kind = f"{prefix}{name}", info.annotation
            if typing.get_origin(kind) is tuple:  # webhooks, models, upstreams
                path, kind = f"{path}[0]", typing.get_args(kind)[0]
            elif type(None) in typing.get_args(kind):  # optional: the type inside
                kind = next(a for a in typing.get_args(kind) if a is not type(None))
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                walk(kind, f"{path}.")
                continue
            parsers = [m.func for m in info.metadata if isinstance(m, BeforeValidator)]
            ranges = [
                m.func
                for m in info.metadata
                if isinstance(m, AfterValidator) and isinstance(m.func, DurationRange)
            ]
            if parse_duration in parsers:
                assert len(ranges) == 1, f"{path}: a duration without a DurationRange"
                durations[path] = (ranges[0].low, ranges[0].high)
            elif kind is int and not parsers:  # an int that is not money (Micros)
                ge = next((m.ge for m in info.metadata if hasattr(m, "ge")), None)
                le = next((m.le for m in info.metadata if hasattr(m, "le")), None)
                assert ge is not None, f"{path}: an int without a minimum"
                ints[path] = (ge, le)

    walk(Settings, "")
    documented = {b.path: (b.low, high_of(b)) for b in DURATIONS}
    assert durations == documented
    assert ints == {b.path: (b.low, b.high) for b in INTS}
    assert all(r[1] == CEILING or millis(r[1]) < millis(CEILING) for r in durations.values())


def _check_config(tmp_path: Path, config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_check_config_refuses_every_zero_and_accepts_every_boundary(tmp_path: Path) -> None:
    """The operator's tool: every field at zero (ints one below their minimum) in one file
    exits 1 with one path-named line each; every field at its minimum, or all at their
    maximum, exits 0; every field above its maximum exits 1, one line each."""
    zero = with_values(base_config(), {b.path: too_small(b) for b in ALL})
    result = _check_config(tmp_path, zero)
    assert result.returncode == 1, result.stdout
    for bound in ALL:
        assert too_small_message(bound, too_small(bound)) in result.stderr, result.stderr

    for which in ("low", "high"):
        result = _check_config(tmp_path, all_at(which))
        assert result.returncode == 0, (which, result.stderr)

    above = with_values(base_config(), {b.path: too_large(b) for b in WITH_MAX})
    result = _check_config(tmp_path, above)
    assert result.returncode == 1, result.stdout
    for bound in WITH_MAX:
        assert too_large_message_start(bound) in result.stderr, result.stderr
