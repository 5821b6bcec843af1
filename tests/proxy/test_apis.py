"""Which upstream speaks what: each upstream's `apis`, and a call for an API that none of a
model's upstreams speaks refused before anything is held or forwarded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import pytest

from gateway.config.loader import ConfigError, parse_settings
from tests.admin_client import Admin
from tests.billing.checks import records_by_request
from tests.conftest import GATEWAY_ENV
from tests.procs import Proc

CHAT = {"model": "split", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
EMBED = {"model": "split", "input": "hi"}
LEGACY = {"model": "split", "prompt": "hi", "max_tokens": 3}


def _split(chat_url: str, embeddings_url: str) -> dict[str, Any]:
    """One model, two upstreams: the first serves chat only, the second embeddings only."""
    upstream = {"model": "mock-model", "api_key_env": "UPSTREAM_KEY"}
    return {
        "name": "split",
        "pricing": {"input_per_million": "1", "output_per_million": "1"},
        "upstreams": [
            {"url": f"{chat_url}/v1", "apis": ["chat"], **upstream},
            {"url": f"{embeddings_url}/v1", "apis": ["embeddings"], **upstream},
        ],
    }


async def _post(gw: Proc, key: str, path: str, body: dict[str, Any]) -> tuple[int, Any, str]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + path, data=orjson.dumps(body), headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        return resp.status, await resp.json(), resp.headers.get("x-request-id", "")


def _last_path(mock: Proc) -> Any:
    """What the mock last received (null before anything): compared before and after."""
    return Admin(mock.url, token=None).call("GET", "/debug/last-request").json()


async def test_each_api_goes_to_the_upstreams_that_speak_it(
    make_gateway: Callable[..., Proc], mock_a: Proc, mock_b: Proc
) -> None:
    """Chat calls go to the chat upstream and embeddings to the other, every time (no
    round-robin onto an upstream that does not serve the API); each record names it."""
    gw = make_gateway([_split(mock_a.url, mock_b.url)])
    admin = Admin(gw.url)
    account_id, key = admin.funded(["split"])
    a_label = mock_a.url.split("://")[1]
    b_label = mock_b.url.split("://")[1]
    expected: dict[str, str] = {}
    for _ in range(3):
        status, _, request_id = await _post(gw, key, "/v1/chat/completions", CHAT)
        assert status == 200
        expected[request_id] = a_label
        status, _, request_id = await _post(gw, key, "/v1/embeddings", EMBED)
        assert status == 200
        expected[request_id] = b_label
    records = records_by_request(admin, account_id, list(expected))
    assert {rid: records[rid]["upstream"] for rid in expected} == expected


async def test_an_api_no_upstream_speaks_is_refused(
    make_gateway: Callable[..., Proc], mock_a: Proc, mock_b: Proc
) -> None:
    """A legacy completion for a model whose upstreams speak chat and embeddings only is 400
    `api_not_served` (`param: model`), naming the routes it is served on; nothing is held,
    forwarded or billed. A caller with an unknown key learns nothing of it: 401."""
    gw = make_gateway([_split(mock_a.url, mock_b.url)])
    admin = Admin(gw.url)
    account_id, key = admin.funded(["split"])
    before = (_last_path(mock_a), _last_path(mock_b))
    status, reply, _ = await _post(gw, key, "/v1/completions", LEGACY)
    assert status == 400
    error = reply["error"]
    assert error["code"] == "api_not_served"
    assert error["param"] == "model"
    assert "/v1/completions" in error["message"]
    assert "/v1/chat/completions" in error["message"]
    assert "/v1/embeddings" in error["message"]
    assert (_last_path(mock_a), _last_path(mock_b)) == before
    assert [r for r in admin.usage(account_id) if r["kind"] == "inference"] == []
    account = admin.account(account_id)
    assert account["held"] == "0.000000"
    assert account["balance"] == "100.000000"
    status, reply, _ = await _post(gw, "sk-gw-nobody.k1.secret", "/v1/completions", LEGACY)
    assert status == 401
    assert reply["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("apis", "message"),
    [
        ([], "expected at least one of chat, completions, embeddings, responses, messages"),
        (["chat", "chat"], "an API is listed twice"),
        (["chat", "moderations"], "Input should be"),
    ],
    ids=["none", "twice", "unknown"],
)
def test_a_bad_apis_list_is_refused_at_its_path(
    apis: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", GATEWAY_ENV["UPSTREAM_KEY"])
    model = _split("http://127.0.0.1:1", "http://127.0.0.1:2")
    model["upstreams"][1]["apis"] = apis
    with pytest.raises(ConfigError) as info:
        parse_settings({"models": [model]})
    (problem,) = [p for p in info.value.problems if p.startswith("models[0].upstreams[1].apis")]
    assert message in problem


def test_the_default_is_the_three_openai_apis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UPSTREAM_KEY", GATEWAY_ENV["UPSTREAM_KEY"])
    model = _split("http://127.0.0.1:1", "http://127.0.0.1:2")
    del model["upstreams"][0]["apis"]
    settings = parse_settings({"models": [model]})
    assert settings.models[0].upstreams[0].apis == ("chat", "completions", "embeddings")


@pytest.mark.parametrize(
    "path",
    [
        "/v1/moderations",
        "/v1/audio/speech",
        "/v1/files",
        "/v1/responses/input_tokens",
        "/v1/responses/compact",
    ],
)
async def test_no_other_route_passes_unmetered(gateway: Proc, api_key: str, path: str) -> None:
    """A route the gateway does not meter is not forwarded: 404 in OpenAI's error shape,
    with or without a key (Responses routes the gateway does not serve too)."""
    status, reply, _ = await _post(gateway, api_key, path, CHAT)
    assert status == 404
    assert reply["error"]["code"] == "not_found", reply
