"""`history.url: embedded`, the default: `serve` starts a private PostgreSQL from pgserver's
binaries in `<store.data_dir>/history`, exports to it, and stops it with the gateway; without
the binaries it is a clear error, never a gateway that silently keeps no history."""

from __future__ import annotations

import asyncio
import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from gateway.history import embedded
from gateway.history.embedded import URL_FILE, EmbeddedPostgresError, postgres_binaries
from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.history.test_export import _calls, _exactly_once, _wait_rows
from tests.procs import Proc

pytestmark = pytest.mark.timeout(120)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_serve_starts_exports_to_and_stops_its_own_database(
    make_gateway: Callable[..., Proc], mock_a: Proc, tmp_path: Path
) -> None:
    data_dir = tmp_path / "store"
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        store={"url": "embedded", "data_dir": str(data_dir)},
        history={"export_interval": "100ms"},  # url: embedded by default
    )
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"], amount="5.00")
    answered = await _calls(gw, key, 6)
    url = (data_dir / "history" / URL_FILE).read_text().strip()
    conn = await asyncpg.connect(url)
    try:
        rows = await _wait_rows(conn, account_id, 6)
        applied = await conn.fetchval("SELECT max(version) FROM schema_migrations")
    finally:
        await conn.close()
    _exactly_once(rows, answered)
    assert applied >= 1
    pid = int((data_dir / "history" / "pgdata" / "postmaster.pid").read_text().split()[0])
    assert _alive(pid)
    gw.stop()
    deadline = time.monotonic() + 30
    while _alive(pid):
        assert time.monotonic() < deadline, "the database outlived its gateway"
        await asyncio.sleep(0.1)


def test_without_the_binaries_it_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        embedded.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pgserver" else real(name, *a),
    )
    with pytest.raises(EmbeddedPostgresError, match="pip install pgserver"):
        postgres_binaries()
