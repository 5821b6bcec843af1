"""The configs in config/ from a fresh clone: each passes `check-config` with no secret set
(an unset secret variable is a warning there, naming its path), `serve` refuses an unset
secret (exit 1, naming the path), and the example config lists every key the schema has."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from gateway.config import ConfigError, load_settings, parse_settings
from gateway.config.schema import Settings

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "config").glob("*.yaml"))
EXAMPLE = REPO / "config" / "gateway.example.yaml"
# Every variable a shipped config or the tests below name, unset for each run.
SECRETS = (
    "UPSTREAM_API_KEY",
    "OPENAI_API_KEY",
    "VLLM_API_KEY",
    "GATEWAY_ADMIN_TOKEN",
    "GATEWAY_STORE_URL",
    "OPS_WEBHOOK_SECRET",
    "SMS_TOKEN",
    "TEST_FC_KEY",
    "TEST_FC_STORE_URL",
    "TEST_FC_HOOK",
    "TEST_FC_SMS",
)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return {**env, **extra}


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env=env if env is not None else _env(),
        cwd=REPO,
    )


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: ")]


def _secret_variables(data: Any) -> set[str]:
    """The variables a parsed config names in its `*_env` keys (the admin token's aside)."""
    found = set()
    if isinstance(data, dict):
        for key, value in data.items():
            if key.endswith("_env") and key != "admin_token_env" and isinstance(value, str):
                found.add(value)
            found |= _secret_variables(value)
    elif isinstance(data, list):
        for item in data:
            found |= _secret_variables(item)
    return found


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_config_passes_check_config_with_no_secret_set(path: Path) -> None:
    """Exit 0 and `ok` with nothing set; the admin token's absence is a warning line (the
    admin API is then disabled), as is any upstream key the file names."""
    result = _run("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: ok (" in result.stdout
    warnings = _warnings(result.stderr)
    assert (
        "warning: server.admin_token_env: environment variable GATEWAY_ADMIN_TOKEN is not set "
        "(the admin API is disabled without it: every /admin route answers 401)"
    ) in warnings
    for variable in _secret_variables(yaml.safe_load(path.read_text())):
        assert any(f"variable {variable} is not set" in line for line in warnings), result.stderr
    # Nothing but warnings and the final line: no traceback, no error.
    assert len(result.stderr.splitlines()) == len(warnings), result.stderr


def test_example_warns_for_its_upstream_key_and_serve_refuses_without_it() -> None:
    """What check-config only warns about, serve refuses at once: exit 1, the path named.
    Set, the warning is gone."""
    shipped = {p.name for p in SHIPPED}
    assert {"demo.yaml", "gateway.example.yaml", "compose.yaml"} <= shipped
    assert {"openai.yaml", "vllm.yaml", "redis.yaml"} <= shipped  # the README's worked examples
    result = _run("check-config", "--config", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert (
        "warning: models[0].upstreams[0].api_key_env: environment variable UPSTREAM_API_KEY "
        "is not set (serve refuses to start without it)"
    ) in _warnings(result.stderr)
    env = _env(UPSTREAM_API_KEY="sk-x", GATEWAY_ADMIN_TOKEN="t")
    result = _run("check-config", "--config", str(EXAMPLE), env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    result = _run("serve", "--config", str(EXAMPLE), "--port", "1")
    assert result.returncode == 1
    assert (
        "models[0].upstreams[0]: environment variable UPSTREAM_API_KEY (api_key_env) is not set"
        in result.stderr
    )
    assert "Traceback" not in result.stderr


EVERY_SECRET = {
    "store": {"url_env": "TEST_FC_STORE_URL"},
    "notifications": {
        "webhooks": [{"url": "https://ops.example.com/hook", "secret_env": "TEST_FC_HOOK"}],
        "sms": {"url": "https://sms.example.com/send", "token_env": "TEST_FC_SMS"},
    },
    "models": [
        {
            "name": "m",
            "billing": "dedicated",
            "upstreams": [
                {"url": "http://127.0.0.1:9/v1"},
                {"url": "http://127.0.0.1:9/v1", "api_key_env": "TEST_FC_KEY"},
            ],
        }
    ],
}


def test_every_kind_of_unset_secret_is_a_warning_at_check_config_and_an_error_at_serve(
    tmp_path: Path,
) -> None:
    path = tmp_path / "secrets.yaml"
    path.write_text(yaml.safe_dump(EVERY_SECRET))
    result = _run("check-config", "--config", str(path), env=_env(GATEWAY_ADMIN_TOKEN="t"))
    assert result.returncode == 0, result.stderr
    tail = " (serve refuses to start without it)"
    assert _warnings(result.stderr) == [
        "warning: store.url_env: environment variable TEST_FC_STORE_URL is not set" + tail,
        "warning: notifications.webhooks[0].secret_env: "
        "environment variable TEST_FC_HOOK is not set" + tail,
        "warning: notifications.sms.token_env: environment variable TEST_FC_SMS is not set" + tail,
        "warning: models[0].upstreams[1].api_key_env: environment variable TEST_FC_KEY is not set"
        + tail,
    ]
    result = _run("serve", "--config", str(path), env=_env(GATEWAY_ADMIN_TOKEN="t"))
    assert result.returncode == 1
    for line in (
        "store: url_env: environment variable TEST_FC_STORE_URL is not set",
        "notifications: webhooks[0].secret_env: environment variable TEST_FC_HOOK is not set",
        "models[0].upstreams[1]: environment variable TEST_FC_KEY (api_key_env) is not set",
    ):
        assert line in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_still_fails_on_a_real_error_beside_an_unset_secret(tmp_path: Path) -> None:
    data = {**EVERY_SECRET, "billing": {"sweep_interval": "0s"}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    result = _run("check-config", "--config", str(path))
    assert result.returncode == 1
    assert "billing.sweep_interval: must be at least 50ms (got 0s)" in result.stderr
    assert "is not set" not in result.stderr  # the real problem alone, not the secrets


def test_the_loader_is_strict_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Serving and reloading use the default (an unset secret is an error); only a check
    passes require_secrets=False, and such a snapshot lists what it lacks."""
    for name in SECRETS:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError) as info:
        parse_settings(EVERY_SECRET, "t")
    assert len(info.value.problems) == 3
    checked = parse_settings(EVERY_SECRET, "t", require_secrets=False)
    assert checked.models[0].upstreams[1].api_key is None
    assert checked.store.url == "embedded"
    assert len(checked.unset_secrets()) == 4
    monkeypatch.setenv("UPSTREAM_API_KEY", "sk-x")
    settings = load_settings(EXAMPLE)
    assert settings.unset_secrets() == []
    key = settings.models[0].upstreams[0].api_key
    assert key is not None
    assert key.get_secret_value() == "sk-x"


# ---------------------------------------------------------------- the example lists every key


def _models_in(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The config models a field holds, each with whether it is a list of them."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    found = []
    origin = typing.get_origin(annotation)
    for arg in typing.get_args(annotation):
        if arg is Ellipsis:
            continue
        for model, listed in _models_in(arg):
            found.append((model, listed or origin in (tuple, list)))
    return found


def _schema_paths(model: type[BaseModel], prefix: str = "") -> set[str]:
    """Every key a config file can hold: `server.port`, `models[].upstreams[].weight`."""
    paths = set()
    for name, field in model.model_fields.items():
        if field.exclude:  # resolved at load (an upstream's key), never written in the file
            continue
        path = f"{prefix}.{name}" if prefix else name
        paths.add(path)
        forms = _models_in(field.annotation)
        for inner, listed in forms:
            # A field that takes one model or a list of them (`pricing`: a sheet or a
            # schedule) has the same keys either way: the example shows them once, listed.
            both = (inner, not listed) in forms
            paths |= _schema_paths(inner, path + ("[]" if listed or both else ""))
    return paths


def _data_paths(data: Any, prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(data, dict):
        for key, value in data.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= _data_paths(value, path)
    elif isinstance(data, list):
        for item in data:
            paths |= _data_paths(item, prefix + "[]")
    return paths


_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[a-z_]+):")
_COMMENTED_KEY = re.compile(r"^(?P<indent> *)# (?P<key>[a-z_]+): (?P<value>.+)$")


def _example_paths(text: str) -> set[str]:
    """The keys the example shows: those set, and the optional ones shown commented out as
    one line `# key: value` (at the key's own indentation, inside its section)."""
    paths = _data_paths(yaml.safe_load(text))
    sections: list[tuple[int, str]] = []  # (indentation, path) of the live keys above
    for line in text.splitlines():
        live = _KEY_LINE.match(line)
        if live:
            indent = len(live["indent"])
            sections = [s for s in sections if s[0] < indent]
            parent = sections[-1][1] + "." if sections else ""
            sections.append((indent, parent + live["key"]))
            continue
        commented = _COMMENTED_KEY.match(line)
        if commented is None:
            continue
        value_text = re.split(r"\s+#", commented["value"], maxsplit=1)[0]
        try:
            value = yaml.safe_load(value_text)
        except yaml.YAMLError:
            continue  # prose that happens to look like a key
        indent = len(commented["indent"])
        enclosing = [s for s in sections if s[0] < indent]
        parent = enclosing[-1][1] + "." if enclosing else ""
        paths |= _data_paths({commented["key"]: value}, parent.rstrip("."))
    return paths


def test_the_example_config_lists_every_key_of_the_schema() -> None:
    """config/gateway.example.yaml says it lists every key: each one the schema has is there,
    set or shown commented out, and none that the schema lacks."""
    # The walkers themselves, lest the check pass vacuously:
    schema = _schema_paths(Settings)
    for path in (
        "server.port",
        "proxy.timeouts.idle",
        "models[].upstreams[].weight",
        "notifications.webhooks[].secret_env",
        "notifications.smtp.sender",
    ):
        assert path in schema
    assert not any(path.endswith(".api_key") for path in schema)
    text = (
        "store:\n  url: embedded\n  # url_env: X   # why\n"
        "notifications:\n  # smtp: {host: h, port: 1}\n"
    )
    assert _example_paths(text) == {
        "store",
        "store.url",
        "store.url_env",
        "notifications",
        "notifications.smtp",
        "notifications.smtp.host",
        "notifications.smtp.port",
    }
    shown = _example_paths(EXAMPLE.read_text())
    assert sorted(schema - shown) == []
    assert sorted(shown - schema) == []
