"""The console sub-application, mounted at /console: its middleware and routes.

Every answer carries a Content-Security-Policy that lets the page load only the gateway's own
files (the vendored chart library included: no CDN), and is never framed. A page needs a login
(`sessions`); every POST needs the login's CSRF token in its form. Errors are pages with a
sentence, never a traceback.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp_jinja2
import jinja2
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.console import pages
from gateway.console.sessions import COOKIE, Sessions
from gateway.errors import GatewayError
from gateway.keys import STORE
from gateway.observability.logging import get_logger

__all__ = ["create_console_app"]

log = get_logger("gateway.console")

HERE = Path(__file__).parent
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


@web.middleware
async def console_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Load the login, check the CSRF token of a POST, turn an error into a page, and put the
    security headers on every answer."""
    try:
        sessions = Sessions(request.config_dict[STORE])
        token = request.cookies.get(COOKIE)
        session = await sessions.get(token)
        if session is not None and not await pages.still_valid(request, session):
            await sessions.close(token)
            session = None
        if session is not None:
            request[pages.SESSION] = session
        if request.method == "POST" and request.path not in pages.OPEN_POSTS:
            await pages.check_csrf(request)
        response = await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # a redirect
        response = pages.error_page(request, exc.status, exc.reason or "This page is not here.")
    except GatewayError as exc:
        response = pages.error_page(request, exc.status, exc.message)
    except Exception:
        log.exception("console page failed", path=request.path)
        response = pages.error_page(request, 500, "Something went wrong; the log says what.")
    response.headers.update(SECURITY_HEADERS)
    return response


def create_console_app() -> web.Application:
    app = web.Application(middlewares=[console_middleware])
    aiohttp_jinja2.setup(
        app,
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=jinja2.select_autoescape(default=True),
        undefined=jinja2.StrictUndefined,
    )
    app.add_routes(pages.routes)
    app.router.add_static("/static", HERE / "static")
    return app
