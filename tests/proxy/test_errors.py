"""Every error row of SPEC section 6 that the proxy owns, in OpenAI's shape."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp
import orjson
import pytest

from tests.admin_client import Admin
from tests.conftest import UPSTREAM_KEY, model_entry
from tests.procs import Proc, free_port

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


async def _call(
    url: str,
    body: bytes | None,
    headers: dict[str, str] | None = None,
    method: str = "POST",
    key: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    if key is not None:
        headers = {**(headers or {}), "Authorization": f"Bearer {key}"}
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers or {}) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


async def _drain(resp: aiohttp.ClientResponse, into: bytearray) -> None:
    async for chunk in resp.content.iter_any():
        into += chunk


def _assert_error(status: int, body: bytes, want_status: int, want_code: str) -> dict[str, object]:
    assert status == want_status, body
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == want_code
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"messages": []}', "model"),
        (b'{"model": 42}', "model"),
        (b'{"model": ""}', "model"),
    ],
    ids=["malformed", "empty", "array", "no-model", "model-not-string", "model-empty"],
)
async def test_bad_body_is_400_invalid_request(
    gateway: Proc, api_key: str, body: bytes, param: str | None
) -> None:
    """Malformed JSON or a missing model gets 400 invalid_request (param `model` if that)."""
    status, _, answer = await _call(gateway.url + "/v1/chat/completions", body, key=api_key)
    error = _assert_error(status, answer, 400, "invalid_request")
    assert error["param"] == param


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
async def test_unknown_model_is_404_model_not_found(gateway: Proc, api_key: str, path: str) -> None:
    """A model the config does not name gets 404 model_not_found on every endpoint."""
    status, _, answer = await _call(
        gateway.url + path, orjson.dumps({"model": "gpt-nope"}), key=api_key
    )
    error = _assert_error(status, answer, 404, "model_not_found")
    assert error["param"] == "model"
    assert "gpt-nope" in str(error["message"])


async def test_unknown_route_and_method_keep_the_shape(gateway: Proc, api_key: str) -> None:
    """Unknown routes (404) and wrong methods (405) still answer in OpenAI's error shape."""
    status, _, answer = await _call(gateway.url + "/v1/nothing", b"{}")
    _assert_error(status, answer, 404, "not_found")
    status, _, answer = await _call(
        gateway.url + "/v1/chat/completions", None, method="GET", key=api_key
    )
    _assert_error(status, answer, 405, "method_not_allowed")


async def test_body_over_limit_is_413(make_gateway: Callable[..., Proc], mock_a: Proc) -> None:
    """A body over server.max_body_bytes gets 413 request_too_large, declared or chunked."""
    gw = make_gateway([model_entry("mock-model", mock_a.url)], server={"max_body_bytes": 4096})
    _, key = Admin(gw.url).funded(["mock-model"])
    big = orjson.dumps({**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]})
    status, _, answer = await _call(gw.url + "/v1/chat/completions", big, key=key)
    _assert_error(status, answer, 413, "request_too_large")

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(5):
            yield b"x" * 1000

    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=chunks()) as resp,
    ):
        _assert_error(resp.status, await resp.read(), 413, "request_too_large")
    # Under the limit still works.
    status, _, _ = await _call(gw.url + "/v1/chat/completions", orjson.dumps(CHAT), key=key)
    assert status == 200


async def test_unreachable_upstream_is_502(make_gateway: Callable[..., Proc]) -> None:
    """When no upstream accepts a connection the answer is 502 upstream_unavailable."""
    dead = f"http://127.0.0.1:{free_port()}"
    gw = make_gateway([model_entry("mock-model", dead)])
    _, key = Admin(gw.url).funded(["mock-model"])
    status, _, answer = await _call(gw.url + "/v1/chat/completions", orjson.dumps(CHAT), key=key)
    _assert_error(status, answer, 502, "upstream_unavailable")


@pytest.mark.parametrize("stream", [False, True])
async def test_slow_first_byte_is_504(
    make_gateway: Callable[..., Proc], mock_a: Proc, stream: bool
) -> None:
    """An upstream silent past timeouts.first_byte gets 504 upstream_timeout, streamed or not."""
    gw = make_gateway(
        [model_entry("mock-model", mock_a.url)], proxy={"timeouts": {"first_byte": "300ms"}}
    )
    _, key = Admin(gw.url).funded(["mock-model"])
    body = orjson.dumps({**CHAT, "stream": stream})
    status, _, answer = await _call(
        gw.url + "/v1/chat/completions", body, {"x-mock-ttft": "3"}, key=key
    )
    _assert_error(status, answer, 504, "upstream_timeout")


async def test_idle_stream_is_cut_not_completed(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A stream silent longer than proxy.timeouts.idle ends without its last chunk, so the
    client can tell it was cut."""
    gw = make_gateway(
        [model_entry("mock-model", mock_a.url)], proxy={"timeouts": {"idle": "300ms"}}
    )
    _, key = Admin(gw.url).funded(["mock-model"])
    body = orjson.dumps({**CHAT, "max_tokens": 5, "stream": True})
    received = bytearray()
    async with (
        aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session,
        session.post(
            gw.url + "/v1/chat/completions", data=body, headers={"x-mock-token-delay": "1.0"}
        ) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await _drain(resp, received)
    assert b"data: {" in received
    assert b"[DONE]" not in received


async def test_upstream_dying_mid_stream_truncates_the_client_stream(
    gateway: Proc, auth: dict[str, str]
) -> None:
    """An upstream that drops the connection mid-stream leaves the client a visibly cut stream."""
    body = orjson.dumps({**CHAT, "max_tokens": 10, "stream": True})
    received = bytearray()
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            data=body,
            headers={"x-mock-disconnect-after": "3", **auth},
        ) as resp,
    ):
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await _drain(resp, received)
    assert received.count(b"data: {") >= 3
    assert b"[DONE]" not in received


@pytest.mark.parametrize("code", ["400", "429", "500", "503"])
async def test_upstream_error_passes_through_unchanged(
    gateway: Proc, mock_a: Proc, auth: dict[str, str], code: str
) -> None:
    """An upstream's own error answer reaches the client as it came: status and bytes."""
    body = orjson.dumps(CHAT)
    headers = {"x-mock-status": code}
    direct = await _call(
        mock_a.url + "/v1/chat/completions",
        body,
        {**headers, "Authorization": f"Bearer {UPSTREAM_KEY}"},
    )
    via = await _call(gateway.url + "/v1/chat/completions", body, {**headers, **auth})
    assert via[0] == direct[0] == int(code)
    assert via[2] == direct[2]
    assert via[1]["Content-Type"] == direct[1]["Content-Type"]
