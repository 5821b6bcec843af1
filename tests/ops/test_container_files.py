"""The Dockerfile and compose.yaml, read as files (no Docker daemon needed): the image and the
compose project start with nothing else (the embedded store in a volume, the demo upstream),
run under an init as PID 1, publish on loopback only, have no default admin token, build once,
and pin their base image and every dependency."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from gateway.config import load_settings

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO / "Dockerfile"
COMPOSE = REPO / "compose.yaml"
LOCK = REPO / "deploy" / "requirements.lock"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) for each Dockerfile instruction, continuation lines joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        whole = pending + line
        pending = ""
        keyword, _, args = whole.partition(" ")
        found.append((keyword.upper(), args.strip()))
    return found


INSTRUCTIONS = _instructions(DOCKERFILE.read_text())


def _all(keyword: str) -> list[str]:
    return [args for kw, args in INSTRUCTIONS if kw == keyword]


def _runtime_stage() -> list[tuple[str, str]]:
    """The instructions of the last stage (the image that runs)."""
    starts = [i for i, (kw, _) in enumerate(INSTRUCTIONS) if kw == "FROM"]
    return INSTRUCTIONS[starts[-1] :]


def _exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"{args!r}: use the exec (JSON) form"
    return [str(v) for v in value]


def _build_args() -> dict[str, str]:
    out = {}
    for args in _all("ARG"):
        name, _, default = args.partition("=")
        out[name] = default
    return out


def test_the_base_image_is_pinned_by_digest() -> None:
    """Every stage starts from one image, named by a patch-level tag and a sha256 digest."""
    froms = _all("FROM")
    assert len(froms) >= 1
    images = {args.split()[0] for args in froms}
    assert images == {"${PYTHON_IMAGE}"}, images
    base = _build_args()["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm@sha256:[0-9a-f]{64}", base), base


def test_an_init_is_pid_1_and_the_gateway_runs_under_it() -> None:
    runtime = _runtime_stage()
    entrypoint = _exec_form(next(args for kw, args in reversed(runtime) if kw == "ENTRYPOINT"))
    assert Path(entrypoint[0]).name == "tini", entrypoint
    assert entrypoint[1:] == ["--", "inference-gateway"], entrypoint
    installs = [args for kw, args in runtime if kw == "RUN" and "apt-get install" in args]
    assert any(re.search(r"\btini\b", args) for args in installs), installs
    # As before: a non-root user, and a healthcheck on readiness (not mere liveness).
    user = [args for kw, args in runtime if kw == "USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    (healthcheck,) = [args for kw, args in runtime if kw == "HEALTHCHECK"]
    assert "/readyz" in healthcheck


def test_the_default_command_needs_nothing_else_and_keeps_its_store_in_the_volume() -> None:
    """CMD serves a shipped config whose store is embedded, under a VOLUME, and whose one
    upstream is the demo's mock (started by `demo` itself), with no secret to set."""
    runtime = _runtime_stage()
    command = _exec_form([args for kw, args in runtime if kw == "CMD"][-1])
    assert command[0] == "demo", command
    in_image = command[command.index("--config") + 1]
    assert any(kw == "COPY" and args.split() == ["config/", "/app/config/"] for kw, args in runtime)
    config_file = REPO / "config" / Path(in_image).relative_to("/app/config")
    settings = load_settings(config_file, require_secrets=False)
    assert settings.store.url == "embedded"
    assert settings.unset_secrets() == []
    assert settings.server.host == "0.0.0.0"  # reachable through the published port
    (volume,) = [args for kw, args in runtime if kw == "VOLUME"]
    volumes = _exec_form(volume)
    data_dir = Path(settings.store.data_dir)
    assert data_dir.is_absolute()
    assert any(data_dir.is_relative_to(v) for v in volumes), (data_dir, volumes)
    for model in settings.models:
        for upstream in model.upstreams:
            assert upstream.url.startswith("http://127.0.0.1:"), upstream.url


def test_dependencies_are_installed_from_the_lock_alone() -> None:
    runs = " ".join(_all("RUN"))
    assert any(args.split()[0] == "deploy/requirements.lock" for args in _all("COPY"))
    assert re.search(r"pip install --no-deps -r requirements\.lock", runs)
    assert "pip check" in runs
    assert "--no-build-isolation" in runs  # the wheel is built with the locked setuptools


def _lock() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)", line)
        assert match, f"{line!r} is not pinned as name==version"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def test_the_lock_pins_every_dependency_of_the_project() -> None:
    """Each runtime dependency of pyproject.toml (and the build backend) has an exact version
    in the lock, one its specifier accepts. (scripts/lock_requirements.py rewrites the lock.)"""
    pins = _lock()
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    for text in pyproject["project"]["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {LOCK.relative_to(REPO)}"
        assert req.specifier.contains(pins[name], prereleases=True), (text, pins[name])
        if "hiredis" in req.extras:
            assert "hiredis" in pins
    for text in pyproject["build-system"]["requires"]:
        req = Requirement(text)
        assert canonicalize_name(req.name) in pins, f"build backend {req.name} is not locked"


# ------------------------------------------------------------------------------ compose.yaml


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def test_compose_runs_one_service_built_once() -> None:
    services = _compose()["services"]
    assert list(services) == ["gateway"], list(services)
    builds = [name for name, service in services.items() if "build" in service]
    assert builds == ["gateway"]
    (service,) = services.values()
    assert "depends_on" not in service
    assert "command" not in service  # the image's default: the demo, nothing else to run
    live = "\n".join(
        line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    assert "redis://" not in live  # no store service: the embedded one, in the volume


def test_compose_publishes_on_loopback_only() -> None:
    (service,) = _compose()["services"].values()
    ports = service["ports"]
    assert ports
    for port in ports:
        text = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
        assert text.startswith("127.0.0.1:"), port


_REFERENCE = re.compile(r"\$\{(?P<name>\w+)(?P<op>:?[-?+])?(?P<word>[^}]*)\}")


def test_compose_has_no_default_admin_token() -> None:
    """The token comes from the environment, required (`${VAR:?message}`: compose refuses to
    start without it), and no well-known default is left anywhere."""
    text = COMPOSE.read_text()
    assert "change-me" not in text
    (service,) = _compose()["services"].values()
    environment = service["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    value = environment["GATEWAY_ADMIN_TOKEN"]
    match = _REFERENCE.fullmatch(value)
    assert match, value
    assert match["name"] == "GATEWAY_ADMIN_TOKEN"
    assert match["op"] == ":?", value
    for live in (line for line in text.splitlines() if not line.lstrip().startswith("#")):
        for ref in _REFERENCE.finditer(live):
            assert ref["op"] in (None, ":?", "?"), f"{ref[0]}: a default for a secret"


def test_compose_keeps_the_data_dir_in_a_named_volume() -> None:
    compose = _compose()
    (service,) = compose["services"].values()
    mounts = [v.split(":") for v in service["volumes"] if isinstance(v, str)]
    named = [(src, dst) for src, dst, *_ in mounts if not src.startswith((".", "/"))]
    assert ("gateway-data", "/app/var") in named, mounts
    assert "gateway-data" in compose["volumes"]
