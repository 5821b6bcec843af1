"""Which headers cross the proxy, in each direction.

Hop-by-hop headers (RFC 9110 section 7.6.1) describe one connection and never pass. The
client's `Authorization` is the gateway's key and must never reach an upstream; the
upstream's own key replaces it. Length and encoding are recomputed by the side that writes:
the body sent upstream is the one the gateway decoded (gateway.api.encoding), so the client's
`Content-Encoding` would describe bytes the upstream never gets.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config.schema import DEFAULT_RESPONSE_HEADERS
from gateway.request_ids import upstream_request_id

__all__ = ["DEFAULT_RESPONSE_HEADERS", "HOP_BY_HOP", "request_headers", "response_headers"]

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
    "x-api-key",
    "content-length",
    "content-type",
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
# The gateway's own headers: never taken from an upstream, whatever the list says. Its
# x-ratelimit-* describe the account's limits at the gateway, not the operator's at the
# upstream; its x-request-id keys the call's billing record.
_OURS = frozenset({"x-request-id"})
_OURS_PREFIXES = ("x-ratelimit-",)


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
    # Every call the gateway forwards carries a JSON body it has parsed, whatever the client
    # labelled it (curl without -H says application/x-www-form-urlencoded).
    out["Content-Type"] = "application/json"
    out["X-Request-Id"] = upstream_request_id(request_id)
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


@functools.lru_cache(maxsize=64)
def _allowlist(names: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The exact names and the prefixes of a `proxy.response_headers` list."""
    exact = frozenset({"content-type"} | {n.lower() for n in names if not n.endswith("*")})
    prefixes = tuple(n[:-1].lower() for n in names if n.endswith("*"))
    return exact, prefixes


def response_headers(
    upstream: CIMultiDictProxy[str], allowed: tuple[str, ...] = DEFAULT_RESPONSE_HEADERS
) -> CIMultiDict[str]:
    """Headers to relay to the client from an upstream answer: those `allowed` names, less
    the connection's own and the gateway's."""
    exact, prefixes = _allowlist(allowed)
    extra = _named_in_connection(upstream)
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in exact and not (prefixes and lower.startswith(prefixes)):
            continue
        if lower in _DROP_DOWNSTREAM or lower in extra or lower in _OURS:
            continue
        if lower.startswith(_OURS_PREFIXES):
            continue
        out.add(name, value)
    return out
