"""Probes for SREs: /healthz (the process lives) and /readyz (config loaded, store answers)."""

from __future__ import annotations

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from gateway.keys import CONFIG, METRICS, STORE
from gateway.store.client import ping_store

__all__ = ["routes"]


async def healthz(request: web.Request) -> web.Response:
    """GET /healthz: 200 while the process can answer at all."""
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def readyz(request: web.Request) -> web.Response:
    """GET /readyz: 200 when this instance can meter calls, else 503 with the reason. On a
    Redis Cluster every primary must answer (an account's calls need its slot's primary): the
    reason names each one that does not. Answers within about a second (`PING_TIMEOUT`)."""
    reason: str | None = None
    if CONFIG not in request.app:
        reason = "config not loaded"
    else:
        reason = await ping_store(request.app[STORE])
    if reason is None:
        return web.Response(body=b'{"status":"ready"}', content_type="application/json")
    body = orjson.dumps({"status": "unavailable", "reason": reason})
    return web.Response(status=503, body=body, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    body = request.app[METRICS].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


routes = [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]
