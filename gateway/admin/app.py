"""The admin sub-application, mounted at /admin: one middleware guards every route."""

from __future__ import annotations

import hmac
import os

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.admin import routes
from gateway.errors import AdminUnauthorized
from gateway.keys import CONFIG

__all__ = ["create_admin_app"]


@web.middleware
async def admin_auth(request: web.Request, handler: Handler) -> web.StreamResponse:
    """401 unless `Authorization: Bearer <token>` matches the configured token, compared in
    constant time; with no token configured, the admin API refuses everything."""
    settings = request.config_dict[CONFIG].snapshot.settings
    expected = os.environ.get(settings.server.admin_token_env, "")
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else ""
    if not expected:
        raise AdminUnauthorized(
            f"the admin API is disabled: set {settings.server.admin_token_env} to enable it"
        )
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise AdminUnauthorized("missing or wrong admin token")
    return await handler(request)


def create_admin_app() -> web.Application:
    """The /admin routes behind the token check."""
    app = web.Application(middlewares=[admin_auth])
    app.add_routes(routes.routes)
    return app
