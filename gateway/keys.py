"""Typed keys of the objects the aiohttp application carries."""

from __future__ import annotations

import asyncio

import aiohttp
import redis.asyncio as aioredis
from aiohttp import web

from gateway.config.reload import Reloader
from gateway.history.reader import HistoryReader
from gateway.ledger import Ledger
from gateway.ledger.journal import SettlementJournal
from gateway.observability.metrics import Metrics
from gateway.state import ConfigHolder

__all__ = [
    "CONFIG",
    "HISTORY",
    "HISTORY_URL",
    "HTTP",
    "JOURNAL",
    "LEDGER",
    "METRICS",
    "RELOADER",
    "REQUEST_ID",
    "SETTLEMENTS",
    "STOPPING",
    "STORE",
    "STORE_URL",
]

CONFIG = web.AppKey("config", ConfigHolder)
STORE_URL = web.AppKey("store_url", str)
STORE = web.AppKey("store", aioredis.Redis)
HTTP = web.AppKey("http", aiohttp.ClientSession)
# The history database's reads (its pool set while the app runs, None when history is off).
HISTORY = web.AppKey("history", HistoryReader)
# The history database's URL ("" when history is off).
HISTORY_URL = web.AppKey("history_url", str)
LEDGER = web.AppKey("ledger", Ledger)
# Every settlement is written here before the store is asked (see ledger/journal.py).
JOURNAL = web.AppKey("journal", SettlementJournal)
METRICS = web.AppKey("metrics", Metrics)
RELOADER = web.AppKey("reloader", Reloader)
# Settlements still running after their call was cut (shutdown): awaited before Redis closes.
SETTLEMENTS = web.AppKey("settlements", set[asyncio.Task[None]])
# Set when shutdown begins: a handler cancelled after that was cut by the gateway, not left by
# its client.
STOPPING = web.AppKey("stopping", asyncio.Event)

# The id of each request, set first thing and sent back as `x-request-id`.
REQUEST_ID = web.RequestKey("request_id", str)
