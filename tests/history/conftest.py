"""A real PostgreSQL for the history tests, started the way the product starts its embedded
one (gateway/history/embedded.py: pgserver's binaries, initdb, a private data directory)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from gateway.history.embedded import EmbeddedPostgres
from tests.conftest import model_entry
from tests.procs import Proc, free_port


@pytest.fixture(scope="session")
def pg(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedPostgres]:
    server = EmbeddedPostgres(tmp_path_factory.mktemp("history") / "pg", port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def db(pg: EmbeddedPostgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(pg.url)
    yield conn
    await conn.close()


def history_section(pg: EmbeddedPostgres, **extra: Any) -> dict[str, Any]:
    return {"url": pg.url, "export_interval": "100ms", "keep_in_store": "1h", **extra}


@pytest.fixture
def history_gateway(
    make_gateway: Callable[..., Proc], mock_a: Proc, pg: EmbeddedPostgres
) -> Callable[..., Proc]:
    """A gateway exporting to `pg` (model `m` on mock_a), history settings overridable."""

    def make(**history: Any) -> Proc:
        return make_gateway(
            [model_entry("m", mock_a.url, upstream_model="mock-model")],
            history=history_section(pg, **history),
        )

    return make


__all__ = ["Path", "history_section"]
