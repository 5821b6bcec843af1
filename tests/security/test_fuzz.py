"""Malformed input to every route: never a 500, never a change to any balance."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.admin_client import Admin
from tests.procs import Proc

# JSON values without a usable `model` or `amount`: whatever they are, they must be refused.
_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
_json = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.text(max_size=8).filter(lambda k: k not in ("model", "amount")), inner, max_size=4
        )
    ),
    max_leaves=20,
)
_bad_model = st.one_of(st.none(), st.integers(), st.lists(st.text(), max_size=2), st.just(""))
_objects = st.fixed_dictionaries({"model": _bad_model, "amount": _bad_model}, optional={"x": _json})
_bodies = st.one_of(
    st.binary(max_size=200),
    _json.map(lambda v: json.dumps(v).encode()),
    _objects.map(lambda v: json.dumps(v).encode()),
    st.integers(min_value=1, max_value=3000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(min_value=1, max_value=3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
)


@pytest.fixture(scope="module")
def fuzz_target(gateway: Proc) -> dict[str, Any]:
    admin = Admin(gateway.url)
    account_id, key = admin.funded(["mock-model"], amount="3.00")
    sentinel, _ = admin.funded(["mock-model"], amount="7.00")
    return {"admin": admin, "account": account_id, "key": key, "sentinel": sentinel}


ROUTES = [
    ("POST", "/v1/chat/completions", True),
    ("POST", "/v1/completions", True),
    ("POST", "/v1/embeddings", True),
    ("POST", "/admin/accounts", False),
    ("POST", "/admin/accounts/{account}/topups", False),
    ("POST", "/admin/accounts/{account}/subscriptions", False),
    ("PUT", "/admin/accounts/{account}/notifications", False),
    ("PUT", "/admin/accounts/{account}/rate_limits", False),
]


@pytest.mark.parametrize(("method", "path", "data_plane"), ROUTES)
def test_malformed_bodies_never_500_and_move_no_money(
    fuzz_target: dict[str, Any], method: str, path: str, data_plane: bool
) -> None:
    """Random bytes, random JSON, and objects whose `model`/`amount` are unusable, sent to
    every route that takes a body: each answer is a 4xx in the error shape (never a 500), and
    no balance moves."""
    admin: Admin = fuzz_target["admin"]
    url_path = path.format(account=fuzz_target["account"])
    before = {
        a: admin.account(a)["balance"] for a in (fuzz_target["account"], fuzz_target["sentinel"])
    }

    @settings(
        max_examples=60,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(body=_bodies)
    def check(body: bytes) -> None:
        headers = {"Authorization": f"Bearer {fuzz_target['key']}"} if data_plane else None
        client = Admin(admin.base_url, token=None) if data_plane else admin
        reply = client.call(method, url_path, raw=body, headers=headers)
        assert reply.status < 500, (reply.status, reply.body)
        if reply.status >= 400:
            error = json.loads(reply.body)["error"]
            assert set(error) == {"message", "type", "param", "code"}

    check()
    after = {a: admin.account(a)["balance"] for a in before}
    assert after == before
