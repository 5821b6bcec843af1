"""Authentication comes before anything that tells a caller about the configuration: which
models exist, their limits, the gateway's bounds. A key the ledger does not know gets 401,
whatever else is wrong with its request; a known key gets the real reason."""

from __future__ import annotations

from typing import Any

import pytest

from tests.admin_client import Admin
from tests.procs import Proc

UNKNOWN_KEY = "sk-gw-nobody.key_000000000000.not-a-real-secret"
# Requests each refused for a reason that would tell the caller something.
REFUSALS = [
    ("/v1/chat/completions", {"model": "no-such-model", "messages": []}, 404, "model_not_found"),
    ("/v1/completions", {"model": "no-such-model", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404, "model_not_found"),
    (
        "/v1/chat/completions",
        {"model": "mock-model", "messages": [], "max_tokens": 10**9},
        400,
        "invalid_request",
    ),
]


@pytest.fixture(scope="module")
def known_key(gateway: Proc) -> str:
    _, key = Admin(gateway.url).funded(["mock-model"])
    return key


def _post(gateway: Proc, path: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(
        gateway.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.parametrize(("path", "body", "status", "code"), REFUSALS)
def test_an_unknown_key_learns_nothing_but_401(
    gateway: Proc, known_key: str, path: str, body: dict[str, Any], status: int, code: str
) -> None:
    got, answer = _post(gateway, path, body, UNKNOWN_KEY)
    assert got == 401, answer
    assert answer["error"]["code"] == "invalid_api_key"
    assert "no-such-model" not in answer["error"]["message"]
    # A revoked or mistyped secret of a real account is just as unknown.
    wrong_secret = known_key.rsplit(".", 1)[0] + ".wrong-secret"
    got, answer = _post(gateway, path, body, wrong_secret)
    assert got == 401, answer
    # The account's own key is told the real reason.
    got, answer = _post(gateway, path, body, known_key)
    assert got == status, answer
    assert answer["error"]["code"] == code


def test_unknown_key_on_models_routes_is_401(gateway: Proc) -> None:
    import urllib.error
    import urllib.request

    for path in ("/v1/models", "/v1/models/no-such-model", "/v1/models/mock-model"):
        req = urllib.request.Request(
            gateway.url + path, headers={"Authorization": f"Bearer {UNKNOWN_KEY}"}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(req, timeout=30)
        refused.value.close()
        assert refused.value.code == 401, path
