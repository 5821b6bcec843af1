"""A small synchronous client of the admin API, for test set-up and assertions."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from typing import Any

__all__ = ["ADMIN_TOKEN", "Admin", "Reply"]

ADMIN_TOKEN = "admin-test-token"


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


class Admin:
    """Calls /admin/... on one gateway with the admin token."""

    def __init__(self, base_url: str, token: str | None = ADMIN_TOKEN) -> None:
        self.base_url = base_url
        self.token = token

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> Reply:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if self.token is not None:
            req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        for name, value in (headers or {}).items():
            req.add_header(name, value)
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return Reply(resp.status, dict(resp.headers), resp.read())
        except urllib.error.HTTPError as err:
            return Reply(err.code, dict(err.headers), err.read())

    def ok(self, method: str, path: str, body: Any = None, **kw: Any) -> Any:
        reply = self.call(method, path, body, **kw)
        assert reply.status in (200, 201, 204), (reply.status, reply.body)
        return reply.json() if reply.body else None

    def create_account(self, account_id: str | None = None, name: str = "") -> str:
        account_id = account_id or "acct-" + uuid.uuid4().hex[:12]
        self.ok("POST", "/admin/accounts", {"id": account_id, "name": name})
        return account_id

    def topup(self, account_id: str, amount: str, key: str | None = None) -> Any:
        headers = {"Idempotency-Key": key or uuid.uuid4().hex}
        return self.ok(
            "POST", f"/admin/accounts/{account_id}/topups", {"amount": amount}, headers=headers
        )

    def new_key(self, account_id: str, **settings: Any) -> str:
        """A new key of the account (with its budget, expiry, models, limits if given)."""
        body = settings or None
        return str(self.ok("POST", f"/admin/accounts/{account_id}/keys", body)["key"])

    def key(self, account_id: str, key: str) -> Any:
        """GET of the key (its metadata and spend), named by its secret."""
        return self.ok("GET", f"/admin/accounts/{account_id}/keys/{key.split('.')[1]}")

    def subscribe(self, account_id: str, model: str) -> None:
        self.ok("POST", f"/admin/accounts/{account_id}/subscriptions", {"model": model})

    def account(self, account_id: str) -> Any:
        return self.ok("GET", f"/admin/accounts/{account_id}")

    def usage(self, account_id: str) -> list[dict[str, Any]]:
        """Every usage record of the account, following the pages."""
        records: list[dict[str, Any]] = []
        after = ""
        while True:
            page = self.ok("GET", f"/admin/accounts/{account_id}/usage?limit=500{after}")
            records.extend(page["data"])
            if not page["next"]:
                return records
            after = f"&after={page['next']}"

    def funded(self, models: list[str], amount: str = "100.00") -> tuple[str, str]:
        """A new account with a balance, subscribed to `models`; returns (id, api key)."""
        account_id = self.create_account()
        if amount:
            self.topup(account_id, amount)
        for model in models:
            self.subscribe(account_id, model)
        return account_id, self.new_key(account_id)
