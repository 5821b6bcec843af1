"""Every answer gets an `x-request-id`, and every failure the OpenAI error shape (Anthropic's
on Anthropic's routes, `/v1/messages...`)."""

from __future__ import annotations

import asyncio

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from gateway.api.encoding import decode_request_body
from gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTimeout,
    RequestTooLarge,
    error_response,
)
from gateway.keys import REQUEST_ID
from gateway.observability.access import ERROR_CODE
from gateway.observability.logging import get_logger
from gateway.request_ids import new_request_id

__all__ = ["attach_request_id", "errors_middleware"]

log = get_logger("gateway.api")


def _from_http_exception(exc: web.HTTPException) -> GatewayError:
    if exc.status == 404:
        return NotFound("no such route")
    if exc.status == 405:
        return MethodNotAllowed("method not allowed on this route")
    if exc.status == 413:
        return RequestTooLarge("request body is larger than the configured limit")
    return InvalidRequest(exc.reason or "bad request")


def _from_payload_error(exc: web.RequestPayloadError) -> InvalidRequest:
    """A body whose framing broke as it was read (bad chunked framing, cut short)."""
    cause = exc.__cause__
    detail = cause.message if isinstance(cause, HttpProcessingError) else str(exc)
    detail = " ".join(detail.split())[:200].encode("ascii", "backslashreplace").decode("ascii")
    return InvalidRequest(f"request body is malformed: {detail}")


ANTHROPIC_ROUTES = "/v1/messages"


def _render(request: web.Request, error: GatewayError) -> web.Response:
    return error_response(error, request.path.startswith(ANTHROPIC_ROUTES), request.get(REQUEST_ID))


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every raised error into an OpenAI-shaped answer (and note its code for the log).

    A body in a content coding is decoded here, before any handler reads it (see
    gateway.api.encoding); one whose framing breaks while it is read is 400."""
    if REQUEST_ID not in request:
        request[REQUEST_ID] = new_request_id()
    try:
        if hdrs.CONTENT_ENCODING in request.headers:
            await decode_request_body(request)
        return await handler(request)
    except GatewayError as exc:
        request[ERROR_CODE] = exc.code
        response = _render(request, exc)
        if isinstance(exc, RequestTimeout):
            # The rest of a slow body is not worth waiting for: answer, then hang up.
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            if request.transport is not None:
                request.transport.close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        error = _from_http_exception(exc)
        request[ERROR_CODE] = error.code
        return _render(request, error)
    except web.RequestPayloadError as exc:
        error = _from_payload_error(exc)
        request[ERROR_CODE] = error.code
        response = _render(request, error)
        response.force_close()  # the rest of the stream cannot be framed
        return response
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error", request_id=request[REQUEST_ID], path=request.path)
        return _render(request, InternalError("internal error"))


async def attach_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare` hook: streamed answers get the header before their first byte."""
    request_id = request.get(REQUEST_ID)
    if request_id is None:
        request_id = request[REQUEST_ID] = new_request_id()
    response.headers["x-request-id"] = request_id
