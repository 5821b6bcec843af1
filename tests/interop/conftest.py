"""The interop suite: real LiteLLM and llama-cpp-python servers behind a real gateway.

Opt-in: `INTEROP=1 .venv/bin/python -m pytest tests/interop` (as .ci/run runs it, after the
main suite). Without INTEROP=1 every test here is skipped with that command as the reason, so
the whole-suite command neither installs nor starts anything for it. The environments are
built once into `$INTEROP_CACHE` (default ~/.cache/inference-gateway-interop/; see envs.py)
before the first test runs, outside any test's timeout, and reused by later runs: a cold
build (LiteLLM's proxy installed, llama.cpp compiled) took 7.5-9.5 min on this 2-core
machine, a warm run of the 109 tests about 1 min.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import ADMIN_TOKEN, Admin
from tests.conftest import gateway_config
from tests.interop import envs
from tests.interop.servers import (
    API_MODELS,
    LITELLM_KEY,
    MOCK_KEY,
    Server,
    Upstream,
    start_litellm,
    start_llama,
)
from tests.procs import Proc, start_gateway, start_mock

HERE = Path(__file__).resolve().parent
ENABLED = os.environ.get("INTEROP") == "1"
OPT_IN = "interop suite is opt-in: INTEROP=1 .venv/bin/python -m pytest tests/interop"

_built: dict[str, Any] = {}  # what pytest_collection_modifyitems prepared, or its error


def _prepare() -> dict[str, Any]:
    """Build (or find in the cache) every environment, side by side: LiteLLM's install is
    mostly download and unpacking, llama.cpp's mostly compiling."""
    jobs = {
        "litellm": envs.litellm_env,
        "llama": envs.llama_env,
        "node": envs.node_env,
    }
    found: dict[str, Any] = {}
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        for name, future in futures.items():
            try:
                found[name] = future.result()
            except Exception as exc:  # reported by the fixtures that need it
                found[name] = exc
    if not isinstance(found["llama"], Exception):
        try:
            found["model"] = envs.tiny_model()
        except Exception as exc:
            found["model"] = exc
    return found


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: build only for tests that run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in Path(str(item.path)).parents]
    if not mine:
        return
    if not ENABLED:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=OPT_IN))
        return
    if _built:
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    started = time.monotonic()
    if reporter is not None:
        reporter.write_line(f"interop: preparing environments in {envs.cache_dir()} ...")
    _built.update(_prepare())
    if reporter is not None:
        for name, value in _built.items():
            if isinstance(value, envs.Built):
                how = f"built in {value.seconds:.0f}s" if value.seconds else "cached"
                reporter.write_line(f"interop: {name}: {how} ({value.path})")
            elif isinstance(value, Path):
                reporter.write_line(f"interop: {name}: {value}")
            elif value is None:
                reporter.write_line(f"interop: {name}: not installed (its tests are skipped)")
            else:
                reporter.write_line(f"interop: {name}: {value!r}"[:400])
        reporter.write_line(f"interop: ready after {time.monotonic() - started:.0f}s")


def _need(name: str) -> Any:
    value = _built.get(name)
    if isinstance(value, Exception):
        pytest.fail(f"interop environment {name!r} could not be built: {value}", pytrace=False)
    if value is None and name != "node":
        pytest.fail(f"interop environment {name!r} was not prepared", pytrace=False)
    return value


# ---------------------------------------------------------------------------------------------
# Upstreams


@pytest.fixture(scope="session")
def interop_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


@pytest.fixture(scope="session")
def litellm_mock(interop_tmp: Path) -> Iterator[Proc]:
    """The project's mock upstream, LiteLLM's provider for its API_MODELS (key MOCK_KEY)."""
    proc = start_mock(interop_tmp, "--api-key-env", "MOCK_KEY", env={"MOCK_KEY": MOCK_KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def litellm_server(interop_tmp: Path, litellm_mock: Proc) -> Iterator[Server]:
    built = _need("litellm")
    server = start_litellm(built.path / "venv", interop_tmp, litellm_mock.url)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_server(interop_tmp: Path) -> Iterator[Server]:
    built = _need("llama")
    model = _need("model")
    server = start_llama(built.path / "venv", model, interop_tmp)
    yield server
    server.stop()


LITELLM_PRICES = ("0.15", "0.60")
LLAMA_PRICES = ("2.5", "10")
# Every API the gateway routes to LiteLLM's API_MODELS (and to `lite-refused`).
LITELLM_APIS = ["chat", "completions", "responses", "messages"]


@pytest.fixture(scope="session")
def interop_gateway(
    interop_tmp: Path, valkey: EmbeddedStore, litellm_server: Server, llama_server: Server
) -> Iterator[Proc]:
    """A gateway in front of both: `mock-chat` (LiteLLM, its master key via api_key_env),
    `tiny` (llama.cpp, no key), `lite-openai` and `lite-claude` (LiteLLM's API_MODELS, which
    serve the Responses and Messages APIs too), and `lite-refused`, routed to a model LiteLLM
    does not know (on every API)."""

    def entry(name: str, url: str, prices: tuple[str, str], **upstream: Any) -> dict[str, Any]:
        return {
            "name": name,
            "tokenizer": "o200k_base",
            "pricing": {"input_per_million": prices[0], "output_per_million": prices[1]},
            "upstreams": [{"url": f"{url}/v1", "model": name, **upstream}],
        }

    lite = {"api_key_env": "LITELLM_MASTER_KEY"}
    apis = {**lite, "apis": LITELLM_APIS}
    models = [
        entry("mock-chat", litellm_server.url, LITELLM_PRICES, **lite),
        entry("tiny", llama_server.url, LLAMA_PRICES),
        *(entry(name, litellm_server.url, LITELLM_PRICES, **apis) for name in API_MODELS),
        entry("lite-refused", litellm_server.url, LITELLM_PRICES, **apis, model="no-such-model"),
    ]
    env = {"LITELLM_MASTER_KEY": LITELLM_KEY, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}
    proc = start_gateway(interop_tmp, gateway_config(valkey, models), env=env)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def interop_admin(interop_gateway: Proc) -> Admin:
    return Admin(interop_gateway.url)


def _chat(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.fixture(scope="session")
def upstreams(litellm_server: Server, llama_server: Server) -> dict[str, Upstream]:
    # LiteLLM refuses a model it does not know (400); llama.cpp a prompt longer than its
    # context (512 tokens; 'x ' is 2 tokens of the tiny model's vocabulary and 1 of o200k's)
    # with a 400 `context_length_exceeded`. Neither is anything the gateway checks.
    too_long = {
        **_chat("tiny", max_tokens=8),
        "messages": [{"role": "user", "content": "x " * 400}],
    }
    return {
        "litellm": Upstream(
            "litellm", litellm_server.url + "/v1", LITELLM_KEY, "mock-chat", LITELLM_PRICES,
            (_chat("no-such-model", max_tokens=8), _chat("lite-refused", max_tokens=8)),
            refuses_streams=True,
            stream_usage=True,
        ),
        "llama": Upstream(
            "llama", llama_server.url + "/v1", "no-key-needed", "tiny", LLAMA_PRICES,
            (too_long, too_long),
            refuses_streams=False,
            stream_usage=False,
        ),
    }  # fmt: skip


@pytest.fixture(scope="session")
def node() -> tuple[str, Path] | None:
    """(node, folder with node_modules/openai), or None where node or npm is missing."""
    built = _need("node")
    tools = envs.node_tools()
    if built is None or tools is None:
        return None
    return tools[0], built.path
