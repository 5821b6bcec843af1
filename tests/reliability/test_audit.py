"""`inference-gateway audit`: passes on a consistent store, names the accounts that are not."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
import redis
import yaml

from gateway.ledger.keys import account_keys
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import Admin
from tests.billing.checks import wait_no_holds
from tests.conftest import model_entry
from tests.procs import Proc, free_port


def _audit(config: Path, store_url: str | None = None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "gateway", "audit", "--config", str(config)]
    if store_url:
        args += ["--store-url", store_url]
    return subprocess.run(args, capture_output=True, text=True, check=False, timeout=120)


async def test_audit_passes_then_catches_a_tampered_balance(
    tmp_path: Path, make_gateway: Callable[..., Proc], mock_a: Proc, valkey: EmbeddedStore
) -> None:
    """After real traffic the audit exits 0 and reports per-model drift, with the token
    classes the upstream reported; a balance changed behind the ledger's back makes it exit 1
    naming that account."""
    isolated = EmbeddedStore(tmp_path / "store")
    isolated.start()
    try:
        gw = make_gateway(
            [model_entry("m", mock_a.url, upstream_model="mock-model")],
            store={"url": isolated.url},
        )
        admin = Admin(gw.url)
        good, key = admin.funded(["m"], amount="5.00")
        bad, _ = admin.funded(["m"], amount="5.00")
        body = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 7}
        classes = {
            "x-mock-usage-cached-tokens": "2",
            "x-mock-usage-cache-write-tokens": "1",
            "x-mock-usage-reasoning-tokens": "3",
        }
        headers = {"Authorization": f"Bearer {key}", **classes}
        async with aiohttp.ClientSession(headers=headers) as session:
            for _ in range(3):
                async with session.post(
                    gw.url + "/v1/chat/completions", data=orjson.dumps(body)
                ) as r:
                    assert r.status == 200
        client = redis.Redis.from_url(isolated.url)
        wait_no_holds(client, good)
        config = tmp_path / "audit.yaml"
        config.write_text(yaml.safe_dump({"store": {"url": isolated.url}}))
        result = _audit(config)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "audited 2 accounts: 0 failing" in result.stdout
        assert "| cached | cache write | reasoning" in result.stdout
        (line,) = [row for row in result.stdout.splitlines() if row.startswith("m | ")]
        assert line.endswith("| 6 | 3 | 9"), line  # three calls' classes, summed
        client.hincrby(account_keys(bad).account, "balance", 1)
        result = _audit(config)
        assert result.returncode == 1
        assert f"FAIL {bad}: balance" in result.stdout
        assert good not in result.stdout.split("token drift")[0].replace("FAIL", "")
        client.close()
    finally:
        isolated.stop()


def test_audit_opens_an_embedded_store_when_no_gateway_runs(tmp_path: Path) -> None:
    """With `store.url: embedded` and no gateway running, audit starts the store on the data
    directory itself, audits it, and stops it."""
    data = tmp_path / "data"
    store = EmbeddedStore(data)
    client = redis.Redis.from_url(store.start())
    key = account_keys("solo").account
    client.hset(key, mapping={"id": "solo", "balance": 3, "held": 0, "topped_up": 0, "spent": 0})
    client.close()
    store.stop()
    config = tmp_path / "embedded.yaml"
    config.write_text(yaml.safe_dump({"store": {"url": "embedded", "data_dir": str(data)}}))
    result = _audit(config)
    assert result.returncode == 1
    assert "FAIL solo: balance 0.000003 != top-ups 0.000000" in result.stdout
    assert not (data / "store.url").exists()


@pytest.mark.parametrize(
    "store_url",
    [
        "redis://127.0.0.1:{closed}/0",  # nothing listens
        "redis://:wrong-password@127.0.0.1:{valkey}/0",  # a store that refuses us
        "redis://127.0.0.1:{valkey}/0",  # the password left out
        "redis://127.0.0.1:not-a-port/0",  # a URL redis-py cannot read
        "redis+cluster://127.0.0.1:{closed}",  # no cluster node answers
        "unix:///nonexistent/valkey.sock",
    ],
    ids=["closed-port", "wrong-password", "no-password", "bad-url", "cluster", "no-socket"],
)
def test_audit_that_cannot_reach_its_store_says_so_in_one_line_and_exits_2(
    tmp_path: Path, valkey: EmbeddedStore, store_url: str
) -> None:
    """Exit 2 is "could not audit", distinct from 1, "accounts failing"; one line on stderr
    naming the store without its password, no traceback."""
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"models": []}))
    url = store_url.format(closed=free_port(), valkey=valkey.port)
    result = _audit(config, url)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("audit: cannot audit the store at "), lines
    assert "Traceback" not in result.stderr
    assert "wrong-password" not in result.stderr
    assert valkey.password not in result.stderr
    assert result.stdout == ""
