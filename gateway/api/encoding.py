"""A client's body in a content coding: decoded in full before any handler reads it, or refused.

aiohttp's own request decoder is off (`auto_decompress=False` in `create_app`). On its own it
took a gzip body cut short (without its trailer, or with nothing but its header) as whole,
left a handler waiting for the rest of a zlib body whose checksum was missing, and surfaced a
body it could not decode as an exception that became a 500; a coding it does not know (`foo`,
`gzip, gzip`) passed through undecoded with its header. The gateway must parse the JSON it
meters, and it sends the decoded bytes upstream (without `Content-Encoding`), so here:

- `gzip` (and its old name `x-gzip`) and `deflate` (zlib-wrapped as RFC 9110 defines it, or a
  bare deflate stream as some clients send) are decoded, several listed in the order applied
  (`gzip, gzip`) undone in reverse; `identity` is no coding at all.
- A body that does not decode, is cut short, or has bytes after its stream's end is 400
  `invalid_request`; one that decodes to more than `server.max_body_bytes` is 413, checked as
  it inflates (a small bomb never grows past the limit).
- Any other coding, `br` and `zstd` included, is 415 with `Accept-Encoding: gzip, deflate`
  (RFC 9110 sections 15.5.16 and 12.5.3): an API client gets a clear refusal rather than a body
  the gateway could not meter. Decoding them would take a compiled dependency each (`brotli`;
  `backports.zstd` before Python 3.14) for codings no OpenAI client sends.

A request without a body (`request.body_exists` false) is left alone whatever its header says.
An encoded body is read and decoded by errors_middleware before the handler runs, and so
before the data plane checks the key: a call with a bad key and a bad coding is 415 or 400,
not 401 (a plain body is still read after the key check).
"""

from __future__ import annotations

import asyncio
import zlib
from collections.abc import Callable

from aiohttp import hdrs, web
from multidict import CIMultiDictProxy

from gateway.api.body import read_body
from gateway.errors import InvalidRequest, RequestTooLarge, UnsupportedEncoding
from gateway.keys import CONFIG

__all__ = ["ACCEPTED", "content_codings", "decode", "decode_request_body"]

ACCEPTED = "gzip, deflate"
MAX_CODINGS = 4  # stacked codings undone, at most; each layer is bounded by the same limit
MAX_GZIP_MEMBERS = 1024  # concatenated gzip members (RFC 1952 section 2.2), as aiohttp caps them

_NAMES = {"gzip": "gzip", "x-gzip": "gzip", "deflate": "deflate"}
_GZIP_MAGIC = b"\x1f\x8b"  # how a gzip member begins (RFC 1952 section 2.3.1)


def _shown(token: str) -> str:
    """A client's token, safe to quote in an error (ASCII, short)."""
    return token.strip(" \t")[:40].encode("ascii", "backslashreplace").decode("ascii")


def content_codings(headers: CIMultiDictProxy[str]) -> tuple[str, ...]:
    """The codings applied to the body, in the order applied (`identity` left out); 415 for
    one the gateway does not decode."""
    codings: list[str] = []
    for value in headers.getall(hdrs.CONTENT_ENCODING, ()):
        for token in value.split(","):
            name = token.strip(" \t").lower()
            if not name or name == "identity":
                continue
            coding = _NAMES.get(name)
            if coding is None:
                raise UnsupportedEncoding(
                    f"Content-Encoding '{_shown(token)}' is not supported: send the body as "
                    f"{ACCEPTED.replace(', ', ' or ')}, or uncompressed",
                    ACCEPTED,
                )
            codings.append(coding)
    if len(codings) > MAX_CODINGS:
        raise UnsupportedEncoding(
            f"the body lists {len(codings)} content codings; at most {MAX_CODINGS} are undone",
            ACCEPTED,
        )
    return tuple(codings)


def _inflate(data: bytes, wbits: int, limit: int, coding: str, members: int = 1) -> bytes:
    """Undo one zlib-family coding in full: at most `limit` bytes out, at most `members`
    streams back to back (gzip's), nothing after the last one's end."""
    out = bytearray()
    for member in range(1, members + 1):
        stream = zlib.decompressobj(wbits)
        pending = data
        while True:
            try:
                # max_length bounds what one call returns (0 would mean unbounded: never 0 here).
                chunk = stream.decompress(pending, limit + 1 - len(out))
            except zlib.error as exc:
                raise InvalidRequest(f"request body is not valid {coding} data ({exc})") from None
            out += chunk
            if len(out) > limit:
                raise RequestTooLarge(
                    f"request body decodes to more than the limit of {limit} bytes"
                )
            if stream.eof:
                break
            pending = stream.unconsumed_tail
            if not chunk and not pending:
                raise InvalidRequest(f"request body is {coding} data cut short")
        data = stream.unused_data
        if not data:
            return bytes(out)
        if member == members or not data.startswith(_GZIP_MAGIC):
            break
    raise InvalidRequest(
        f"request body has {len(data)} bytes after the end of its {coding} data"
        if members == 1 or not data.startswith(_GZIP_MAGIC)
        else f"request body has more than {members} {coding} members"
    )


def _gzip(data: bytes, limit: int) -> bytes:
    return _inflate(data, 16 + zlib.MAX_WBITS, limit, "gzip", MAX_GZIP_MEMBERS)


def _deflate(data: bytes, limit: int) -> bytes:
    # RFC 9110's deflate is a zlib stream (RFC 1950); some clients send bare deflate (RFC 1951).
    # A valid zlib header picks the first; a bare stream that happens to look like one is
    # tried bare when it does not decode as zlib.
    if len(data) >= 2 and data[0] & 0x0F == 8 and int.from_bytes(data[:2], "big") % 31 == 0:
        try:
            return _inflate(data, zlib.MAX_WBITS, limit, "deflate")
        except InvalidRequest as exc:
            try:
                return _inflate(data, -zlib.MAX_WBITS, limit, "deflate")
            except InvalidRequest:
                raise exc from None
    return _inflate(data, -zlib.MAX_WBITS, limit, "deflate")


_DECODERS: dict[str, Callable[[bytes, int], bytes]] = {"gzip": _gzip, "deflate": _deflate}


def decode(body: bytes, codings: tuple[str, ...], limit: int) -> bytes:
    """`body` with `codings` (in the order applied) undone; 400 or 413 as above."""
    for coding in reversed(codings):
        if not body:
            break  # no content: nothing was encoded
        body = _DECODERS[coding](body, limit)
    return body


async def decode_request_body(request: web.Request) -> None:
    """Read and decode an encoded body, so that `request.read()` gives the decoded bytes."""
    if not request.body_exists:
        return
    codings = content_codings(request.headers)
    if not codings:
        return
    server = request.config_dict[CONFIG].snapshot.settings.server
    raw = await read_body(request, server.max_body_bytes, server.read_timeout)
    # Off the loop: a body at the limit takes tens of milliseconds to inflate.
    decoded = await asyncio.to_thread(decode, raw, codings, server.max_body_bytes)
    # aiohttp keeps what read() returned here; no public way to hand a handler other bytes.
    request._read_bytes = decoded
