"""Typed keys of the objects the aiohttp application carries."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from gateway.config.reload import Reloader
from gateway.ledger import Ledger
from gateway.observability.metrics import Metrics
from gateway.state import ConfigHolder

__all__ = [
    "CONFIG",
    "HTTP",
    "LEDGER",
    "METRICS",
    "RELOADER",
    "REQUEST_ID",
    "SETTLEMENTS",
    "STORE",
    "STORE_URL",
]

CONFIG = web.AppKey("config", ConfigHolder)
STORE_URL = web.AppKey("store_url", str)
STORE = web.AppKey("store", aioredis.Redis)
HTTP = web.AppKey("http", aiohttp.ClientSession)
LEDGER = web.AppKey("ledger", Ledger)
METRICS = web.AppKey("metrics", Metrics)
RELOADER = web.AppKey("reloader", Reloader)
# Settlements still running after their call was cut (shutdown): awaited before Redis closes.
SETTLEMENTS = web.AppKey("settlements", set[asyncio.Task[None]])

# The id of each request, set first thing and sent back as `x-request-id`.
REQUEST_ID = web.RequestKey("request_id", str)
