"""Real upstream servers for the interop suite, each in a process group of its own.

Started on free loopback ports, waited for within a bound, and stopped as a group (SIGTERM,
then SIGKILL), so a server's own children (uvicorn workers) go with it, on failure too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.procs import free_port

__all__ = [
    "API_MODELS",
    "CACHE_READ",
    "CACHE_WRITE",
    "LITELLM_KEY",
    "MOCK_KEY",
    "MOCK_TEXT",
    "Server",
    "Upstream",
    "start_litellm",
    "start_llama",
]

LITELLM_KEY = "sk-litellm-interop-master"
# The LiteLLM mock's whole answer (chat and text completions alike); not ASCII throughout.
MOCK_TEXT = "Hello from the LiteLLM mock, café 日本."

# LiteLLM's models that serve OpenAI's Responses API and Anthropic's Messages API from the
# project's mock upstream (true usage), one per way LiteLLM 1.106 serves them:
# - `lite-openai` (provider `openai/`): /v1/responses passed natively to the mock's
#   /v1/responses; /v1/messages translated to a Responses call (the mock's /v1/responses) and
#   its answer back to Anthropic's shape.
# - `lite-claude` (provider `anthropic/`): /v1/messages passed natively to the mock's
#   /v1/messages (and /v1/messages/count_tokens to its count_tokens); /v1/responses translated
#   to a Messages call and back.
# Chat and text completions work on both (`anthropic/` translates them to Messages too).
API_MODELS = ("lite-openai", "lite-claude")
MOCK_KEY = "sk-mock-behind-litellm"
# Every call LiteLLM makes to the mock for them asks (LiteLLM's `extra_headers`) for usage
# with cache classes: of the prompt's tokens, CACHE_READ read from a cache and CACHE_WRITE
# written to one (the Messages API's `cache_read_input_tokens` / `cache_creation_input_tokens`,
# its `input_tokens` the rest; the Responses API's `input_tokens_details.cached_tokens` /
# `cache_write_tokens` of the whole `input_tokens`), so the tests see each class billed.
CACHE_READ = 2
CACHE_WRITE = 1


@dataclass(frozen=True)
class Upstream:
    """One upstream as the tests see it: how to call it directly, and the gateway model that
    routes to it (the same name, so a direct body and a gateway body are the same bytes)."""

    name: str  # litellm | llama
    base: str  # .../v1
    key: str
    model: str  # the model's name, upstream and in the gateway alike
    prices: tuple[str, str]  # the gateway's input, output price per million tokens
    # A chat call the upstream refuses with a 4xx: (the body sent directly, the body sent
    # to the gateway), and whether it refuses the streamed call so too (llama-cpp-python
    # answers a stream it cannot serve with a 200 and an empty body).
    refused: tuple[dict[str, Any], dict[str, Any]]
    refuses_streams: bool
    # Whether its streams honour stream_options.include_usage (llama-cpp-python's ignore it:
    # a stream from it carries no usage, asked or not, and the gateway bills its own count).
    stream_usage: bool


@dataclass
class Server:
    name: str
    popen: subprocess.Popen[bytes]
    url: str  # http://127.0.0.1:PORT (no /v1)
    log_path: Path
    extra: dict[str, str] = field(default_factory=dict)

    def log(self, last: int = 60) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-last:])

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL to whatever of it is left 15 s later (or at
        once, once the leader has gone: a worker it left behind)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait(timeout=10)


def _wait(server: Server, path: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.popen.poll() is not None:
            server.stop()
            raise RuntimeError(
                f"{server.name} exited with {server.popen.returncode} before it answered\n"
                f"--- {server.log_path} ---\n{server.log()}"
            )
        try:
            with urllib.request.urlopen(server.url + path, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.25)
    server.stop()
    raise TimeoutError(
        f"{server.name} did not answer {path} within {timeout:.0f}s\n"
        f"--- {server.log_path} ---\n{server.log()}"
    )


def _spawn(name: str, args: list[str], tmp: Path, env: dict[str, str], port: int) -> Server:
    log_path = tmp / f"{name}-{port}.log"
    with open(log_path, "ab") as log:
        popen = subprocess.Popen(
            args,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            cwd=tmp,
            start_new_session=True,  # its own process group, stopped whole
        )
    return Server(name, popen, f"http://127.0.0.1:{port}", log_path)


def start_litellm(venv: Path, tmp: Path, mock_url: str, timeout: float = 300.0) -> Server:
    """LiteLLM's proxy with a `mock_response` model (no provider is called), `mock-chat`, for
    chat and text completions, and the API_MODELS, whose provider is the project's mock
    upstream at `mock_url` (http://host:port, key MOCK_KEY). Its master key is LITELLM_KEY."""
    cache_usage = {
        "x-mock-usage-cached-tokens": str(CACHE_READ),
        "x-mock-usage-cache-write-tokens": str(CACHE_WRITE),
    }
    config = {
        "model_list": [
            {
                "model_name": "mock-chat",
                "litellm_params": {
                    "model": "openai/mock-chat",
                    "api_key": "unused-by-the-mock",
                    "mock_response": MOCK_TEXT,
                },
            },
            {
                "model_name": "lite-openai",
                "litellm_params": {
                    "model": "openai/mock-model",
                    "api_base": f"{mock_url}/v1",
                    "api_key": MOCK_KEY,
                    "extra_headers": cache_usage,
                },
            },
            {
                "model_name": "lite-claude",
                "litellm_params": {
                    "model": "anthropic/mock-model",
                    "api_base": mock_url,  # the Anthropic client adds /v1/messages
                    "api_key": MOCK_KEY,
                    "extra_headers": cache_usage,
                },
            },
        ],
        "general_settings": {"master_key": LITELLM_KEY},
        "litellm_settings": {"telemetry": False},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    port = free_port()
    env = {
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # the bundled price map, not a download
        "LITELLM_TELEMETRY": "False",
        "NO_PROXY": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
    }
    args = [
        str(venv / "bin/python"),
        "-m",
        "litellm.proxy.proxy_cli",
        "--config",
        str(path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    server = _spawn("litellm", args, tmp, env, port)
    _wait(server, "/health/liveliness", timeout)
    return server


def start_llama(venv: Path, model: Path, tmp: Path, timeout: float = 180.0) -> Server:
    """llama-cpp-python's OpenAI-compatible server on the tiny model, as `tiny`, no key."""
    port = free_port()
    args = [
        str(venv / "bin/python"),
        "-m",
        "llama_cpp.server",
        "--model",
        str(model),
        "--model_alias",
        "tiny",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "512",
        "--n_threads",
        "1",
    ]
    server = _spawn("llama", args, tmp, {"PYTHONUNBUFFERED": "1"}, port)
    _wait(server, "/v1/models", timeout)
    return server
