"""Which headers cross the proxy, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection and never pass. The
client's `Authorization` is the gateway's key and must never reach an upstream; the
upstream's own key replaces it. Length and encoding are recomputed by the side that writes:
the body sent upstream is the one the gateway decoded (gateway.api.encoding), so the client's
`Content-Encoding` would describe bytes the upstream never gets.
"""

from __future__ import annotations

from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

__all__ = ["HOP_BY_HOP", "request_headers", "response_headers"]

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

# Not forwarded upstream: the connection-level set, plus what the gateway owns or recomputes.
_DROP_UPSTREAM = HOP_BY_HOP | {
    "host",
    "authorization",
    "content-length",
    "content-encoding",
    # Digests of the client's bytes: what goes upstream is decoded, and may be re-encoded.
    "content-md5",
    "content-digest",
    "repr-digest",
    "accept-encoding",
    "cookie",
    "x-request-id",
    "expect",
}
# Not relayed to the client: aiohttp writes its own framing, date and server.
_DROP_DOWNSTREAM = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server"}


def _named_in_connection(headers: Mapping[str, str]) -> set[str]:
    """Headers that `Connection: a, b` marks as hop-by-hop for this one message."""
    value = headers.get("Connection")
    if not value:
        return set()
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def request_headers(
    incoming: CIMultiDictProxy[str], api_key: str | None, request_id: str
) -> CIMultiDict[str]:
    """Headers to send upstream for a client request."""
    extra = _named_in_connection(incoming)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in incoming.items():
        lower = name.lower()
        if lower in _DROP_UPSTREAM or lower in extra:
            continue
        out.add(name, value)
    out["Accept-Encoding"] = "identity"
    out["X-Request-Id"] = request_id
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def response_headers(upstream: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """Headers to relay to the client from an upstream answer."""
    extra = _named_in_connection(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower in _DROP_DOWNSTREAM or lower in extra:
            continue
        out.add(name, value)
    return out
