"""The admin API of SPEC section 6, through HTTP, against a real gateway and a real store."""

from __future__ import annotations

import csv
import io
import re
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import redis
from multidict import CIMultiDict

from gateway.accounts.apikeys import hash_key
from gateway.admin.routes import routes as admin_routes
from gateway.money import format_micros
from gateway.store.embedded import EmbeddedStore
from tests.admin_client import ADMIN_TOKEN, Admin, Reply
from tests.billing.checks import gateway_cost as call_cost
from tests.conftest import model_entry
from tests.procs import Proc

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
# model_entry's prices (0.15 and 0.60 per million tokens) in micro-units per million tokens.
INPUT_MICROS, OUTPUT_MICROS = 150_000, 600_000
SPEC_ACCOUNT_FIELDS = {
    "id",
    "name",
    "balance",
    "held",
    "available",
    "state",
    "period",
    "arrears_since",
    "grace_ends_at",
    "retention_ends_at",
    "subscriptions",
}
SPEC_USAGE_FIELDS = (
    "request_id",
    "time",
    "kind",
    "model",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "usage_source",
    "status",
    "stream",
)
DECIMAL = re.compile(r"^-?\d+\.\d{6}$")
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
# Paths under /admin that no route serves, and a method no route takes.
UNROUTED = [
    ("GET", "/admin"),
    ("GET", "/admin/"),
    ("GET", "/admin/nothing"),
    ("POST", "/admin/accounts/{account_id}/nothing"),
    ("PUT", "/admin/accounts"),
]


def _error(reply: Reply, status: int, code: str) -> dict[str, Any]:
    """The OpenAI-shaped error of `reply`, checked for its status and code."""
    assert reply.status == status, (reply.status, reply.body)
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


def _route_list() -> list[tuple[str, str]]:
    """(method, path template) of every route in gateway/admin/routes.py, mounted at /admin."""
    return [(route.method, "/admin" + route.path) for route in admin_routes]


def _fill(path: str, account_id: str, key_id: str, model: str) -> str:
    path = path.replace("{account_id}", account_id).replace("{key_id}", key_id)
    return re.sub(r"\{model(:[^}]*)?\}", model, path)


def _valid_body(method: str, template: str, new_id: str) -> Any:
    """A body the route would accept, so only the token check can refuse it."""
    if method != "POST":
        return {} if method in ("PUT", "PATCH") else None
    if template == "/admin/accounts":
        return {"id": new_id}
    if template.endswith("/topups"):
        return {"amount": "1.00"}
    if template.endswith("/subscriptions"):
        return {"model": "mapped"}
    return {}


def _snapshot(admin: Admin, account_id: str) -> tuple[Any, Any, list[dict[str, Any]]]:
    return (
        admin.account(account_id),
        admin.ok("GET", f"/admin/accounts/{account_id}/keys"),
        admin.usage(account_id),
    )


async def _call(
    url: str,
    body: Any = None,
    key: str | None = None,
    method: str = "POST",
) -> tuple[int, CIMultiDict[str], bytes]:
    """One data-plane call: status, headers, body."""
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    data = orjson.dumps(body) if body is not None else None
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=data, headers=headers) as resp,
    ):
        return resp.status, CIMultiDict(resp.headers), await resp.read()


def _data_error(status: int, body: bytes, want_status: int, want_code: str) -> None:
    assert status == want_status, body
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == want_code


# -- the token ------------------------------------------------------------------------------


def test_route_list_covers_the_spec_routes() -> None:
    """The walked list holds at least every admin route SPEC section 6 names, and the account
    listing."""
    walked = set(_route_list())
    for route in [
        ("POST", "/admin/accounts"),
        ("GET", "/admin/accounts"),
        ("GET", "/admin/accounts/{account_id}"),
        ("POST", "/admin/accounts/{account_id}/topups"),
        ("POST", "/admin/accounts/{account_id}/keys"),
        ("GET", "/admin/accounts/{account_id}/keys"),
        ("DELETE", "/admin/accounts/{account_id}/keys/{key_id}"),
        ("POST", "/admin/accounts/{account_id}/subscriptions"),
        ("DELETE", "/admin/accounts/{account_id}/subscriptions/{model:.+}"),
        ("GET", "/admin/accounts/{account_id}/usage"),
    ]:
        assert route in walked


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Bearer wrong-token",
        f"Bearer {ADMIN_TOKEN}x",
        f"Bearer {ADMIN_TOKEN[:-1]}",
        ADMIN_TOKEN,
        f"Basic {ADMIN_TOKEN}",
        "data-plane-key",
    ],
    ids=[
        "missing",
        "empty",
        "scheme-only",
        "empty-token",
        "wrong",
        "longer",
        "prefix",
        "no-scheme",
        "basic",
        "data-plane-key",
    ],
)
def test_every_route_refuses_a_missing_or_wrong_token(
    admin: Admin, gateway: Proc, authorization: str | None
) -> None:
    """Every admin route (and unrouted /admin paths) answers 401 `unauthorized` in OpenAI's
    error shape without the admin token, and the refused calls change nothing."""
    account_id, key = admin.funded(["mock-model"], amount="5.00")
    key_id = key.split(".")[1]
    if authorization == "data-plane-key":
        authorization = f"Bearer {key}"
    before = _snapshot(admin, account_id)
    new_id = "acct-" + uuid.uuid4().hex[:12]
    anonymous = Admin(gateway.url, token=None)
    headers = {"Authorization": authorization} if authorization is not None else None
    for method, template in _route_list() + UNROUTED:
        path = _fill(template, account_id, key_id, "mock-model")
        body = _valid_body(method, template, new_id)
        reply = anonymous.call(method, path, body, headers=headers)
        error = _error(reply, 401, "unauthorized")
        assert error["type"] == "invalid_request_error"
        assert "x-request-id" in {name.lower() for name in reply.headers}
    assert _snapshot(admin, account_id) == before
    _error(admin.call("GET", f"/admin/accounts/{new_id}"), 404, "account_not_found")


@pytest.mark.parametrize("token_value", [None, ""], ids=["unset", "empty"])
def test_admin_api_is_disabled_without_a_configured_token(
    make_gateway: Callable[..., Proc],
    mock_a: Proc,
    monkeypatch: pytest.MonkeyPatch,
    admin: Admin,
    token_value: str | None,
) -> None:
    """When the variable `server.admin_token_env` names is unset or empty, every admin route
    answers 401, whatever token is sent (an empty expected token must not match an empty
    given one)."""
    variable = "GATEWAY_TEST_ADMIN_TOKEN_" + uuid.uuid4().hex.upper()
    if token_value is None:
        monkeypatch.delenv(variable, raising=False)
    else:
        monkeypatch.setenv(variable, token_value)
    gw = make_gateway([model_entry("mock-model", mock_a.url)], server={"admin_token_env": variable})
    account_id, key = admin.funded(["mock-model"], amount="5.00")  # same store
    key_id = key.split(".")[1]
    before = _snapshot(admin, account_id)
    new_id = "acct-" + uuid.uuid4().hex[:12]
    for token in [None, "", ADMIN_TOKEN, "anything"]:
        client = Admin(gw.url, token=token)
        for method, template in _route_list() + UNROUTED:
            path = _fill(template, account_id, key_id, "mock-model")
            reply = client.call(method, path, _valid_body(method, template, new_id))
            _error(reply, 401, "unauthorized")
    assert _snapshot(admin, account_id) == before
    _error(admin.call("GET", f"/admin/accounts/{new_id}"), 404, "account_not_found")


def test_unrouted_admin_path_with_the_token_is_404_in_shape(admin: Admin) -> None:
    """With the right token, an /admin path no route serves is 404 `not_found`, and a method
    no route takes is 405, both in OpenAI's error shape."""
    _error(admin.call("GET", "/admin/nothing"), 404, "not_found")
    _error(admin.call("PUT", "/admin/accounts", {}), 405, "method_not_allowed")


# -- accounts -------------------------------------------------------------------------------


def test_create_account_answers_201_with_the_spec_fields(admin: Admin) -> None:
    """POST /admin/accounts creates an empty, active account and answers 201 with SPEC's
    fields: zero amounts as six-decimal strings, no period, no arrears, no subscriptions."""
    account_id = "acct-" + uuid.uuid4().hex[:12]
    reply = admin.call("POST", "/admin/accounts", {"id": account_id, "name": "Ada"})
    assert reply.status == 201, reply.body
    assert reply.headers["Content-Type"].startswith("application/json")
    account = reply.json()
    assert set(account) >= SPEC_ACCOUNT_FIELDS
    assert account["id"] == account_id
    assert account["name"] == "Ada"
    assert account["balance"] == "0.000000"
    assert account["held"] == "0.000000"
    assert account["available"] == "0.000000"
    assert account["state"] == "active"
    assert account["period"] is None
    assert account["arrears_since"] is None
    assert account["grace_ends_at"] is None
    assert account["retention_ends_at"] is None
    assert account["subscriptions"] == []
    assert admin.account(account_id) == account


def test_create_account_without_a_name(admin: Admin) -> None:
    """`name` is optional."""
    account_id = "acct-" + uuid.uuid4().hex[:12]
    reply = admin.call("POST", "/admin/accounts", {"id": account_id})
    assert reply.status == 201, reply.body
    assert reply.json()["id"] == account_id


def test_duplicate_account_is_409_and_keeps_the_first(admin: Admin) -> None:
    """Creating an id that exists is 409 `account_exists` and leaves the account as it was."""
    account_id = admin.create_account(name="first")
    admin.topup(account_id, "3.00")
    reply = admin.call("POST", "/admin/accounts", {"id": account_id, "name": "second"})
    _error(reply, 409, "account_exists")
    account = admin.account(account_id)
    assert account["name"] == "first"
    assert account["balance"] == "3.000000"


@pytest.mark.parametrize(
    "bad_id",
    ["a{b", "{a}", "a.b", "", "x" * 65, "a b", "a/b", "é", 5, None, ["a"], {"a": 1}],
    ids=[
        "brace",
        "hash-tag",
        "dot",
        "empty",
        "65-chars",
        "space",
        "slash",
        "non-ascii",
        "number",
        "null",
        "list",
        "object",
    ],
)
def test_bad_account_id_is_400_param_id(admin: Admin, bad_id: Any) -> None:
    """An id that is not 1-64 letters, digits, '_' or '-' is 400 `invalid_request`, param `id`."""
    error = _error(admin.call("POST", "/admin/accounts", {"id": bad_id}), 400, "invalid_request")
    assert error["param"] == "id"


def test_missing_account_id_is_400_param_id(admin: Admin) -> None:
    """A body without `id` is 400 `invalid_request`, param `id`."""
    error = _error(admin.call("POST", "/admin/accounts", {"name": "x"}), 400, "invalid_request")
    assert error["param"] == "id"


def test_64_char_account_id_is_accepted(admin: Admin) -> None:
    """The longest id (64 characters) is valid."""
    account_id = uuid.uuid4().hex + uuid.uuid4().hex
    assert len(account_id) == 64
    assert admin.call("POST", "/admin/accounts", {"id": account_id}).status == 201


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1]", b'"x"', b""], ids=["malformed", "array", "string", "empty"]
)
def test_create_account_bad_body_is_400(admin: Admin, raw: bytes) -> None:
    """A body that is not a JSON object is 400 `invalid_request`."""
    _error(admin.call("POST", "/admin/accounts", raw=raw), 400, "invalid_request")


def test_bad_name_is_400_param_name(admin: Admin) -> None:
    """A non-string or over-long name is 400 `invalid_request`, param `name`."""
    for name in [5, "n" * 201]:
        account_id = "acct-" + uuid.uuid4().hex[:12]
        reply = admin.call("POST", "/admin/accounts", {"id": account_id, "name": name})
        assert _error(reply, 400, "invalid_request")["param"] == "name"
        _error(admin.call("GET", f"/admin/accounts/{account_id}"), 404, "account_not_found")


def test_unknown_account_is_404_on_get_and_every_sub_route(admin: Admin) -> None:
    """GET of an unknown account, and every route under it, is 404 `account_not_found`, and
    none of them creates the account."""
    missing = "acct-missing-" + uuid.uuid4().hex[:12]
    calls: list[tuple[str, str, Any, dict[str, str] | None]] = [
        ("GET", f"/admin/accounts/{missing}", None, None),
        ("POST", f"/admin/accounts/{missing}/topups", {"amount": "1.00"}, None),
        (
            "POST",
            f"/admin/accounts/{missing}/topups",
            {"amount": "1.00"},
            {"Idempotency-Key": uuid.uuid4().hex},
        ),
        ("POST", f"/admin/accounts/{missing}/keys", None, None),
        ("GET", f"/admin/accounts/{missing}/keys", None, None),
        ("DELETE", f"/admin/accounts/{missing}/keys/key_000000000000", None, None),
        ("POST", f"/admin/accounts/{missing}/subscriptions", {"model": "mock-model"}, None),
        ("DELETE", f"/admin/accounts/{missing}/subscriptions/mock-model", None, None),
        ("GET", f"/admin/accounts/{missing}/usage", None, None),
    ]
    covered = {(method, path) for method, path, _, _ in calls}
    for method, path, body, headers in calls:
        _error(admin.call(method, path, body, headers=headers), 404, "account_not_found")
    # Routes added since this list was written still answer a client error, never 2xx or 5xx.
    for method, template in _route_list():
        path = _fill(template, missing, "key_000000000000", "mock-model")
        if "{account_id}" not in template or (method, path) in covered:
            continue
        reply = admin.call(method, path, _valid_body(method, template, missing))
        assert 400 <= reply.status < 500, (method, path, reply.status, reply.body)
    _error(admin.call("GET", f"/admin/accounts/{missing}"), 404, "account_not_found")


@pytest.mark.parametrize("bad_id", ["a.b", "a%20b", "x" * 65], ids=["dot", "space", "65"])
def test_invalid_account_id_in_a_path_is_404(admin: Admin, bad_id: str) -> None:
    """An id that cannot name an account, in a path, is 404 `account_not_found`."""
    _error(admin.call("GET", f"/admin/accounts/{bad_id}"), 404, "account_not_found")
    reply = admin.call("POST", f"/admin/accounts/{bad_id}/topups", {"amount": "1.00"})
    _error(reply, 404, "account_not_found")


# -- top-ups --------------------------------------------------------------------------------


def test_topups_credit_exact_decimal_amounts(admin: Admin) -> None:
    """Top-ups take decimal strings and the balance is their exact sum, to the micro-unit."""
    account_id = admin.create_account()
    reply = admin.call("POST", f"/admin/accounts/{account_id}/topups", {"amount": "10.00"})
    assert reply.status == 201, reply.body
    answer = reply.json()
    assert answer["amount"] == "10.000000"
    assert answer["balance"] == "10.000000"
    assert answer["account"] == account_id
    assert ISO_MS.match(answer["created_at"])
    assert "Idempotent-Replayed" not in reply.headers
    for amount in ["0.000001", "0.1", "2", "0.2", "1234567.654321"]:
        admin.topup(account_id, amount)
    account = admin.account(account_id)
    assert account["balance"] == "1234579.954322"
    assert account["available"] == "1234579.954322"
    assert account["held"] == "0.000000"


@pytest.mark.parametrize(
    "body",
    [
        {"amount": "-1"},
        {"amount": "0"},
        {"amount": "0.000000"},
        {"amount": "1.0000001"},
        {"amount": 5},
        {"amount": 5.0},
        {"amount": "abc"},
        {"amount": "1e3"},
        {"amount": "1,00"},
        {"amount": ".5"},
        {"amount": "+1"},
        {"amount": "99999999999"},
        {"amount": None},
        {},
    ],
    ids=[
        "negative",
        "zero",
        "zero-decimals",
        "seven-decimals",
        "int",
        "float",
        "letters",
        "exponent",
        "comma",
        "no-whole",
        "plus",
        "too-large",
        "null",
        "missing",
    ],
)
def test_invalid_topup_amount_is_400_param_amount(admin: Admin, body: dict[str, Any]) -> None:
    """An amount that is not a positive decimal string with at most six decimals is 400
    `invalid_request`, param `amount`, and credits nothing."""
    account_id = admin.create_account()
    reply = admin.call("POST", f"/admin/accounts/{account_id}/topups", body)
    assert _error(reply, 400, "invalid_request")["param"] == "amount"
    assert admin.account(account_id)["balance"] == "0.000000"


def test_non_ascii_digits_are_not_an_amount(admin: Admin) -> None:
    """An amount written in non-ASCII digits is 400 param `amount` and credits nothing."""
    account_id = admin.create_account()
    reply = admin.call("POST", f"/admin/accounts/{account_id}/topups", {"amount": "\u0661\u0660"})
    assert admin.account(account_id)["balance"] == "0.000000"
    assert _error(reply, 400, "invalid_request")["param"] == "amount"


def test_idempotent_replay_returns_the_first_answer_and_credits_nothing(admin: Admin) -> None:
    """A replayed Idempotency-Key returns the first status and body, says so in
    `Idempotent-Replayed: true`, and credits nothing."""
    account_id = admin.create_account()
    path = f"/admin/accounts/{account_id}/topups"
    headers = {"Idempotency-Key": "idem-" + uuid.uuid4().hex}
    first = admin.call("POST", path, {"amount": "7.50"}, headers=headers)
    assert first.status == 201, first.body
    assert "Idempotent-Replayed" not in first.headers
    for _ in range(3):
        again = admin.call("POST", path, {"amount": "7.50"}, headers=headers)
        assert again.status == first.status
        assert again.json() == first.json()
        assert again.headers["Idempotent-Replayed"] == "true"
    assert admin.account(account_id)["balance"] == "7.500000"


def test_idempotency_key_with_another_body_is_409(admin: Admin) -> None:
    """The same Idempotency-Key with another body is 409 `idempotency_conflict` and credits
    nothing; the original body still replays."""
    account_id = admin.create_account()
    path = f"/admin/accounts/{account_id}/topups"
    headers = {"Idempotency-Key": "idem-" + uuid.uuid4().hex}
    first = admin.call("POST", path, {"amount": "1.00"}, headers=headers)
    assert first.status == 201
    conflict = admin.call("POST", path, {"amount": "2.00"}, headers=headers)
    _error(conflict, 409, "idempotency_conflict")
    assert admin.account(account_id)["balance"] == "1.000000"
    again = admin.call("POST", path, {"amount": "1.00"}, headers=headers)
    assert again.json() == first.json()
    assert admin.account(account_id)["balance"] == "1.000000"


def test_idempotency_keys_are_per_account(admin: Admin) -> None:
    """The same Idempotency-Key on another account is a new top-up there."""
    one, two = admin.create_account(), admin.create_account()
    headers = {"Idempotency-Key": "shared-" + uuid.uuid4().hex}
    first = admin.call("POST", f"/admin/accounts/{one}/topups", {"amount": "1.00"}, headers=headers)
    second = admin.call(
        "POST", f"/admin/accounts/{two}/topups", {"amount": "1.00"}, headers=headers
    )
    assert first.status == second.status == 201
    assert "Idempotent-Replayed" not in second.headers
    assert first.json()["id"] != second.json()["id"]
    assert admin.account(one)["balance"] == "1.000000"
    assert admin.account(two)["balance"] == "1.000000"


def test_topups_without_idempotency_key_each_credit(admin: Admin) -> None:
    """Without an Idempotency-Key, two equal top-ups are two credits."""
    account_id = admin.create_account()
    path = f"/admin/accounts/{account_id}/topups"
    for _ in range(2):
        assert admin.call("POST", path, {"amount": "1.25"}).status == 201
    assert admin.account(account_id)["balance"] == "2.500000"


@pytest.mark.parametrize("key", ["has space", "x" * 256], ids=["space", "256-chars"])
def test_bad_idempotency_key_is_400(admin: Admin, key: str) -> None:
    """An Idempotency-Key that is not 1-255 printable ASCII characters is 400 and credits
    nothing."""
    account_id = admin.create_account()
    reply = admin.call(
        "POST",
        f"/admin/accounts/{account_id}/topups",
        {"amount": "1.00"},
        headers={"Idempotency-Key": key},
    )
    _error(reply, 400, "invalid_request")
    assert admin.account(account_id)["balance"] == "0.000000"


# -- API keys -------------------------------------------------------------------------------


def _store_contents(client: redis.Redis) -> bytes:
    """Every key name and every value in the store, read by type, as one byte string."""
    parts: list[bytes] = []
    for name in client.scan_iter(count=1000):
        parts.append(name)
        kind = client.type(name).decode()
        if kind == "string":
            parts.append(client.get(name) or b"")
        elif kind == "hash":
            for field, value in client.hgetall(name).items():
                parts.extend((field, value))
        elif kind == "set":
            parts.extend(client.smembers(name))
        elif kind == "zset":
            parts.extend(member for member, _ in client.zrange(name, 0, -1, withscores=True))
        elif kind == "list":
            parts.extend(client.lrange(name, 0, -1))
        elif kind == "stream":
            for entry_id, fields in client.xrange(name):
                parts.append(entry_id)
                for field, value in fields.items():
                    parts.extend((field, value))
        else:
            parts.append(client.dump(name) or b"")
    return b"\n".join(parts)


def test_key_secret_is_shown_once_and_never_listed(admin: Admin) -> None:
    """POST .../keys answers 201 with the secret; GET lists the key's metadata only, and the
    secret appears nowhere in it."""
    account_id = admin.create_account()
    reply = admin.call("POST", f"/admin/accounts/{account_id}/keys")
    assert reply.status == 201, reply.body
    created = reply.json()
    secret = created["key"]
    assert secret.startswith(f"sk-gw-{account_id}.{created['id']}.")
    random_part = secret.split(".")[2]
    assert len(random_part) >= 32
    listing = admin.call("GET", f"/admin/accounts/{account_id}/keys")
    assert listing.status == 200
    assert secret.encode() not in listing.body
    assert random_part.encode() not in listing.body
    keys = listing.json()["data"]
    assert [k["id"] for k in keys] == [created["id"]]
    assert "key" not in keys[0]
    assert keys[0]["revoked_at"] is None
    second = admin.ok("POST", f"/admin/accounts/{account_id}/keys")
    assert second["key"] != secret
    listed = admin.ok("GET", f"/admin/accounts/{account_id}/keys")["data"]
    assert sorted(k["id"] for k in listed) == sorted([created["id"], second["id"]])


async def test_key_secret_is_stored_only_as_its_sha256(
    admin: Admin, gateway: Proc, valkey: EmbeddedStore
) -> None:
    """After the key is made and used, no key name or value anywhere in the store holds the
    secret or its random part; its sha256 is there."""
    _, secret = admin.funded(["mock-model"])
    status, _, _ = await _call(gateway.url + "/v1/chat/completions", CHAT, key=secret)
    assert status == 200
    status, _, _ = await _call(gateway.url + "/v1/models", key=secret, method="GET")
    assert status == 200
    client = redis.Redis.from_url(valkey.url)
    try:
        contents = _store_contents(client)
    finally:
        client.close()
    assert secret.encode() not in contents
    assert secret.split(".")[2].encode() not in contents
    assert hash_key(secret).encode() in contents


async def test_revoked_key_is_refused_by_every_instance(
    admin: Admin, gateway: Proc, make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """DELETE .../keys/{id} is 204; from then on the key gets 401 `invalid_api_key` on this
    gateway and on another one sharing the store, while the account's other keys still work."""
    account_id, secret = admin.funded(["mock-model"])
    other = admin.new_key(account_id)
    key_id = secret.split(".")[1]
    second = make_gateway([model_entry("mock-model", mock_a.url)])
    for gw in (gateway, second):
        status, _, body = await _call(gw.url + "/v1/chat/completions", CHAT, key=secret)
        assert status == 200, body
    reply = admin.call("DELETE", f"/admin/accounts/{account_id}/keys/{key_id}")
    assert reply.status == 204
    assert reply.body == b""
    for gw in (gateway, second):
        status, _, body = await _call(gw.url + "/v1/chat/completions", CHAT, key=secret)
        _data_error(status, body, 401, "invalid_api_key")
        status, _, body = await _call(gw.url + "/v1/models", key=secret, method="GET")
        _data_error(status, body, 401, "invalid_api_key")
        status, _, body = await _call(gw.url + "/v1/chat/completions", CHAT, key=other)
        assert status == 200, body
    listed = {k["id"]: k for k in admin.ok("GET", f"/admin/accounts/{account_id}/keys")["data"]}
    revoked_at = listed[key_id]["revoked_at"]
    assert ISO_MS.match(revoked_at)
    # Revoking again is harmless and keeps the first revocation time.
    again = admin.call("DELETE", f"/admin/accounts/{account_id}/keys/{key_id}")
    assert again.status == 204
    listed = {k["id"]: k for k in admin.ok("GET", f"/admin/accounts/{account_id}/keys")["data"]}
    assert listed[key_id]["revoked_at"] == revoked_at


def test_revoking_an_unknown_key_is_404(admin: Admin) -> None:
    """DELETE of a key id the account does not have is 404, also for another account's key."""
    account_id = admin.create_account()
    reply = admin.call("DELETE", f"/admin/accounts/{account_id}/keys/key_000000000000")
    _error(reply, 404, "not_found")
    _, other_key = admin.funded([])
    reply = admin.call("DELETE", f"/admin/accounts/{account_id}/keys/{other_key.split('.')[1]}")
    _error(reply, 404, "not_found")


# -- subscriptions --------------------------------------------------------------------------


async def test_subscriptions_gate_calls_and_the_model_list(admin: Admin, gateway: Proc) -> None:
    """Subscribing is 201 then 200; /v1/models lists only subscribed models; after DELETE
    (204) a call to that model is 403 `model_not_subscribed`."""
    account_id, key = admin.funded([])
    path = f"/admin/accounts/{account_id}/subscriptions"
    first = admin.call("POST", path, {"model": "mock-model"})
    assert first.status == 201, first.body
    assert first.json() == {"account": account_id, "model": "mock-model"}
    repeat = admin.call("POST", path, {"model": "mock-model"})
    assert repeat.status == 200
    assert repeat.json() == first.json()
    assert admin.account(account_id)["subscriptions"] == ["mock-model"]

    status, _, body = await _call(gateway.url + "/v1/models", key=key, method="GET")
    assert status == 200
    assert [m["id"] for m in orjson.loads(body)["data"]] == ["mock-model"]
    status, _, body = await _call(gateway.url + "/v1/chat/completions", CHAT, key=key)
    assert status == 200, body
    mapped = {**CHAT, "model": "mapped"}
    status, _, body = await _call(gateway.url + "/v1/chat/completions", mapped, key=key)
    _data_error(status, body, 403, "model_not_subscribed")

    reply = admin.call("DELETE", f"{path}/mock-model")
    assert reply.status == 204
    assert admin.account(account_id)["subscriptions"] == []
    status, _, body = await _call(gateway.url + "/v1/chat/completions", CHAT, key=key)
    _data_error(status, body, 403, "model_not_subscribed")
    status, _, body = await _call(gateway.url + "/v1/models", key=key, method="GET")
    assert status == 200
    assert orjson.loads(body)["data"] == []
    # Unsubscribing again is harmless.
    assert admin.call("DELETE", f"{path}/mock-model").status == 204


def test_subscribing_to_an_unknown_model_is_404(admin: Admin) -> None:
    """A model the config does not name is 404 `model_not_found` and is not subscribed."""
    account_id = admin.create_account()
    path = f"/admin/accounts/{account_id}/subscriptions"
    reply = admin.call("POST", path, {"model": "gpt-nope"})
    assert _error(reply, 404, "model_not_found")["param"] == "model"
    assert admin.account(account_id)["subscriptions"] == []
    for body in [{}, {"model": ""}, {"model": 5}]:
        assert _error(admin.call("POST", path, body), 400, "invalid_request")["param"] == "model"


# -- usage ----------------------------------------------------------------------------------


async def _make_usage(gateway: Proc, key: str) -> list[tuple[str, bool]]:
    """Five calls, streamed and not; their (request id, stream) in order."""
    made: list[tuple[str, bool]] = []
    for i, stream in enumerate([False, True, False, True, False]):
        body = {
            **CHAT,
            "max_tokens": 2 + i,
            "messages": [{"role": "user", "content": f"call number {i}"}],
            "stream": stream,
        }
        status, headers, answer = await _call(gateway.url + "/v1/chat/completions", body, key=key)
        assert status == 200, answer
        made.append((headers["x-request-id"], stream))
    return made


async def test_usage_lists_records_oldest_first_with_spec_fields(
    admin: Admin, gateway: Proc
) -> None:
    """GET .../usage lists one record per call, oldest first, with SPEC's fields; costs are
    decimal strings that match the tokens at the model's prices, and the balance is the
    top-up minus their sum."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    made = await _make_usage(gateway, key)
    page = admin.ok("GET", f"/admin/accounts/{account_id}/usage")
    assert page["next"] is None
    records = page["data"]
    assert [(r["request_id"], r["stream"]) for r in records] == made
    spent = 0
    for i, record in enumerate(records):
        assert set(SPEC_USAGE_FIELDS) <= set(record)
        assert record["kind"] == "inference"
        assert record["model"] == "mock-model"
        assert ISO_MS.match(record["time"])
        assert record["usage_source"] == "upstream"
        assert record["status"] == "ok"
        assert record["completion_tokens"] == 2 + i
        assert type(record["prompt_tokens"]) is int
        assert record["prompt_tokens"] > 0
        assert DECIMAL.match(record["cost"])
        cost = call_cost(
            record["prompt_tokens"], record["completion_tokens"], INPUT_MICROS, OUTPUT_MICROS
        )
        assert record["cost"] == format_micros(cost)
        spent += cost
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)
    account = admin.account(account_id)
    assert account["balance"] == format_micros(10_000_000 - spent)
    assert account["held"] == "0.000000"


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 7])
async def test_usage_pages_walk_every_record_once(admin: Admin, gateway: Proc, limit: int) -> None:
    """Following `next` with a small `limit` visits every record exactly once, in order, and
    ends on a page whose `next` is null."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    made = [request_id for request_id, _ in await _make_usage(gateway, key)]
    seen: list[str] = []
    after = ""
    for _ in range(len(made) + 2):
        page = admin.ok("GET", f"/admin/accounts/{account_id}/usage?limit={limit}{after}")
        assert len(page["data"]) <= limit
        seen.extend(r["request_id"] for r in page["data"])
        if page["next"] is None:
            break
        after = f"&after={page['next']}"
    else:
        pytest.fail("pagination did not end")
    assert seen == made


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=abc", "limit=-1", "limit=1001", "limit=", "after=garbage", "after=1-"],
)
def test_bad_usage_query_is_400(admin: Admin, query: str) -> None:
    """A `limit` outside 1-1000 or an `after` that is not a cursor is 400 `invalid_request`."""
    account_id = admin.create_account()
    reply = admin.call("GET", f"/admin/accounts/{account_id}/usage?{query}")
    error = _error(reply, 400, "invalid_request")
    assert error["param"] == query.split("=")[0]


def test_superscript_digit_limit_is_400(admin: Admin) -> None:
    """A `limit` made of a character str.isdigit() accepts but int() refuses ('²') is 400,
    not a 500."""
    account_id = admin.create_account()
    reply = admin.call("GET", f"/admin/accounts/{account_id}/usage?limit=%C2%B2")
    _error(reply, 400, "invalid_request")


@pytest.mark.parametrize(
    "after",
    [
        "%D9%A1-%D9%A1",
        "99999999999999999999999-0",
        "1-99999999999999999999999",
        "18446744073709551615-18446744073709551615",
    ],
    ids=["arabic-digits", "ms-overflow", "seq-overflow", "max-id"],
)
def test_out_of_range_cursor_is_a_client_error(admin: Admin, after: str) -> None:
    """A cursor that looks like one but Redis cannot use is the client's error (400, or an
    empty page for the largest id), never 503 `ledger_unavailable`: the store is fine."""
    account_id = admin.create_account()
    reply = admin.call("GET", f"/admin/accounts/{account_id}/usage?after={after}")
    assert reply.status in (200, 400), (reply.status, reply.body)


async def test_usage_as_csv_has_a_header_and_the_same_records(admin: Admin, gateway: Proc) -> None:
    """`Accept: text/csv` gives CSV: a header row naming SPEC's fields, then the same records
    in the same order as the JSON answer."""
    account_id, key = admin.funded(["mock-model"], amount="10.00")
    await _make_usage(gateway, key)
    path = f"/admin/accounts/{account_id}/usage"
    records = admin.ok("GET", path)["data"]
    reply = admin.call("GET", path, headers={"Accept": "text/csv"})
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(reply.body.decode())))
    header, body = rows[0], rows[1:]
    assert set(SPEC_USAGE_FIELDS) <= set(header)
    assert len(body) == len(records)
    for row, record in zip(body, records, strict=True):
        as_dict = dict(zip(header, row, strict=True))
        for field in SPEC_USAGE_FIELDS:
            value = record[field]
            if isinstance(value, bool):  # written as JSON writes it, not as Python's str()
                value = "true" if value else "false"
            assert as_dict[field] == str(value), field
    # Paging works for CSV too, through the X-Next-Cursor header.
    first = admin.call("GET", path + "?limit=2", headers={"Accept": "text/csv"})
    cursor = first.headers["X-Next-Cursor"]
    rest = admin.call("GET", f"{path}?limit=2&after={cursor}", headers={"Accept": "text/csv"})
    rest_rows = list(csv.DictReader(io.StringIO(rest.body.decode())))
    assert [r["request_id"] for r in rest_rows] == [r["request_id"] for r in records[2:4]]


# -- what the OpenAI SDK sees ---------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["sk-gw-nobody.key_000000000000.c2VjcmV0", "not-a-gateway-key", "sk-gw-a.b", "sk-gw-{x}.k.s"],
    ids=["unknown", "malformed", "two-parts", "brace-account"],
)
async def test_sdk_gets_authentication_error_for_bad_keys(gateway: Proc, key: str) -> None:
    """An unknown or malformed key reaches the SDK as AuthenticationError, 401
    `invalid_api_key`, on model calls and on the model list."""
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    try:
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        assert info.value.status_code == 401
        assert info.value.code == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError) as info:
            await sdk.models.list()
        assert info.value.code == "invalid_api_key"
    finally:
        await sdk.close()


async def test_sdk_gets_402_for_an_empty_balance(admin: Admin, gateway: Proc) -> None:
    """An account with zero balance gets APIStatusError 402 `insufficient_balance`, and no
    usage record or hold is left behind."""
    account_id = admin.create_account()
    admin.subscribe(account_id, "mock-model")
    key = admin.new_key(account_id)
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
    finally:
        await sdk.close()
    assert info.value.status_code == 402
    assert info.value.code == "insufficient_balance"
    assert admin.usage(account_id) == []
    account = admin.account(account_id)
    assert account["balance"] == account["held"] == "0.000000"


async def test_sdk_gets_403_for_an_unsubscribed_model(admin: Admin, gateway: Proc) -> None:
    """A funded account calling a model it is not subscribed to gets PermissionDeniedError,
    403 `model_not_subscribed`, and is charged nothing."""
    account_id, key = admin.funded(["mock-model"], amount="5.00")
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as info:
            await sdk.chat.completions.create(
                model="mapped", messages=[{"role": "user", "content": "hi"}], max_tokens=3
            )
        assert isinstance(info.value, openai.PermissionDeniedError)
        assert info.value.status_code == 403
        assert info.value.code == "model_not_subscribed"
        with pytest.raises(openai.PermissionDeniedError) as info:
            await sdk.models.retrieve("mapped")
        assert info.value.code == "model_not_subscribed"
    finally:
        await sdk.close()
    assert admin.account(account_id)["balance"] == "5.000000"
    assert admin.usage(account_id) == []
