"""The config file: path-named errors, parsed values, secrets from the environment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings, parse_settings

REPO = Path(__file__).resolve().parents[2]


def _model(**overrides: object) -> dict[str, object]:
    model: dict[str, object] = {
        "name": "m",
        "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
        "upstreams": [{"url": "http://127.0.0.1:9000/v1"}],
    }
    model.update(overrides)
    return model


def _problems(data: object) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    return info.value.problems


def test_error_names_the_field_path() -> None:
    """A float price in the third model is reported at models[2].pricing.input_per_million."""
    bad = _model(name="c", pricing={"input_per_million": 0.15, "output_per_million": "1"})
    problems = _problems({"models": [_model(name="a"), _model(name="b"), bad]})
    assert problems == [
        "models[2].pricing.input_per_million: expected a decimal string with at most 6 decimals,"
        ' such as "0.15"'
    ]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"billing": {"grace_period": "soon"}}, "billing.grace_period: expected a duration"),
        ({"server": {"port": 70000}}, "server.port: Input should be less than or equal to 65535"),
        ({"store": {"url": "http://x"}}, "store.url: expected 'embedded' or a URL with scheme"),
        ({"rate_limits": {"requests": "lots"}}, "rate_limits.requests: expected a rate limit"),
        ({"models": [_model(upstreams=[])]}, "models[0].upstreams: expected at least one upstream"),
        ({"models": [_model(upstreams=[{"url": "ftp://h"}])]}, "models[0].upstreams[0].url:"),
        ({"models": [_model(tokenizer="p50k")]}, "models[0].tokenizer: expected one of"),
        ({"models": [_model(pricing=None)]}, "models[0]: a model with billing 'tokens' needs"),
        ({"models": [_model(), _model()]}, "models: model name 'm' appears more than once"),
        ({"modles": []}, "modles: unknown field"),
    ],
)
def test_each_fault_is_reported_at_its_path(data: dict[str, object], expected: str) -> None:
    """Every kind of bad value names where it is and what was expected."""
    problems = _problems(data)
    assert any(p.startswith(expected) for p in problems), problems


def test_values_are_parsed_into_what_the_code_uses() -> None:
    """Durations become seconds, prices integer micro-units, upstream URLs lose a trailing '/'."""
    settings = parse_settings(
        {
            "billing": {"grace_period": "2s", "retention_period": "1h", "sweep_interval": "250ms"},
            "proxy": {"timeouts": {"connect": "1s", "first_byte": "15d", "idle": 3}},
            "models": [
                _model(
                    pricing={"input_per_million": "0.000001", "output_per_million": "12.5"},
                    upstreams=[{"url": "http://h:1/v1/", "weight": 3}],
                )
            ],
        }
    )
    assert settings.billing.grace_period == 2.0
    assert settings.billing.retention_period == 3600.0
    assert settings.billing.sweep_interval == 0.25
    assert settings.proxy.timeouts.first_byte == 15 * 86400
    assert settings.proxy.timeouts.idle == 3.0
    model = settings.models[0]
    assert model.pricing is not None
    assert model.pricing.input_per_million == 1
    assert model.pricing.output_per_million == 12_500_000
    assert isinstance(model.pricing.output_per_million, int)
    assert model.upstreams[0].url == "http://h:1/v1"
    assert model.upstream_model(model.upstreams[0]) == "m"


def test_defaults_follow_the_spec() -> None:
    """An empty file gives SPEC section 7's defaults."""
    settings = parse_settings(None)
    assert settings.server.port == 8080
    assert settings.server.admin_token_env == "GATEWAY_ADMIN_TOKEN"
    assert settings.store.url == "embedded"
    assert settings.billing.grace_period == 15 * 86400
    assert settings.billing.hold_output_tokens == 1024
    assert settings.rate_limits.requests == "600/minute"
    assert settings.proxy.timeouts.first_byte == 120.0


def test_upstream_key_comes_from_the_named_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """api_key_env is read at load; the key never shows in the snapshot's repr."""
    monkeypatch.setenv("TEST_UPSTREAM_KEY", "sk-very-secret")
    settings = parse_settings(
        {"models": [_model(upstreams=[{"url": "http://h/v1", "api_key_env": "TEST_UPSTREAM_KEY"}])]}
    )
    upstream = settings.models[0].upstreams[0]
    assert upstream.api_key is not None
    assert upstream.api_key.get_secret_value() == "sk-very-secret"
    assert "sk-very-secret" not in repr(settings)


def test_missing_key_variable_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """A key variable that is not set fails at load, at the upstream's path."""
    monkeypatch.delenv("NOPE_KEY", raising=False)
    problems = _problems(
        {"models": [_model(upstreams=[{"url": "http://h/v1", "api_key_env": "NOPE_KEY"}])]}
    )
    assert problems == [
        "models[0].upstreams[0]: environment variable NOPE_KEY (api_key_env) is not set"
    ]


def test_settings_are_immutable() -> None:
    """The snapshot cannot be edited in place; a reload must build a new one."""
    settings = parse_settings({"models": [_model()]})
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    """Broken YAML is reported with its line and column."""
    path = tmp_path / "bad.yaml"
    path.write_text("server:\n  port: [8080\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert info.value.problems[0].startswith("line ")


@pytest.mark.parametrize("name", ["demo.yaml", "gateway.example.yaml"])
def test_shipped_configs_are_valid(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The configs in config/ load as they are."""
    monkeypatch.setenv("UPSTREAM_API_KEY", "x")
    settings = load_settings(REPO / "config" / name)
    assert settings.models


def _check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", "--config", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_check_config_cli_exit_codes(tmp_path: Path) -> None:
    """check-config exits 0 on a good file and 1 with path-named errors on a bad one."""
    good = tmp_path / "good.yaml"
    good.write_text(
        "models:\n  - name: m\n    billing: dedicated\n    upstreams: [{url: 'http://h/v1'}]\n"
    )
    result = _check_config(good)
    assert result.returncode == 0, result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  - name: m\n    billing: dedicated\n    upstreams: [{url: 'h'}]\n")
    result = _check_config(bad)
    assert result.returncode == 1
    assert "models[0].upstreams[0].url: expected an http://" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "0"], "argument --port: Input should be greater than or equal to 1"),
        (["--port", "65536"], "argument --port: Input should be less than or equal to 65535"),
        (["--workers", "0"], "argument --workers: Input should be greater than or equal to 1"),
        (["--workers", "257"], "argument --workers: Input should be less than or equal to 256"),
        (["--port", "http"], "argument --port: expected an integer, not 'http'"),
    ],
)
def test_serve_overrides_are_held_to_the_configs_bounds(
    tmp_path: Path, args: list[str], message: str
) -> None:
    """`serve --port/--workers` are refused where the same value in the file would be, before
    anything starts (exit 2, argparse's code for a bad command line)."""
    path = tmp_path / "gateway.yaml"
    path.write_text("models: []\n")
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_store_url_can_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`store.url_env` keeps a store password out of the config file; unset or not a store
    URL, it is refused at its path."""
    data = {"store": {"url_env": "TEST_GW_STORE_URL"}}
    monkeypatch.setenv("TEST_GW_STORE_URL", "rediss://gateway:s3cret@store.internal:6380/0")
    assert parse_settings(data, "t").store.url == "rediss://gateway:s3cret@store.internal:6380/0"
    monkeypatch.setenv("TEST_GW_STORE_URL", "http://store.internal")
    with pytest.raises(ConfigError, match="store: url_env: TEST_GW_STORE_URL holds no store URL"):
        parse_settings(data, "t")
    monkeypatch.delenv("TEST_GW_STORE_URL")
    with pytest.raises(ConfigError, match="environment variable TEST_GW_STORE_URL is not set"):
        parse_settings(data, "t")
