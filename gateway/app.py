"""`create_app`: wire routes, middlewares and the long-lived clients of one gateway process."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import get_args

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from gateway.accounts.channels import ChannelKind
from gateway.accounts.lifecycle import LifecycleSweeper
from gateway.accounts.notifier import Notifier
from gateway.accounts.orphans import OrphanSweeper
from gateway.admin import create_admin_app
from gateway.api import inference, models, ops
from gateway.api.middleware import attach_request_id, errors_middleware
from gateway.api.protocol import answer_protocol_errors_in_json
from gateway.config.reload import Reloader
from gateway.config.schema import Settings
from gateway.console import create_console_app
from gateway.console.overview import sampler_ctx
from gateway.errors import GatewayError
from gateway.history.reader import HistoryReader, settled_in_history
from gateway.keys import (
    CONFIG,
    HISTORY,
    HISTORY_URL,
    HTTP,
    JOURNAL,
    LEDGER,
    METRICS,
    RELOADER,
    SETTLEMENTS,
    STOPPING,
    STORE,
    STORE_URL,
)
from gateway.ledger import Ledger
from gateway.ledger.journal import Entry, SettlementJournal, store_identity
from gateway.ledger.transport import SCRIPT_NAMES
from gateway.metering.tokenizers import warm_encodings
from gateway.observability.access import access_middleware
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.state import ConfigHolder, Snapshot
from gateway.store.channel import channel_for
from gateway.store.client import check_eviction_policy, connect_store, exposure_warning
from gateway.store.durability import confirmer_for

__all__ = ["create_app"]

log = get_logger("gateway.app")


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    client = connect_store(app[STORE_URL])
    try:
        warning = await check_eviction_policy(client)
    except (OSError, RedisError):
        warning = "store not reachable at start; /readyz reports it until it is"
    if warning:
        log.warning("store check", warning=warning)
    if exposed := exposure_warning(app[STORE_URL]):
        log.warning("store check", warning=exposed)
    app[STORE] = client
    channel = channel_for(app[STORE_URL])
    confirmer = confirmer_for(client)
    ledger = app[LEDGER] = Ledger(client, channel, confirmer)
    settings = app[CONFIG].snapshot.settings
    if app[HISTORY_URL] and settings.billing.metering:
        # Settled markers need only outlive the export: an older replay asks the database.
        ledger.settled_ttl = int(settings.history.settled_ttl)
    redis_latency = app[METRICS].redis_latency
    by_operation = {name: redis_latency.labels(name) for name in SCRIPT_NAMES}
    ledger.observe = lambda operation, seconds: by_operation[operation].observe(seconds)
    store = app[CONFIG].snapshot.settings.store
    journal = app[JOURNAL] = SettlementJournal(
        ledger,
        Path(store.data_dir) / "journal",
        store_identity(app[STORE_URL], embedded=store.url == "embedded"),
    )
    replayer = asyncio.create_task(journal.run(), name="journal")
    # Connect (and, on a cluster, learn the slot map) before the first burst of calls: a
    # cluster client that initializes under concurrent first use can trip over itself.
    with contextlib.suppress(Exception):
        await client.ping()
    yield
    # Calls cut at shutdown settle in the background: let them finish before Redis closes.
    pending = app[SETTLEMENTS]
    if pending:
        await asyncio.wait(pending, timeout=10)
    replayer.cancel()
    await asyncio.gather(replayer, return_exceptions=True)
    await journal.close()
    if confirmer is not None:
        await confirmer.aclose()
    if channel is not None:
        await channel.aclose()
    await client.aclose()


async def _http_ctx(app: web.Application) -> AsyncIterator[None]:
    proxy = app[CONFIG].snapshot.settings.proxy
    connector = aiohttp.TCPConnector(
        limit=proxy.max_connections,
        limit_per_host=0,
        keepalive_timeout=proxy.keepalive,
        ttl_dns_cache=60,
    )
    session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=True,
        skip_auto_headers=("User-Agent",),
        timeout=aiohttp.ClientTimeout(total=None),
    )
    app[HTTP] = session
    yield
    await session.close()


async def _background_ctx(app: web.Application) -> AsyncIterator[None]:
    """The arrears timer and the notification deliverer, in every metering instance."""
    if not app[CONFIG].snapshot.settings.billing.metering:
        yield
        return
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60))
    ledger = app[LEDGER]
    tasks = [
        asyncio.create_task(LifecycleSweeper(ledger, app[CONFIG]).run(), name="lifecycle"),
        asyncio.create_task(OrphanSweeper(ledger, app[CONFIG], app[JOURNAL]).run(), name="holds"),
        asyncio.create_task(
            Notifier(ledger, app[CONFIG], session, app[METRICS]).run(), name="notifier"
        ),
    ]
    yield
    for task in tasks:
        task.cancel()
    await asyncio.wait(tasks, timeout=2)  # bounded: a stop must never hang on a sweeper
    await session.close()


async def _history_ctx(app: web.Application) -> AsyncIterator[None]:
    """The export of the ledger's history to the database, in every metering instance (one
    exports at a time: gateway/history/exporter.py)."""
    url = app[HISTORY_URL]
    if not url or not app[CONFIG].snapshot.settings.billing.metering:
        yield
        return
    import asyncpg

    from gateway.history.exporter import Exporter
    from gateway.ledger.history_feed import HistoryFeed

    # No connection at start: a database down now delays the export, never the gateway.
    pool = await asyncpg.create_pool(url, min_size=0, max_size=2, command_timeout=60)
    exporter = Exporter(
        HistoryFeed(app[LEDGER]), pool, app[CONFIG].snapshot.settings.history, app[METRICS]
    )
    stop = asyncio.Event()
    task = asyncio.create_task(exporter.run(stop), name="history-export")
    reader = app[HISTORY]
    reader.pool = pool
    ttl = app[LEDGER].settled_ttl

    async def vouch(entries: list[Entry]) -> set[str] | None:
        return await settled_in_history(reader, ttl, entries)

    app[JOURNAL].history_check = vouch
    yield
    app[JOURNAL].history_check = None
    reader.pool = None
    stop.set()
    try:
        await asyncio.wait_for(task, 10)
    except TimeoutError:
        log.warning("history export still running at stop; cut (the next start resumes it)")
    try:
        await asyncio.wait_for(pool.close(), 5)
    except TimeoutError:
        pool.terminate()


async def _reload_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reload on file change and on SIGHUP."""
    reloader = app[RELOADER]
    loop = asyncio.get_running_loop()
    watcher = asyncio.create_task(reloader.watch(), name="config-watcher")
    pending: set[asyncio.Task[list[str]]] = set()

    def on_sighup() -> None:
        task = loop.create_task(reloader.reload("SIGHUP"))
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
        hooked = True
    except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no signals
        hooked = False
    yield
    if hooked:
        loop.remove_signal_handler(signal.SIGHUP)
    watcher.cancel()
    await asyncio.gather(watcher, *pending, return_exceptions=True)


async def _warm_up(app: web.Application) -> None:
    """Build every configured model's encoding before the first call needs it (~0.2 s each),
    then freeze what start-up made (config, tokenizers, libraries) out of the garbage
    collector's reach: its full passes no longer walk those objects while calls wait."""
    await warm_encodings(app[CONFIG].snapshot.settings)
    gc.collect()
    gc.freeze()


async def _stopping(app: web.Application) -> None:
    """Shutdown begins (before aiohttp drains and then cuts the calls in flight)."""
    app[STOPPING].set()


def _codes(error: type[GatewayError]) -> set[str]:
    """The codes of `error` and every subclass of it: the refusals a client can get."""
    found = {error.code} if error.status < 500 else set()
    for sub in error.__subclasses__():
        found |= _codes(sub)
    return found


def prime_metrics(metrics: Metrics, snapshot: Snapshot) -> None:
    """Create at zero the series of every model, upstream, refusal and channel known now."""
    metrics.prime(
        models=[m.name for m in snapshot.settings.models],
        upstreams=snapshot.routing.upstream_labels(),
        reasons=sorted(_codes(GatewayError)),
        channels=get_args(ChannelKind),
    )


def create_app(
    settings: Settings,
    store_url: str,
    config_path: str | None = None,
    history_url: str | None = None,
) -> web.Application:
    """The gateway application for `settings`, talking to the store at `store_url` (and,
    unless history is off, exporting to the database at `history_url`: the embedded one's,
    which `serve` starts, or the configured server's)."""
    app = web.Application(
        middlewares=[access_middleware, errors_middleware],
        client_max_size=settings.server.max_body_bytes,
        # Encoded bodies are decoded by errors_middleware, strictly (gateway.api.encoding).
        handler_args={"auto_decompress": False},
    )
    answer_protocol_errors_in_json(app)
    app[CONFIG] = ConfigHolder(settings, config_path)
    app[STORE_URL] = store_url
    configured = settings.history.url
    app[HISTORY_URL] = history_url or ("" if configured in ("embedded", "off") else configured)
    app[HISTORY] = HistoryReader()
    metrics = app[METRICS] = Metrics()

    def prime(snapshot: Snapshot) -> None:
        prime_metrics(metrics, snapshot)

    prime(app[CONFIG].snapshot)
    app[RELOADER] = Reloader(app[CONFIG], metrics, on_swap=prime)
    app[SETTLEMENTS] = set()
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stopping)
    app.cleanup_ctx.extend([_store_ctx, _http_ctx, _background_ctx, _history_ctx, _reload_ctx])
    app.on_response_prepare.append(attach_request_id)
    app.on_startup.append(_warm_up)
    app.add_routes([*inference.routes, *models.routes, *ops.routes])
    app.add_subapp("/admin", create_admin_app())
    if settings.console.enabled:  # read at start: turning it on or off takes a restart
        app.router.add_get("/console", _to_console)
        app.cleanup_ctx.append(sampler_ctx)
        app.add_subapp("/console", create_console_app())
    return app


async def _to_console(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/console/")
