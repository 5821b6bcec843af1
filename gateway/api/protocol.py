"""aiohttp's own answers, to requests it cannot parse, in the OpenAI error shape.

A request that aiohttp's HTTP parser refuses (a malformed request line or header, a bad
`Content-Length`, `Transfer-Encoding` beside `Content-Length`, broken chunked framing in the
bytes that came with the headers) never reaches the application, its middlewares or its
signals: the connection's protocol object answers it itself through
`RequestHandler.handle_error`, in text/plain. So do errors that escape every middleware (500)
and a handler's uncaught `TimeoutError` (504). aiohttp has no public hook for those answers
(aio-libs/aiohttp#3287), so `answer_protocol_errors_in_json` makes the application's server
build protocol objects of a subclass whose `handle_error` writes the same status with an
OpenAI-shaped JSON body and an `x-request-id`. aiohttp still logs the error and closes the
connection after the answer, as before.

What stays out of reach: nothing is answered when the client closes before a request line
is complete, on an idle or keep-alive timeout, or when the answer to the request had already
begun (aiohttp drops the connection); and a framing error in bytes that arrive after the
handler started leaves that handler waiting for the rest of its body (aiohttp tells the
request's payload nothing) until the read times out, 408 on the data plane.
"""

from __future__ import annotations

import warnings
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from gateway.errors import error_body
from gateway.request_ids import new_request_id

__all__ = ["answer_protocol_errors_in_json"]


def _detail(exc: BaseException | None, message: str | None) -> str:
    """aiohttp's description of a parse error on one line: its pointer line ('   ^') gone."""
    text = message or (str(exc) if exc is not None else "")
    lines = [line.strip() for line in text.splitlines()]
    kept = " ".join(line for line in lines if line and set(line) != {"^"})
    return kept[:300].encode("ascii", "backslashreplace").decode("ascii")


class _JsonErrorsProtocol(RequestHandler):
    """aiohttp's protocol, answering what it handles itself in the OpenAI error shape."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        # aiohttp's own: logs the error, raises ConnectionError if an answer has begun.
        super().handle_error(request, status, exc, message)
        if status < 500:
            detail = _detail(exc, message)
            text = f"malformed HTTP request: {detail}" if detail else "malformed HTTP request"
            body = error_body(text, "invalid_request_error", "invalid_request")
        else:
            try:
                phrase = HTTPStatus(status).phrase.lower()
            except ValueError:
                phrase = "server error"
            body = error_body(phrase, "server_error", "internal_error")
        response = web.Response(
            status=status,
            body=body,
            content_type="application/json",
            headers={"x-request-id": new_request_id()},
        )
        response.force_close()
        return response


class _JsonErrorsServer(web.Server):
    """aiohttp's server, whose connections get `_JsonErrorsProtocol`."""

    def __call__(self) -> RequestHandler:
        return _JsonErrorsProtocol(self, loop=self._loop, **self._kwargs)


def answer_protocol_errors_in_json(app: web.Application) -> None:
    """Make the server that runs `app` (web.run_app, AppRunner, TestServer) answer its own
    errors as JSON."""
    make_server = app._make_handler

    def make_handler(**kwargs: Any) -> web.Server:
        server = make_server(**kwargs)
        # The same server, made by aiohttp with all its settings; only its protocol differs.
        server.__class__ = _JsonErrorsServer
        return server

    with warnings.catch_warnings():
        # Deliberate: aiohttp's debug mode warns on any attribute it does not know.
        warnings.simplefilter("ignore", DeprecationWarning)
        app._make_handler = make_handler  # type: ignore[method-assign]
