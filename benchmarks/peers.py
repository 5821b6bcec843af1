"""Peer gateways for the benchmark: LiteLLM's proxy, Portkey's gateway and rolter, installed.

`prepare_litellm`, `prepare_portkey` and `prepare_rolter` install a peer once into a persistent
cache directory (`benchmarks/.cache`, git-ignored) and return a `PeerSpec`: the command that
starts it in the foreground, its environment, the port it listens on (127.0.0.1 only), the
request path, headers and model a chat completion through it needs, and a health path that
answers 200 once it serves. Nothing is started here; the caller runs `spec.argv` (with its own
CPU pinning in front) and stops it with SIGTERM. A second call with everything installed reads
one small marker file per peer and touches no network. A peer that cannot be installed raises
`PeerUnavailable`, whose message is a one-line reason.

LiteLLM (PyPI `litellm`, pinned by LITELLM_REQUIREMENT) goes into its own virtualenv,
`<cache>/litellm-venv`, made with the running interpreter. Its `[proxy]` extra does not resolve
on the package index here, but the main wheel already holds the proxy (`litellm/proxy`), so
the install is `litellm` itself, then the proxy extra's other requirements, read from the
installed distribution's `Requires-Dist: ...; extra == "proxy"`. A requirement that has no
matching release is relaxed to its bare name (any release) and, if even that has none, dropped;
a version conflict relaxes the requirement pip names. What was done is kept in the marker and
printed by `--smoke`. With litellm 1.110.2 on this index:

- `litellm-proxy==1.110.2`: dropped. The index has no `litellm-proxy` at all; the proxy ships
  inside the `litellm` wheel.
- `litellm-proxy-extras==0.4.114.post1`: relaxed (newest on the index: 0.4.110). It holds the
  Prisma schema and migrations, which the benchmark does not use (no database).
- `litellm-enterprise==0.1.83.post1`: relaxed (the index has 0.1.83).
- everything else (fastapi, uvicorn, uvloop, orjson, granian, ...) installs as pinned.

The proxy runs with one uvicorn worker, no database (its DB mode needs Prisma binaries that
cannot be fetched here; keep DATABASE_URL unset), no debug flags, and a config with one model,
`bench-model` -> `openai/<upstream_model>` at `api_base: <upstream_url>` with a dummy key. It
refuses to start without a master key: a random one per call goes into the config, and
`Authorization: Bearer <it>` into `headers`. Everything it would fetch from the internet at
start or per call is switched to its bundled copy (LITELLM_OFFLINE_MODE and the
LITELLM_LOCAL_* switches: model cost map, Anthropic beta headers, autorouter presets, blog
posts, policy templates), and telemetry is vetoed (LITELLM_TELEMETRY_DISABLED). Health:
`GET /health/liveliness`, which does not call the upstream (`/health` does).

Portkey (npm `@portkey-ai/gateway`, PORTKEY_VERSION) goes into `<cache>/portkey` with a
package.json written here. Its streaming breaks (500 "Something went wrong") with the newest
`hono` / `@hono/node-server` that its `^` ranges allow, so both are pinned, as dependencies and
npm `overrides`, to its own lockfile's versions (HONO_VERSION, HONO_NODE_SERVER_VERSION), and
the install checks that no other copy is in the tree. Install scripts are skipped (its only
one, `patch-package`, has no patches to apply). It is started with node as
`build/start-server.js --port=N --headless` (the script only understands `--port=N`; headless
leaves out the web UI and its log stream). That script listens on all interfaces, so a
two-line preload (`--require`) makes a listen() without a host bind 127.0.0.1. Routing to the
upstream is per request: `x-portkey-provider: openai`, `x-portkey-custom-host: <upstream_url>`,
`Authorization: Bearer dummy`; the model name passes through unchanged. Health: `GET /`
("AI Gateway says hey!").

rolter (PyPI `rolter`, ROLTER_REQUIREMENT), a gateway written in Rust, is compiled: its wheel
holds nothing but the native binary (as a wheel script), so `pip install --target
<cache>/rolter` with the running interpreter's pip puts it at `<cache>/rolter/bin/rolter`, and
no Python runs when it serves. It is started as `rolter gateway -c rolter.toml --host 127.0.0.1
--port N` with a config written here: one provider, `kind = "openai_compatible"`, whose
`api_base` is the upstream URL without its `/v1` (rolter appends `/v1/chat/completions`
itself), and one route, `bench-model` -> `<upstream_model>` on it (`round_robin` over its one
target). With no `[[virtual_keys]]` it asks for no key, so no headers are needed. No database,
no Redis, no control plane (it logs "running with static bootstrap config"). Health:
`GET /healthz`.

Found but not here: TensorZero (PyPI `tensorzero`) has its gateway only inside the Python
client's extension, started by a private function on a port the OS picks (it binds
127.0.0.1:0 and ignores `[gateway] bind_address`) and without a GET route that answers 200,
so it does not fit a `PeerSpec`; ferrogw (PyPI `ferrogw`, Go) listens on every interface
(`PORT` only sets the port; no host option), which the benchmark does not run.
benchmarks/README.md lists these and the gateways that cannot be installed here.

Smoke check: `python benchmarks/peers.py --smoke` starts the project's mock upstream, installs
(or reuses) every peer of PEERS (`--peer NAME` for some), starts each, waits for health, sends
one non-streamed and one streamed chat completion through each, prints one line per peer and
stops everything.
`--latency N` adds N sequential non-streamed calls per target (after 20 warm-up calls) and
prints the p50 of each peer next to the mock's own.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

from rig.procs import Proc, free_port, spawn, stop

HOST = "127.0.0.1"
CHAT_PATH = "/v1/chat/completions"

LITELLM_REQUIREMENT = "litellm==1.110.2"  # 1.110 or newer; pinned so runs compare
LITELLM_MODEL = "bench-model"
LITELLM_HEALTH = "/health/liveliness"
LITELLM_ENV = {
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_TELEMETRY_DISABLED": "true",
    "HF_HUB_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}

PORTKEY_PACKAGE = "@portkey-ai/gateway"
PORTKEY_VERSION = "1.15.2"
HONO_VERSION = "4.9.7"
HONO_NODE_SERVER_VERSION = "1.13.5"
PORTKEY_HEALTH = "/"
NODE_MIN_MAJOR = 18

ROLTER_REQUIREMENT = "rolter==0.1.0"  # the native gateway binary, as a wheel script
ROLTER_MODEL = "bench-model"
ROLTER_HEALTH = "/healthz"

PEERS = ("litellm", "portkey", "rolter")  # the names prepare_<name> exists for

MARKER = ".peers-install.json"
INSTALL_TIMEOUT = 1200.0  # seconds for one pip or npm command
PIP_ENV = {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}

# Prints the proxy extra's requirements of the installed litellm as JSON, run by the venv's
# python (packaging is one of litellm's own dependencies).
_PROXY_REQUIREMENTS_SCRIPT = """
import importlib.metadata, json
from packaging.requirements import Requirement
dist = importlib.metadata.distribution("litellm")
out = []
for line in dist.requires or []:
    req = Requirement(line)
    if req.marker is None or not req.marker.evaluate({"extra": "proxy"}):
        continue
    if req.marker.evaluate({"extra": ""}):
        continue  # not gated by the extra: already installed with litellm
    out.append({"name": req.name, "extras": sorted(req.extras), "specifier": str(req.specifier)})
print(json.dumps({"version": dist.version, "requirements": out}))
"""

# Prints {name: installed version} for the names given as JSON in argv[1].
_VERSIONS_SCRIPT = """
import importlib.metadata, json, sys
out = {}
for name in json.loads(sys.argv[1]):
    try:
        out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        out[name] = None
print(json.dumps(out))
"""

# Makes a listen(port) without a host bind the loopback address: Portkey's start-server.js
# passes no host, which would listen on every interface.
_LOOPBACK_PRELOAD = """\
const net = require("net");
const listen = net.Server.prototype.listen;
net.Server.prototype.listen = function (...args) {
  if (typeof args[0] === "number" && typeof args[1] !== "string") args.splice(1, 0, "127.0.0.1");
  return listen.apply(this, args);
};
"""


class PeerUnavailable(Exception):
    """The peer cannot be installed or started here; str(exc) is a one-line reason."""


@dataclass(frozen=True)
class PeerSpec:
    name: str  # one of PEERS
    version: str  # installed version, e.g. "1.110.2"
    argv: list[str]  # command that starts it in the foreground (no taskset prefix)
    env: dict[str, str]  # extra environment on top of os.environ
    cwd: Path
    port: int  # where it listens on 127.0.0.1
    path: str  # request path for chat completions, e.g. "/v1/chat/completions"
    headers: dict[str, str]  # headers every request must carry; no Content-Type/Host
    model: str  # the value clients put in the body's "model"
    health_path: str  # GET path that answers 200 once it is ready to serve


# --- installing ---------------------------------------------------------------------------


def _one_line(text: str, limit: int = 300) -> str:
    """The last meaningful line of a tool's output, for a PeerUnavailable message."""
    lines = [
        line.strip()
        for line in text.splitlines()
        if line.strip() and "is ignored: it is neither a file nor a directory" not in line
    ]
    npm = [
        line
        for line in lines
        if line.startswith(("npm error", "npm ERR!"))
        and not re.match(r"npm (error|ERR!) (code |errno |A complete log)", line)
    ]
    errors = [line for line in lines if line.startswith("ERROR")]
    pick = npm[0] if npm else (errors or lines or ["(no output)"])[-1]
    return pick if len(pick) <= limit else pick[: limit - 3] + "..."


def _run(
    argv: list[str],
    what: str,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> str:
    """Run ARGV to completion; its output (stdout+stderr) is returned and appended to LOG.

    Raises PeerUnavailable when the program is missing, times out or fails.
    """
    try:
        done = subprocess.run(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=INSTALL_TIMEOUT,
            check=False,
            env=env,
            cwd=cwd,
        )
    except FileNotFoundError as exc:
        raise PeerUnavailable(f"{what}: {argv[0]} not found") from exc
    except subprocess.TimeoutExpired as exc:
        raise PeerUnavailable(f"{what}: timed out after {INSTALL_TIMEOUT:.0f}s") from exc
    output: str = done.stdout.decode("utf-8", "replace")
    if log is not None:
        with log.open("a", encoding="utf-8") as out:
            out.write(f"$ {' '.join(argv)}\n{output}\n[exit {done.returncode}]\n")
    if done.returncode != 0:
        raise _Failed(what, output, done.returncode)
    return output


class _Failed(PeerUnavailable):
    def __init__(self, what: str, output: str, code: int) -> None:
        super().__init__(f"{what} failed (exit {code}): {_one_line(output)}")
        self.output = output


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_marker(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(text: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", text)
    return _canonical(match.group(1)) if match else ""


@dataclass
class _Req:
    name: str
    extras: list[str]
    specifier: str
    original: str = ""

    def __post_init__(self) -> None:
        self.original = self.original or self.text()

    def text(self) -> str:
        extras = f"[{','.join(self.extras)}]" if self.extras else ""
        return f"{self.name}{extras}{self.specifier}"


@dataclass
class _ProxyDeps:
    """The proxy extra's requirements, and what had to be changed for them to install."""

    reqs: list[_Req]
    dropped: list[str] = field(default_factory=list)
    relaxed: list[str] = field(default_factory=list)

    def find(self, name: str) -> _Req | None:
        return next((r for r in self.reqs if _canonical(r.name) == name), None)

    def give_way(self, name: str) -> bool:
        """Relax NAME's requirement to any version, or drop it if already relaxed."""
        req = self.find(name)
        if req is None:
            return False
        if req.specifier:
            req.specifier = ""
            self.relaxed.append(req.original)
        else:
            self.reqs.remove(req)
            self.relaxed = [r for r in self.relaxed if _requirement_name(r) != name]
            self.dropped.append(req.original)
        return True


def _blocking_requirement(output: str, deps: _ProxyDeps) -> str | None:
    """The name of the requirement of ours that pip could not satisfy, if it says which."""
    for match in re.finditer(r"No matching distribution found for (\S+)", output):
        name = _requirement_name(match.group(1))
        if deps.find(name) is not None:
            return name
    for match in re.finditer(r"The user requested (\S+)", output):
        name = _requirement_name(match.group(1))
        req = deps.find(name)
        if req is not None and req.specifier:
            return name
    return None


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _install_litellm(venv: Path, log: Path) -> dict[str, Any]:
    """Make VENV, install litellm and its proxy extra's installable requirements into it."""
    if venv.exists():
        shutil.rmtree(venv)
    log.write_text("", encoding="utf-8")
    env = {**os.environ, **PIP_ENV}
    env.pop("PYTHONPATH", None)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the litellm virtualenv", log)
    python = str(_venv_python(venv))
    pip = [python, "-m", "pip", "install", "--quiet"]
    _run([*pip, LITELLM_REQUIREMENT], f"pip install {LITELLM_REQUIREMENT}", log, env=env)

    out = _run([python, "-c", _PROXY_REQUIREMENTS_SCRIPT], "reading metadata", log, env=env)
    meta = json.loads(out.strip().splitlines()[-1])
    version = str(meta["version"])
    deps = _ProxyDeps([_Req(r["name"], r["extras"], r["specifier"]) for r in meta["requirements"]])
    for _ in range(2 * len(deps.reqs) + 1):  # each round relaxes or drops one requirement
        argv = [*pip, f"litellm=={version}", *(r.text() for r in deps.reqs)]
        try:
            _run(argv, "pip install of litellm's proxy requirements", log, env=env)
            break
        except _Failed as failed:
            name = _blocking_requirement(failed.output, deps)
            if name is None or not deps.give_way(name):
                raise
    else:
        raise PeerUnavailable("litellm's proxy requirements did not resolve")

    names = [_requirement_name(r) for r in deps.relaxed]
    out = _run(
        [python, "-c", _VERSIONS_SCRIPT, json.dumps(names)], "reading versions", log, env=env
    )
    got = json.loads(out.strip().splitlines()[-1])
    relaxed = [f"{r} -> {got.get(_requirement_name(r))}" for r in deps.relaxed]

    # The proxy must import (offline switches on, or it fetches its cost map from the internet).
    _run(
        [python, "-c", "import litellm.proxy.proxy_server"],
        "importing litellm.proxy.proxy_server",
        log,
        env={**env, **LITELLM_ENV},
    )
    return {
        "requirement": LITELLM_REQUIREMENT,
        "python": sys.version.split()[0],
        "version": version,
        "dropped": deps.dropped,
        "relaxed": relaxed,
    }


def litellm_install(cache: Path) -> dict[str, Any]:
    """Install LiteLLM into CACHE/litellm-venv unless its marker says it is there already.

    Returns the marker: version, and the proxy requirements dropped or relaxed.
    """
    venv = cache / "litellm-venv"
    marker = venv / MARKER
    data = _read_marker(marker)
    fresh = (
        data is not None
        and data.get("requirement") == LITELLM_REQUIREMENT
        and data.get("python") == sys.version.split()[0]
        and (venv / "bin" / "litellm").exists()
    )
    if data is not None and fresh:
        return data
    cache.mkdir(parents=True, exist_ok=True)
    data = _install_litellm(venv, cache / "litellm-install.log")
    _write_marker(marker, data)
    return data


def prepare_litellm(
    cache: Path, workdir: Path, port: int, upstream_url: str, upstream_model: str
) -> PeerSpec:
    installed = litellm_install(cache)
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    config = {
        "model_list": [
            {
                "model_name": LITELLM_MODEL,
                "litellm_params": {
                    "model": f"openai/{upstream_model}",
                    "api_base": upstream_url,
                    "api_key": "dummy",
                },
            }
        ],
        "general_settings": {"master_key": master_key},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "litellm-config.yaml"
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    venv = cache / "litellm-venv"
    argv = [str(venv / "bin" / "litellm"), "--config", str(path)]
    argv += ["--host", HOST, "--port", str(port), "--num_workers", "1"]
    return PeerSpec(
        name="litellm",
        version=str(installed["version"]),
        argv=argv,
        env=dict(LITELLM_ENV),
        cwd=workdir,
        port=port,
        path=CHAT_PATH,
        headers={"Authorization": f"Bearer {master_key}"},
        model=LITELLM_MODEL,
        health_path=LITELLM_HEALTH,
    )


def _portkey_package_json() -> str:
    pins = {"hono": HONO_VERSION, "@hono/node-server": HONO_NODE_SERVER_VERSION}
    package = {
        "name": "bench-peer-portkey",
        "private": True,
        "description": "Portkey's gateway for benchmarks/peers.py; hono pinned as in its lockfile",
        "dependencies": {PORTKEY_PACKAGE: PORTKEY_VERSION, **pins},
        "overrides": pins,
    }
    return json.dumps(package, indent=2) + "\n"


def _package_version(package_json: Path) -> str | None:
    try:
        data = json.loads(package_json.read_text("utf-8"))
    except (OSError, ValueError):
        return None
    version = data.get("version") if isinstance(data, dict) else None
    return str(version) if version else None


def _check_portkey_tree(root: Path) -> str:
    """The installed gateway's version, once the hono pins are checked to be the only copies."""
    version = _package_version(root / "node_modules" / PORTKEY_PACKAGE / "package.json")
    if version is None:
        raise PeerUnavailable(f"{PORTKEY_PACKAGE} is missing from {root}/node_modules")
    for name, want in (("hono", HONO_VERSION), ("@hono/node-server", HONO_NODE_SERVER_VERSION)):
        found = {_package_version(p) for p in root.glob(f"**/node_modules/{name}/package.json")}
        if found != {want}:
            have = ", ".join(sorted(str(v) for v in found)) or "none"
            raise PeerUnavailable(f"portkey needs {name}@{want} and no other copy; found {have}")
    return version


def _node() -> str:
    node = shutil.which("node") or "/usr/bin/node"
    try:
        out = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=30, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PeerUnavailable(f"portkey needs node {NODE_MIN_MAJOR}+: {exc}") from exc
    match = re.match(r"v(\d+)\.", out.strip())
    if not match or int(match.group(1)) < NODE_MIN_MAJOR:
        raise PeerUnavailable(f"portkey needs node {NODE_MIN_MAJOR}+, {node} is {out.strip()!r}")
    return node


def portkey_install(cache: Path) -> dict[str, Any]:
    """Install Portkey's gateway into CACHE/portkey unless its marker says it is there already."""
    root = cache / "portkey"
    marker = root / MARKER
    package_json = _portkey_package_json()
    server = root / "node_modules" / PORTKEY_PACKAGE / "build" / "start-server.js"
    data = _read_marker(marker)
    if data is not None and data.get("package_json") == package_json and server.exists():
        return data
    npm = shutil.which("npm")
    if npm is None:
        raise PeerUnavailable("portkey: npm not found on PATH")
    root.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    (root / "package.json").write_text(package_json, encoding="utf-8")
    log = cache / "portkey-install.log"
    log.write_text("", encoding="utf-8")
    argv = [npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--loglevel=error"]
    _run(argv, f"npm install {PORTKEY_PACKAGE}@{PORTKEY_VERSION}", log, cwd=root)
    if not server.exists():
        raise PeerUnavailable(f"portkey: {server} is missing after npm install")
    data = {"package_json": package_json, "version": _check_portkey_tree(root)}
    _write_marker(marker, data)
    return data


def prepare_portkey(
    cache: Path, workdir: Path, port: int, upstream_url: str, upstream_model: str
) -> PeerSpec:
    node = _node()
    installed = portkey_install(cache)
    workdir.mkdir(parents=True, exist_ok=True)
    preload = workdir / "portkey-loopback.cjs"
    preload.write_text(_LOOPBACK_PRELOAD, encoding="utf-8")
    server = cache / "portkey" / "node_modules" / PORTKEY_PACKAGE / "build" / "start-server.js"
    # Portkey refuses custom hosts outside this list (default: localhost, 127.0.0.1, ::1).
    upstream_host = (urlsplit(upstream_url).hostname or HOST).lower()
    trusted = ",".join(dict.fromkeys(["localhost", "127.0.0.1", "::1", upstream_host]))
    return PeerSpec(
        name="portkey",
        version=str(installed["version"]),
        argv=[node, "--require", str(preload), str(server), f"--port={port}", "--headless"],
        env={"TRUSTED_CUSTOM_HOSTS": trusted},
        cwd=workdir,
        port=port,
        path=CHAT_PATH,
        headers={
            "Authorization": "Bearer dummy",
            "x-portkey-provider": "openai",
            "x-portkey-custom-host": upstream_url,
        },
        model=upstream_model,
        health_path=PORTKEY_HEALTH,
    )


def rolter_install(cache: Path) -> dict[str, Any]:
    """Install rolter's binary into CACHE/rolter unless its marker says it is there already."""
    root = cache / "rolter"
    marker = root / MARKER
    binary = root / "bin" / "rolter"
    data = _read_marker(marker)
    if data is not None and data.get("requirement") == ROLTER_REQUIREMENT and binary.exists():
        return data
    cache.mkdir(parents=True, exist_ok=True)
    if root.exists():
        shutil.rmtree(root)  # pip --target does not replace what is there
    log = cache / "rolter-install.log"
    log.write_text("", encoding="utf-8")
    env = {**os.environ, **PIP_ENV}
    env.pop("PYTHONPATH", None)
    argv = [sys.executable, "-m", "pip", "install", "--quiet", "--no-compile", "--no-deps"]
    argv += ["--target", str(root), ROLTER_REQUIREMENT]
    _run(argv, f"pip install {ROLTER_REQUIREMENT}", log, env=env)
    if not binary.exists():
        raise PeerUnavailable(f"rolter: {binary} is missing after pip install")
    out = _run([str(binary), "--version"], "rolter --version", log)
    match = re.search(r"rolter\s+(\S+)", out)
    if match is None:
        raise PeerUnavailable(f"rolter --version said {_one_line(out)!r}")
    data = {"requirement": ROLTER_REQUIREMENT, "version": match.group(1)}
    _write_marker(marker, data)
    return data


def _toml_string(text: str) -> str:
    return json.dumps(text)  # a JSON string is a TOML basic string


def prepare_rolter(
    cache: Path, workdir: Path, port: int, upstream_url: str, upstream_model: str
) -> PeerSpec:
    api_base = upstream_url.rstrip("/")
    if not api_base.endswith("/v1"):
        raise PeerUnavailable(f"rolter appends /v1 itself: upstream {upstream_url} has no /v1")
    api_base = api_base.removesuffix("/v1")
    installed = rolter_install(cache)
    config = f"""\
[server]
host = {_toml_string(HOST)}
port = {port}

[[providers]]
name = "upstream"
kind = "openai_compatible"
api_base = {_toml_string(api_base)}

[[routes]]
model = {_toml_string(ROLTER_MODEL)}
strategy = "round_robin"

[[routes.targets]]
provider = "upstream"
model = {_toml_string(upstream_model)}
"""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "rolter.toml"
    path.write_text(config, encoding="utf-8")
    argv = [str(cache / "rolter" / "bin" / "rolter"), "gateway", "--config", str(path)]
    argv += ["--host", HOST, "--port", str(port)]  # over any ROLTER_HOST / ROLTER_PORT
    return PeerSpec(
        name="rolter",
        version=str(installed["version"]),
        argv=argv,
        env={},
        cwd=workdir,
        port=port,
        path=CHAT_PATH,
        headers={},
        model=ROLTER_MODEL,
        health_path=ROLTER_HEALTH,
    )


# --- the smoke check ----------------------------------------------------------------------

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO / "benchmarks" / ".cache"
MOCK_MODEL = "mock-model"
MOCK_MAX_TOKENS = 16
HEALTH_TIMEOUT = 120.0
CALL_TIMEOUT = 30.0
WARMUP_CALLS = 20


def _start(name: str, argv: list[str], env: dict[str, str], cwd: Path, workdir: Path) -> Proc:
    """Start ARGV in a session of its own (stopped with its group), output to WORKDIR/NAME.log."""
    return spawn(name, argv, 0, workdir, env, cwd, group=True)


def _log_tail(proc: Proc, lines: int = 3) -> str:
    try:
        text = proc.log.read_text("utf-8", "replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def _wait_healthy(proc: Proc, port: int, path: str) -> float:
    """Seconds until GET PATH answers 200; raises RuntimeError on exit or timeout."""
    start = time.monotonic()
    while time.monotonic() - start < HEALTH_TIMEOUT:
        if proc.popen.poll() is not None:
            raise RuntimeError(
                f"{proc.name} exited with {proc.popen.returncode}: {_log_tail(proc)}"
            )
        conn = http.client.HTTPConnection(HOST, port, timeout=2.0)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return time.monotonic() - start
        except OSError:
            pass
        finally:
            conn.close()
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not healthy within {HEALTH_TIMEOUT:.0f}s: {_log_tail(proc)}")


def _body(model: str, stream: bool) -> bytes:
    messages = [{"role": "user", "content": "Say hello to the benchmark."}]
    body = {"model": model, "messages": messages, "max_tokens": MOCK_MAX_TOKENS, "stream": stream}
    return json.dumps(body).encode()


def _call(
    conn: http.client.HTTPConnection, path: str, headers: dict[str, str], body: bytes
) -> tuple[int, bytes]:
    conn.request("POST", path, body=body, headers={**headers, "Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, response.read()


def _check_plain(status: int, raw: bytes) -> str:
    if status != 200:
        raise RuntimeError(f"non-stream: HTTP {status}: {raw[:200]!r}")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise RuntimeError(f"non-stream: not JSON: {raw[:200]!r}") from exc
    choices = data.get("choices") if isinstance(data, dict) else None
    if not isinstance(choices, list) or not choices:
        raise RuntimeError(f"non-stream: no choices: {raw[:200]!r}")
    return f"{len(choices)} choice"


def _check_stream(status: int, raw: bytes) -> str:
    if status != 200:
        raise RuntimeError(f"stream: HTTP {status}: {raw[:200]!r}")
    if not raw.rstrip().endswith(b"data: [DONE]"):
        raise RuntimeError(f"stream: does not end with data: [DONE]: {raw[-200:]!r}")
    events = sum(1 for line in raw.splitlines() if line.startswith(b"data: {"))
    return f"{events} events + [DONE]"


def _p50_ms(port: int, path: str, headers: dict[str, str], model: str, calls: int) -> float:
    """p50 of N sequential non-streamed calls on one keep-alive connection, after warm-up."""
    body = _body(model, stream=False)
    conn = http.client.HTTPConnection(HOST, port, timeout=CALL_TIMEOUT)
    times: list[float] = []
    try:
        for i in range(WARMUP_CALLS + calls):
            start = time.perf_counter_ns()
            status, raw = _call(conn, path, headers, body)
            elapsed = time.perf_counter_ns() - start
            if status != 200:
                raise RuntimeError(f"latency: HTTP {status}: {raw[:200]!r}")
            if i >= WARMUP_CALLS:
                times.append(elapsed / 1e6)
    finally:
        conn.close()
    return statistics.median(times)


def _prepare(name: str, cache: Path, workdir: Path, upstream_url: str) -> PeerSpec:
    prepare = {
        "litellm": prepare_litellm,
        "portkey": prepare_portkey,
        "rolter": prepare_rolter,
    }[name]
    start = time.monotonic()
    spec = prepare(cache, workdir, free_port(), upstream_url, MOCK_MODEL)
    note = ""
    if name == "litellm":
        marker = _read_marker(cache / "litellm-venv" / MARKER) or {}
        changed = [f"dropped {r}" for r in marker.get("dropped", [])]
        changed += [f"relaxed {r}" for r in marker.get("relaxed", [])]
        note = f" (proxy extra: {'; '.join(changed) or 'installed as pinned'})"
    print(f"{name}: prepared in {time.monotonic() - start:.2f} s{note}", flush=True)
    return spec


def _smoke_peer(
    name: str, cache: Path, workdir: Path, upstream_url: str, latency_calls: int
) -> tuple[bool, float | None]:
    """Install, start, check and stop one peer; prints its line. (ok, p50 ms or None)."""
    try:
        spec = _prepare(name, cache, workdir, upstream_url)
    except PeerUnavailable as exc:
        print(f"{name}: UNAVAILABLE: {exc}", flush=True)
        return False, None
    try:
        proc = _start(name, spec.argv, spec.env, spec.cwd, workdir)
    except OSError as exc:
        print(f"{name} {spec.version}: FAILED to start: {exc}", flush=True)
        return False, None
    try:
        ready = _wait_healthy(proc, spec.port, spec.health_path)
        conn = http.client.HTTPConnection(HOST, spec.port, timeout=CALL_TIMEOUT)
        try:
            start = time.perf_counter()
            plain = _check_plain(*_call(conn, spec.path, spec.headers, _body(spec.model, False)))
            plain_ms = (time.perf_counter() - start) * 1e3
            start = time.perf_counter()
            stream = _check_stream(*_call(conn, spec.path, spec.headers, _body(spec.model, True)))
            stream_ms = (time.perf_counter() - start) * 1e3
        finally:
            conn.close()
        p50 = None
        if latency_calls > 0:
            p50 = _p50_ms(spec.port, spec.path, spec.headers, spec.model, latency_calls)
        print(
            f"{name} {spec.version}: healthy ({spec.health_path}) after {ready:.1f} s; "
            f"non-stream ok ({plain}, {plain_ms:.1f} ms); stream ok ({stream}, {stream_ms:.1f} ms)"
            + (f"; p50 {p50:.2f} ms over {latency_calls} calls" if p50 is not None else ""),
            flush=True,
        )
        return True, p50
    except (RuntimeError, OSError, http.client.HTTPException) as exc:
        print(f"{name} {spec.version}: FAILED: {exc}", flush=True)
        return False, None
    finally:
        stop(proc)


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="bench-peers-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def smoke(cache: Path, latency_calls: int, peers: list[str]) -> int:
    """Start the mock upstream and each peer in front of it; 0 when every peer passed."""
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    python = REPO / ".venv" / "bin" / "python"
    mock_python = str(python) if python.exists() else sys.executable
    failed = 0
    with _workdir() as workdir:
        port = free_port()
        argv = [mock_python, "-m", "gateway", "mock-upstream", "--host", HOST]
        argv += ["--port", str(port), "--max-tokens", str(MOCK_MAX_TOKENS)]
        mock = _start("mock", argv, {}, REPO, workdir)
        try:
            _wait_healthy(mock, port, "/healthz")
            upstream_url = f"http://{HOST}:{port}/v1"
            print(f"mock upstream: {upstream_url} (model {MOCK_MODEL})", flush=True)
            results: dict[str, float | None] = {}
            for name in peers:
                ok, results[name] = _smoke_peer(name, cache, workdir, upstream_url, latency_calls)
                failed += not ok
            if latency_calls > 0:
                direct = _p50_ms(port, CHAT_PATH, {}, MOCK_MODEL, latency_calls)
                print(f"mock direct: p50 {direct:.2f} ms over {latency_calls} calls", flush=True)
                for name, p50 in results.items():
                    if p50 is not None:
                        print(f"{name}: adds {p50 - direct:+.2f} ms p50 over direct", flush=True)
        except RuntimeError as exc:
            print(f"mock upstream: FAILED: {exc}", flush=True)
            failed += 1
        finally:
            stop(mock)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--smoke", action="store_true", help="install, start and check every peer")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="install directory")
    parser.add_argument(
        "--latency",
        type=int,
        default=0,
        metavar="N",
        help=f"also time N sequential non-streamed calls per target after {WARMUP_CALLS} warm-up",
    )
    parser.add_argument(
        "--peer", action="append", choices=PEERS, help="only this peer (repeatable)"
    )
    args = parser.parse_args(argv)
    if not args.smoke:
        parser.print_help()
        return 2
    return smoke(args.cache.resolve(), max(args.latency, 0), args.peer or list(PEERS))


if __name__ == "__main__":
    sys.exit(main())
