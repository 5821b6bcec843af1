"""`inference-gateway audit` with history on also checks the database's journal against the
ledger, account by account: after real traffic it passes; a record missing from the database's
totals makes it fail, naming the account and the difference."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable

import asyncpg
import pytest
import redis

from gateway.history.embedded import EmbeddedPostgres
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import wait_no_holds
from tests.conftest import GATEWAY_ENV, model_entry
from tests.history.conftest import history_section
from tests.history.test_export import _calls, _wait_rows
from tests.procs import Proc

pytestmark = pytest.mark.timeout(120)


def _audit(gw: Proc) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "gateway", "audit", "--config", str(gw.config_path)]
    env = {**os.environ, **GATEWAY_ENV}
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120, env=env)


async def test_the_audit_checks_the_database_against_the_ledger(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    own_store: EmbeddedStore,
    pg: EmbeddedPostgres,
    db: asyncpg.Connection,
) -> None:
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        store={"url": own_store.url},
        history=history_section(pg, keep_in_store="1s"),
    )
    admin = Admin(gw.url)
    good, good_key = admin.funded(["m"], amount="5.00")
    bad, bad_key = admin.funded(["m"], amount="5.00")
    await _calls(gw, good_key, 6)
    await _calls(gw, bad_key, 4)
    client = redis.Redis.from_url(own_store.url)
    try:
        wait_no_holds(client, good)
        wait_no_holds(client, bad)
    finally:
        client.close()
    await _wait_rows(db, good, 6)
    await _wait_rows(db, bad, 4)
    passed = _audit(gw)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert "history: checked 2 accounts" in passed.stderr
    # One record's cost lost from the database's totals (as a record lost before export).
    await db.execute(
        "UPDATE usage_monthly SET cost = cost - 7, calls = calls - 1 WHERE account_id = $1", bad
    )
    failed = _audit(gw)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    lines = [line for line in failed.stdout.splitlines() if line.startswith("FAIL")]
    assert len(lines) == 1, failed.stdout
    assert lines[0].startswith(f"FAIL {bad}: history's usage")
    assert "!= ledger's spent" in lines[0]
