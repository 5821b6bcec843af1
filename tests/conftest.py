"""Session-wide real servers: one embedded Valkey, two mock upstreams, one gateway."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway.store.embedded import EmbeddedStore
from tests.admin_client import ADMIN_TOKEN, Admin
from tests.procs import Proc, free_port, start_gateway, start_mock

UPSTREAM_KEY = "sk-upstream-test-secret"


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def valkey(session_tmp: Path) -> Iterator[EmbeddedStore]:
    """The real embedded Valkey every gateway of the session shares."""
    store = EmbeddedStore(session_tmp / "valkey", appendfsync="everysec")
    store.start()
    yield store
    store.stop()


@pytest.fixture
def own_store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    """A store of the test's own (durable, as in production), on a fixed port so it can come
    back at the same address after a restart."""
    store = EmbeddedStore(tmp_path / "store", port=free_port(), appendfsync="always")
    store.start()
    yield store
    store.stop()


@pytest.fixture
def redis_client(valkey: EmbeddedStore) -> Iterator[redis.Redis]:
    """A sync client on the shared store. Not flushed: session fixtures keep accounts there,
    and every test works on accounts of its own (random ids) instead."""
    client = redis.Redis.from_url(valkey.url)
    yield client
    client.close()


@pytest.fixture(scope="session")
def mock_a(session_tmp: Path) -> Iterator[Proc]:
    proc = start_mock(session_tmp, "--api-key-env", "MOCK_KEY", env={"MOCK_KEY": UPSTREAM_KEY})
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def mock_b(session_tmp: Path) -> Iterator[Proc]:
    proc = start_mock(session_tmp, "--api-key-env", "MOCK_KEY", env={"MOCK_KEY": UPSTREAM_KEY})
    yield proc
    proc.stop()


def model_entry(
    name: str, *upstream_urls: str, upstream_model: str | None = None
) -> dict[str, Any]:
    """A config `models` entry routed to the given mock upstreams."""
    return {
        "name": name,
        "tokenizer": "o200k_base",
        "pricing": {"input_per_million": "0.15", "output_per_million": "0.60"},
        "upstreams": [
            {"url": f"{url}/v1", "model": upstream_model or name, "api_key_env": "UPSTREAM_KEY"}
            for url in upstream_urls
        ],
    }


def gateway_config(
    valkey: EmbeddedStore, models: list[dict[str, Any]], **sections: Any
) -> dict[str, Any]:
    return {"store": {"url": valkey.url}, "models": models, **sections}


GATEWAY_ENV = {"UPSTREAM_KEY": UPSTREAM_KEY, "GATEWAY_ADMIN_TOKEN": ADMIN_TOKEN}


@pytest.fixture(scope="session")
def gateway(session_tmp: Path, valkey: EmbeddedStore, mock_a: Proc) -> Iterator[Proc]:
    """The shared gateway: `demo` (same name upstream) and `mapped` (renamed upstream)."""
    config = gateway_config(
        valkey,
        [
            model_entry("mock-model", mock_a.url),
            model_entry("mapped", mock_a.url, upstream_model="mock-model"),
        ],
    )
    proc = start_gateway(session_tmp, config, env=GATEWAY_ENV)
    yield proc
    proc.stop()


@pytest.fixture
def make_gateway(tmp_path: Path, valkey: EmbeddedStore) -> Iterator[Callable[..., Proc]]:
    """Start a gateway with its own config for one test; stopped after it."""
    started: list[Proc] = []

    def make(
        models: list[dict[str, Any]],
        wait: bool = True,
        env: dict[str, str] | None = None,
        **sections: Any,
    ) -> Proc:
        proc = start_gateway(
            tmp_path,
            gateway_config(valkey, models, **sections),
            {**GATEWAY_ENV, **(env or {})},
            wait,
        )
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


@pytest.fixture(scope="session")
def admin(gateway: Proc) -> Admin:
    """The admin API of the shared gateway."""
    return Admin(gateway.url)


@pytest.fixture(scope="session")
def api_key(admin: Admin) -> str:
    """A key of a well-funded account subscribed to the shared gateway's models."""
    _, key = admin.funded(["mock-model", "mapped"], amount="1000000.00")
    return key


@pytest.fixture(scope="session")
def auth(api_key: str) -> dict[str, str]:
    """Headers that authenticate a data-plane call on the shared gateway."""
    return {"Authorization": f"Bearer {api_key}"}
