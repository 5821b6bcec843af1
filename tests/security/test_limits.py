"""Input limits: slow bodies, deep JSON and huge headers get clear errors, not a stuck call."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp
import orjson

from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.procs import Proc


async def test_slow_body_gets_408_and_the_connection_closes(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A client that announces 1000 bytes and sends 10 gets 408 request_timeout after
    server.read_timeout, and the connection is closed."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        server={"read_timeout": "500ms"},
    )
    _, key = Admin(gw.url).funded(["m"])
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Authorization: Bearer {key}\r\nContent-Length: 1000\r\n\r\n".encode()
        + b'{"model": '
    )
    await writer.drain()
    started = time.monotonic()
    answer = await asyncio.wait_for(reader.read(), timeout=10)  # read() returns at close
    elapsed = time.monotonic() - started
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 408")
    assert b'"code":"request_timeout"' in answer
    assert 0.4 < elapsed < 5


async def test_deep_json_and_big_headers(gateway: Proc, api_key: str) -> None:
    """JSON nested thousands deep is a 400 invalid_request; an oversized header is refused."""
    deep = b'{"model": "mock-model", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {api_key}"}) as session:
        async with session.post(gateway.url + "/v1/chat/completions", data=deep) as resp:
            assert resp.status == 400
            assert orjson.loads(await resp.read())["error"]["code"] == "invalid_request"
        async with session.post(
            gateway.url + "/v1/chat/completions", data=b"{}", headers={"X-Big": "a" * 20000}
        ) as resp:
            assert resp.status in (400, 431)


async def test_trickled_headers_are_cut_off(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A client that never finishes its headers is disconnected after server.idle_timeout."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        server={"idle_timeout": "1s"},
    )
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    started = time.monotonic()
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    await writer.drain()
    closed = False
    while time.monotonic() - started < 10:
        try:
            writer.write(b"X")  # one more header byte now and then, never the end
            await writer.drain()
        except ConnectionError:
            closed = True
            break
        if reader.at_eof() or await _closed(reader):
            closed = True
            break
    writer.close()
    await asyncio.gather(writer.wait_closed(), return_exceptions=True)
    assert closed
    assert time.monotonic() - started < 5


async def _closed(reader: asyncio.StreamReader) -> bool:
    try:
        data = await asyncio.wait_for(reader.read(1), timeout=0.2)
    except TimeoutError:
        return False
    return data == b""
