"""Content codings and malformed HTTP: a clear 4xx in OpenAI's shape, never a 500, no money moved.

A body in gzip or deflate is decoded in full (a cut-short or undecodable one is 400
`invalid_request`) and goes upstream decoded, without `Content-Encoding`; any other coding is
415 naming the ones the gateway takes; what aiohttp's HTTP parser refuses is answered as JSON.
"""

from __future__ import annotations

import gzip
import json
import socket
import urllib.parse
import uuid
import zlib
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.admin_client import Admin, Reply
from tests.procs import Proc
from tests.security.test_fuzz import ROUTES, _bodies

CHAT = {"model": "mock-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
CHAT_BYTES = orjson.dumps(CHAT)
DECODED = {"gzip", "x-gzip", "deflate"}  # what the gateway decodes (identity is no coding)


def _zlib(data: bytes) -> bytes:
    return zlib.compress(data)


def _raw_deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


_CODERS = {"gzip": gzip.compress, "x-gzip": gzip.compress, "deflate": _zlib}


def encode(data: bytes, header: str) -> bytes:
    """`data` with the codings of a Content-Encoding value applied, in order."""
    for token in header.split(","):
        name = token.strip().lower()
        if name and name != "identity":
            data = _CODERS[name](data)
    return data


def _error(reply: Reply) -> dict[str, Any]:
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.headers
    error = json.loads(reply.body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str)
    assert error["message"]
    return dict(error)


@pytest.fixture(scope="module")
def target(gateway: Proc) -> dict[str, Any]:
    admin = Admin(gateway.url)
    account_id, key = admin.funded(["mock-model"], amount="3.00")
    sentinel, _ = admin.funded(["mock-model"], amount="7.00")
    return {"admin": admin, "account": account_id, "key": key, "sentinel": sentinel}


def _balances(target: dict[str, Any]) -> dict[str, Any]:
    admin: Admin = target["admin"]
    return {a: admin.account(a)["balance"] for a in (target["account"], target["sentinel"])}


def _send(
    target: dict[str, Any], method: str, path: str, data_plane: bool, body: bytes, coding: str
) -> Reply:
    admin: Admin = target["admin"]
    headers = {"Content-Encoding": coding}
    if data_plane:
        headers["Authorization"] = f"Bearer {target['key']}"
        return Admin(admin.base_url, token=None).call(method, path, raw=body, headers=headers)
    return admin.call(method, path, raw=body, headers=headers)


# -- fuzz ------------------------------------------------------------------------------------

_UNSUPPORTED = ["br", "zstd", "foo", "compress", "gzip, br", "deflate, zstd", "gzip, foo"]
_DECODABLE = ["gzip", "deflate", "x-gzip", "GZip", "gzip, gzip", "deflate, gzip", "identity, gzip"]
_ANY = [*_DECODABLE, *_UNSUPPORTED, "identity"]

# (header, body sent, what the answer must be)
_cases = st.one_of(
    # random bytes under every kind of header
    st.tuples(st.sampled_from(_ANY), st.binary(max_size=300), st.just("random")),
    # a valid encoding of malformed JSON (the fuzz's bodies): answered as the plain body is
    st.tuples(st.sampled_from(_DECODABLE), _bodies, st.just("valid")),
    # the same cut short by 1..30 bytes, or followed by bytes after its end
    st.tuples(st.sampled_from(_DECODABLE), _bodies, st.integers(1, 30)),
    st.tuples(st.sampled_from(_DECODABLE), _bodies, st.binary(min_size=1, max_size=20)),
)


@pytest.mark.parametrize(("method", "path", "data_plane"), ROUTES)
def test_encoded_bodies_never_500_and_move_no_money(
    target: dict[str, Any], method: str, path: str, data_plane: bool
) -> None:
    """Random bytes under gzip, deflate, br, zstd, identity, unknown and stacked codings; valid
    gzip/deflate of malformed JSON; the same truncated or with trailing bytes; on every route
    that takes a body: a 4xx in the error shape with a JSON content type (never a 500), 415
    for a coding the gateway does not take, 400 for one that does not decode, and no balance
    moves."""
    url_path = path.format(account=target["account"])
    before = _balances(target)

    @settings(
        max_examples=80,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(case=_cases)
    def check(case: tuple[str, bytes, Any]) -> None:
        header, plain, kind = case
        codings = {t.strip().lower() for t in header.split(",")} - {"identity"}
        if kind == "random":
            body = plain
        else:
            body = encode(plain, header)
            if isinstance(kind, int):
                body = body[: max(1, len(body) - kind)]
            elif isinstance(kind, bytes):
                body += kind
        reply = _send(target, method, url_path, data_plane, body, header)
        assert reply.status < 500, (reply.status, reply.body)
        if kind == "valid" and not codings - DECODED:
            # decoded, the body is answered as the plain one (some are valid on a PUT)
            plain_reply = _send(target, method, url_path, data_plane, plain, "identity")
            assert reply.status == plain_reply.status, (reply.body, plain_reply.body)
            if reply.status >= 400:
                _error(reply)
            if reply.status == 400:
                assert reply.body == plain_reply.body
            return
        assert reply.status >= 400, (reply.status, reply.body)
        error = _error(reply)
        if not body:
            return  # no content: the header describes nothing, the route answers the body
        if codings - DECODED:
            assert (reply.status, error["code"]) == (415, "unsupported_content_encoding")
            assert reply.headers.get("Accept-Encoding") == "gzip, deflate"
        elif codings:  # random bytes, cut short, or bytes after the end
            assert (reply.status, error["code"]) == (400, "invalid_request"), error

    check()
    assert _balances(target) == before


@settings(max_examples=150, deadline=None, derandomize=True)
@given(value=st.binary(min_size=1, max_size=40).filter(lambda v: not set(v) & set(b"\r\n\0")))
def test_random_content_encoding_values(gateway: Proc, api_key: str, value: bytes) -> None:
    """Any bytes as the Content-Encoding value of a call (sent raw, so the client library
    cleans nothing): 400 or 415 in the error shape; 415 whenever a printable value names a
    coding the gateway does not take."""
    status, headers, body = _raw(
        gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + api_key.encode() + b"\r\n"
        b"Content-Encoding: " + value + b"\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    assert status in (400, 415), (status, body)
    assert headers.get("content-type", "").startswith("application/json"), headers
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    tokens = {t.strip(b" \t").lower() for t in value.split(b",")} - {b"", b"identity"}
    if all(32 <= c < 127 for c in value) and tokens - {b"gzip", b"x-gzip", b"deflate"}:
        assert (status, error["code"]) == (415, "unsupported_content_encoding")


# -- decoded and forwarded -------------------------------------------------------------------


async def _last_request(mock: Proc) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(mock.url + "/debug/last-request") as r,
    ):
        return dict(await r.json())


@pytest.mark.parametrize(
    ("header", "packed"),
    [
        ("gzip", gzip.compress(CHAT_BYTES)),
        ("x-gzip", gzip.compress(CHAT_BYTES)),
        ("deflate", _zlib(CHAT_BYTES)),
        ("deflate", _raw_deflate(CHAT_BYTES)),
        ("gzip, gzip", gzip.compress(gzip.compress(CHAT_BYTES))),
        ("deflate, gzip", gzip.compress(_zlib(CHAT_BYTES))),
        ("gzip", gzip.compress(CHAT_BYTES[:20]) + gzip.compress(CHAT_BYTES[20:])),
    ],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "gzip-gzip", "deflate-gzip", "members"],
)
async def test_decoded_body_goes_upstream_without_encoding(
    gateway: Proc, mock_a: Proc, auth: dict[str, str], header: str, packed: bytes
) -> None:
    """An encoded call is answered as the plain one, and the upstream receives the decoded
    bytes with neither Content-Encoding, the client's length nor its digests."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + "/v1/chat/completions",
            data=packed,
            headers={
                **auth,
                "Content-Type": "application/json",
                "Content-Encoding": header,
                # Digests of the encoded bytes: wrong for what goes upstream.
                "Content-MD5": "Q2hlY2sgSW50ZWdyaXR5IQ==",
                "Content-Digest": "sha-256=:X48E9qOokqqrvdts8nOJRJN3OWDUoyWxBf7kbu9DBPE=:",
            },
        ) as resp,
    ):
        assert resp.status == 200, await resp.read()
        answer = await resp.json()
    assert answer["object"] == "chat.completion"
    seen = await _last_request(mock_a)
    assert seen["body"] == CHAT_BYTES.decode()
    names = {name.lower() for name in seen["headers"]}
    assert not names & {"content-encoding", "content-md5", "content-digest"}, names
    assert int(seen["headers"].get("Content-Length", len(CHAT_BYTES))) == len(CHAT_BYTES)


def test_two_content_encoding_lines_are_stacked(gateway: Proc, api_key: str) -> None:
    """`Content-Encoding: gzip` twice is `gzip, gzip` (RFC 9110 section 5.3)."""
    packed = gzip.compress(gzip.compress(CHAT_BYTES))
    status, _, body = _raw(
        gateway,
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + api_key.encode() + b"\r\n"
        b"Content-Encoding: gzip\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(packed) + packed,
    )
    assert status == 200, body
    assert orjson.loads(body)["object"] == "chat.completion"


@pytest.mark.parametrize("header", ["x-gzip", "gzip, gzip", "deflate, gzip"])
def test_admin_takes_encoded_bodies(admin: Admin, header: str) -> None:
    """The admin API decodes as the data plane does: an account created and topped up with
    encoded bodies (a raw deflate one among them)."""
    account_id = "enc-" + uuid.uuid4().hex[:12]
    created = admin.call(
        "POST",
        "/admin/accounts",
        raw=encode(orjson.dumps({"id": account_id}), header),
        headers={"Content-Encoding": header},
    )
    assert created.status == 201, created.body
    topup = admin.call(
        "POST",
        f"/admin/accounts/{account_id}/topups",
        raw=_raw_deflate(b'{"amount": "2.50"}'),
        headers={"Content-Encoding": "deflate", "Idempotency-Key": uuid.uuid4().hex},
    )
    assert topup.status in (200, 201), topup.body
    assert Decimal(admin.account(account_id)["balance"]) == Decimal("2.50")


# -- refused ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", ["br", "zstd", "foo", "gzip, br", "deflate, foo", "br, gzip"])
async def test_unsupported_coding_is_415_and_never_forwarded(
    target: dict[str, Any], mock_a: Proc, header: str
) -> None:
    """A coding the gateway does not decode is 415 naming the ones it does, on a call (whose
    body is otherwise valid JSON) and on a top-up; nothing reaches the upstream, nothing is
    charged or credited."""
    before = _balances(target)
    marker = await _last_request(mock_a)
    call = _send(target, "POST", "/v1/chat/completions", True, CHAT_BYTES, header)
    topup = _send(
        target,
        "POST",
        f"/admin/accounts/{target['account']}/topups",
        False,
        b'{"amount": "1.00"}',
        header,
    )
    for reply in (call, topup):
        assert reply.status == 415, reply.body
        error = _error(reply)
        assert (error["type"], error["code"]) == (
            "invalid_request_error",
            "unsupported_content_encoding",
        )
        assert "gzip" in error["message"]
        assert "deflate" in error["message"]
        assert reply.headers.get("Accept-Encoding") == "gzip, deflate"
        assert reply.headers.get("x-request-id", "").startswith("req_")
    assert await _last_request(mock_a) == marker
    assert _balances(target) == before


_GZ = gzip.compress(CHAT_BYTES)
_ZL = _zlib(CHAT_BYTES)


@pytest.mark.parametrize(
    ("header", "body"),
    [
        ("gzip", _GZ[:-8]),  # no trailer (CRC and length)
        ("gzip", _GZ[:-3]),
        ("gzip", _GZ[:10]),  # the header alone
        ("gzip", _GZ + b"trailing"),
        ("gzip", b"not gzip at all"),
        ("deflate", _ZL[:-4]),  # no Adler-32
        ("deflate", _ZL + b"x"),
        ("deflate", b"\xff\xfe garbage"),
        ("gzip, gzip", _GZ),  # one layer short
    ],
    ids=[
        "gzip-no-trailer",
        "gzip-cut",
        "gzip-header-only",
        "gzip-trailing",
        "gzip-garbage",
        "zlib-no-checksum",
        "zlib-trailing",
        "deflate-garbage",
        "gzip-gzip-one-layer",
    ],
)
def test_undecodable_body_is_400(target: dict[str, Any], header: str, body: bytes) -> None:
    """A body that does not decode in full, or has bytes after its end, is 400
    `invalid_request` saying which coding failed, on a call and on a top-up; no money moves."""
    before = _balances(target)
    call = _send(target, "POST", "/v1/chat/completions", True, body, header)
    topup = _send(
        target,
        "POST",
        f"/admin/accounts/{target['account']}/topups",
        False,
        body,
        header,
    )
    for reply in (call, topup):
        assert reply.status == 400, reply.body
        error = _error(reply)
        assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
        assert header.split(",")[0].strip() in error["message"]
    assert _balances(target) == before


@pytest.mark.parametrize("header", ["x-gzip", "gzip, gzip"])
def test_decompression_bomb_is_413(target: dict[str, Any], header: str) -> None:
    """A small body that inflates past server.max_body_bytes (10 MiB) is 413, checked while it
    inflates, one layer or two."""
    bomb = encode(b"\0" * (11 * 1024 * 1024), header)
    assert len(bomb) < 64 * 1024
    reply = _send(target, "POST", "/v1/chat/completions", True, bomb, header)
    assert reply.status == 413, reply.body
    assert _error(reply)["code"] == "request_too_large"


# -- the HTTP parser's own answers -----------------------------------------------------------


def _raw(gateway: Proc, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send bytes as they are; the status, headers (lower-cased) and body of the answer."""
    url = urllib.parse.urlsplit(gateway.url)
    with socket.create_connection((url.hostname, url.port), timeout=15) as sock:
        sock.sendall(data)
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buffer += chunk
        head, _, rest = buffer.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, headers, rest[:length]


_CALL = b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "request_bytes",
    [
        _CALL + b"X-Bad: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
        _CALL + b"Content-Length: abc\r\n\r\n{}",
        _CALL + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        _CALL + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n{}",
        _CALL + b"Transfer-Encoding: chunked\r\n\r\n2\r\n{}\r\nZZ\r\n\r\n",
        _CALL + b"Bad Header Name: x\r\nContent-Length: 2\r\n\r\n{}",
        _CALL + b"X-Long: " + b"a" * 9000 + b"\r\nContent-Length: 2\r\n\r\n{}",
        b"POST /admin/accounts HTTP/1.1\r\nHost: gw\r\nContent-Length: -1\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03 TLS to a plain port\r\n\r\n",
        b"GET /v1/models HTTP/9.9\r\nHost: gw\r\n\r\n",
    ],
    ids=[
        "header-value-control-char",
        "content-length-not-a-number",
        "content-length-twice",
        "content-length-and-chunked",
        "chunk-size-not-hex",
        "header-name-with-space",
        "header-line-too-long",
        "content-length-negative",
        "tls-hello",
        "bad-version",
    ],
)
def test_parser_errors_are_json(gateway: Proc, request_bytes: bytes) -> None:
    """What aiohttp's parser refuses (before any handler runs) is 400 in OpenAI's shape with
    a JSON content type and an x-request-id, not aiohttp's text/plain."""
    status, headers, body = _raw(gateway, request_bytes)
    assert status == 400, (status, body)
    assert headers.get("content-type", "").startswith("application/json"), (headers, body)
    error = orjson.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_request")
    assert error["message"].startswith("malformed HTTP request")
    assert headers.get("x-request-id", "").startswith("req_")


async def test_error_escaping_every_middleware_is_json() -> None:
    """An exception that gets past every middleware is answered by aiohttp's protocol: a 500
    in OpenAI's shape, not text/plain."""
    from gateway.api.protocol import answer_protocol_errors_in_json

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application()
    app.router.add_get("/", broken)
    answer_protocol_errors_in_json(app)
    async with TestClient(TestServer(app)) as client:
        resp = await client.get("/")
        assert resp.status == 500
        assert resp.headers["Content-Type"].startswith("application/json")
        error = (await resp.json())["error"]
    assert error == {
        "message": "internal server error",
        "type": "server_error",
        "param": None,
        "code": "internal_error",
    }
