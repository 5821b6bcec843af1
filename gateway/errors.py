"""Errors a client can see, each with its status and OpenAI-shaped JSON body.

Handlers raise these; one middleware turns them into responses, so the shape
`{"error": {"message", "type", "param", "code"}}` is written in one place. On Anthropic's
routes (`/v1/messages...`) the same error is written in Anthropic's shape,
`{"type": "error", "error": {"type", "message"}, "request_id"}`, with the same status: its
type is Anthropic's word for that status (its API reference's error table), and the
gateway's own code is kept beside it (`error.code`), since one status covers several
refusals (402: insufficient balance, frozen account, cost cap).
"""

from __future__ import annotations

from typing import ClassVar

import orjson
from aiohttp import web

__all__ = [
    "AccountCleared",
    "AccountExists",
    "AccountFrozen",
    "AccountInArrears",
    "AccountNotFound",
    "AdminUnauthorized",
    "ApiNotServed",
    "CostCapExceeded",
    "GatewayError",
    "HistoryUnavailable",
    "IdempotencyConflict",
    "InsufficientBalance",
    "InternalError",
    "InvalidApiKey",
    "InvalidRequest",
    "KeyBudgetExceeded",
    "KeyExpired",
    "KeyRevoked",
    "LedgerScriptError",
    "LedgerUnavailable",
    "MethodNotAllowed",
    "ModelNotAllowedForKey",
    "ModelNotFound",
    "ModelNotSubscribed",
    "NotFound",
    "RateLimited",
    "RequestTimeout",
    "RequestTooLarge",
    "UnsupportedEncoding",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "anthropic_error_body",
    "error_body",
    "error_response",
]


def error_body(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    """The JSON bytes of an OpenAI-shaped error."""
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class GatewayError(Exception):
    """Base of every error the gateway answers with; subclasses fix status, type and code."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str] = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """Extra response headers (e.g. `Retry-After`)."""
        return {}


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedEncoding(GatewayError):
    """A body in a content coding the gateway does not decode (RFC 9110 section 15.5.16): 415,
    with `Accept-Encoding` naming the codings it does decode (section 12.5.3)."""

    status = 415
    type = "invalid_request_error"
    code = "unsupported_content_encoding"

    def __init__(self, message: str, accepted: str) -> None:
        super().__init__(message)
        self.accepted = accepted

    def headers(self) -> dict[str, str]:
        return {"Accept-Encoding": self.accepted}


class _UpstreamError(GatewayError):
    """An upstream failure, naming for the metrics each upstream that failed the call (its
    `host:port` label) with how: refused before it (`upstream_unavailable`), then this one."""

    def __init__(
        self, message: str, *, upstreams: tuple[str, ...] = (), refused: tuple[str, ...] = ()
    ) -> None:
        super().__init__(message)
        self.failures = tuple((label, UpstreamUnavailable.code) for label in refused) + tuple(
            (label, self.code) for label in upstreams
        )


class UpstreamUnavailable(_UpstreamError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(_UpstreamError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class LedgerUnavailable(GatewayError):
    """Redis did not answer: the gateway fails closed rather than serve unmetered."""

    status = 503
    type = "server_error"
    code = "ledger_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class HistoryUnavailable(GatewayError):
    """The usage history's database does not answer a read (the ledger itself is fine)."""

    status = 503
    type = "server_error"
    code = "history_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "5"}


class LedgerScriptError(GatewayError):
    """The store answered, and refused the operation: a ledger script failed inside Redis (a
    Lua error, an overflowing increment). Not an outage, so not 503: retrying cannot help, and
    `/readyz` stays ready. 500, logged with the script's name."""

    status = 500
    type = "server_error"
    code = "internal_error"


class InvalidApiKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class KeyExpired(GatewayError):
    """The key's `expires_at` has passed (admin API): refused on every instance from then."""

    status = 401
    type = "invalid_request_error"
    code = "key_expired"


class AdminUnauthorized(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "unauthorized"


class InsufficientBalance(GatewayError):
    status = 402
    type = "insufficient_quota"
    code = "insufficient_balance"


class KeyBudgetExceeded(GatewayError):
    """The key's spend in its budget period plus its open holds would pass its budget."""

    status = 402
    type = "insufficient_quota"
    code = "key_budget_exceeded"


class ApiNotServed(GatewayError):
    """No upstream of the model speaks the API the call is for (upstreams' `apis`)."""

    status = 400
    type = "invalid_request_error"
    code = "api_not_served"


class CostCapExceeded(GatewayError):
    """The client's own cap (`x-gateway-max-cost`) does not cover the call's prompt."""

    status = 402
    type = "insufficient_quota"
    code = "cost_cap_exceeded"


class ModelNotSubscribed(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_subscribed"


class ModelNotAllowedForKey(GatewayError):
    """The key's own model list (admin API) does not name the model."""

    status = 403
    type = "permission_error"
    code = "model_not_allowed_for_key"


class AccountFrozen(GatewayError):
    status = 403
    type = "permission_error"
    code = "account_frozen"


class AccountCleared(GatewayError):
    status = 403
    type = "permission_error"
    code = "account_cleared"


class AccountInArrears(GatewayError):
    status = 403
    type = "permission_error"
    code = "account_in_arrears"


class AccountNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "account_not_found"


class AccountExists(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "account_exists"


class KeyRevoked(GatewayError):
    """A revoked key cannot be changed or rotated (it never works again)."""

    status = 409
    type = "invalid_request_error"
    code = "key_revoked"


class IdempotencyConflict(GatewayError):
    status = 409
    type = "invalid_request_error"
    code = "idempotency_conflict"


class RateLimited(GatewayError):
    """A rate limit is exhausted: 429 with `Retry-After` and the x-ratelimit-* headers."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after: int, headers: dict[str, str]) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self._headers = headers

    def headers(self) -> dict[str, str]:
        return {**self._headers, "Retry-After": str(self.retry_after)}


class InternalError(GatewayError):
    status = 500
    type = "server_error"
    code = "internal_error"


# Anthropic's error type for each status it documents; any other 4xx is invalid_request_error,
# any other 5xx api_error.
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_body(exc: GatewayError, request_id: str | None) -> bytes:
    """The JSON bytes of `exc` in Anthropic's error shape (see the module docstring)."""
    kind = _ANTHROPIC_TYPES.get(exc.status)
    if kind is None:
        kind = "api_error" if exc.status >= 500 else "invalid_request_error"
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": kind, "message": exc.message, "code": exc.code},
            "request_id": request_id,
        }
    )


def error_response(
    exc: GatewayError, anthropic: bool = False, request_id: str | None = None
) -> web.Response:
    """Render `exc` as the HTTP answer a client sees (in Anthropic's shape on its routes)."""
    body = (
        anthropic_error_body(exc, request_id)
        if anthropic
        else error_body(exc.message, exc.type, exc.code, exc.param)
    )
    return web.Response(
        status=exc.status, body=body, content_type="application/json", headers=exc.headers()
    )
