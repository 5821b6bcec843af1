"""In-process, with structlog's capture_logs: no log entry carries a key's secret or a prompt."""

from __future__ import annotations

import os
from typing import Any

import orjson
import pytest
import structlog
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import create_app
from gateway.config import parse_settings
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import ADMIN_TOKEN
from tests.conftest import UPSTREAM_KEY, model_entry
from tests.procs import Proc

PROMPT = "the-secret-plans-for-next-quarter"


@pytest.fixture
async def client(valkey: EmbeddedStore, mock_a: Proc, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("UPSTREAM_KEY", UPSTREAM_KEY)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    settings = parse_settings(
        {
            "store": {"url": valkey.url},
            "models": [model_entry("m", mock_a.url, upstream_model="mock-model")],
        }
    )
    app = create_app(settings, valkey.url)
    async with TestClient(TestServer(app)) as test_client:
        yield test_client


async def test_no_secret_or_prompt_in_any_log_entry(client: TestClient) -> None:  # type: ignore[type-arg]
    """Create a key, call with it (ok, streamed, refused, failing upstream), revoke it and call
    again: every captured log entry is free of the key, its secret and the prompt."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    account_id = "logs-" + os.urandom(4).hex()
    with structlog.testing.capture_logs() as entries:
        assert (
            await client.post("/admin/accounts", json={"id": account_id}, headers=admin)
        ).status == 201
        await client.post(
            f"/admin/accounts/{account_id}/topups", json={"amount": "1.00"}, headers=admin
        )
        await client.post(
            f"/admin/accounts/{account_id}/subscriptions", json={"model": "m"}, headers=admin
        )
        created = await (
            await client.post(f"/admin/accounts/{account_id}/keys", headers=admin)
        ).json()
        key = created["key"]
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3}
        for extra, headers in [
            ({}, {}),
            ({"stream": True}, {}),
            ({"max_tokens": 10**9}, {}),
            ({}, {"x-mock-status": "500"}),
        ]:
            resp = await client.post(
                "/v1/chat/completions",
                data=orjson.dumps({**body, **extra}),
                headers={**auth, **headers},
            )
            await resp.read()
        await client.delete(f"/admin/accounts/{account_id}/keys/{created['id']}", headers=admin)
        resp = await client.post("/v1/chat/completions", data=orjson.dumps(body), headers=auth)
        assert resp.status == 401
    assert entries, "the gateway logged nothing: the check would prove nothing"
    calls = [e for e in entries if e.get("event") == "call"]
    assert len(calls) == 5
    text = repr(entries)
    assert key not in text
    assert key.split(".", 2)[2] not in text
    assert PROMPT not in text
    assert ADMIN_TOKEN not in text
