"""The `inference-gateway` command: serve, check-config, audit, backup, mock-upstream, demo."""

from __future__ import annotations

import argparse
import asyncio
import errno
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aiohttp import web

from gateway.config import ConfigError, Settings, load_settings
from gateway.observability.logging import configure_logging, get_logger

__all__ = ["main"]

if TYPE_CHECKING:
    from gateway.history.embedded import EmbeddedPostgres

WORKER_STORE_ENV = "GATEWAY_WORKER_STORE_URL"
WORKER_HISTORY_ENV = "GATEWAY_WORKER_HISTORY_URL"


def _new_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed: a faster event loop for the same asyncio code."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _server_int(field: str) -> Callable[[str], int]:
    """An argparse type for a command-line override of `server.<field>`, held to the
    config's own bounds (so `--port 0` or `--workers 0` is refused as the file's would be)."""
    from pydantic import ValidationError

    from gateway.config.schema import ServerConfig

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, not {text!r}") from None
        try:
            ServerConfig.model_validate({field: value})
        except ValidationError as exc:
            reason = str(exc.errors()[0]["msg"])
            raise argparse.ArgumentTypeError(f"{reason} (server.{field})") from None
        return value

    return parse


def _load_or_exit(path: str, require_secrets: bool = True) -> Settings:
    try:
        return load_settings(path, require_secrets=require_secrets)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        raise SystemExit(1) from None


def _admin_token_unset(settings: Settings) -> bool:
    """True when the admin token's variable is unset or empty: the admin API is then off
    (every /admin route answers 401), as gateway.admin.app decides."""
    return not os.environ.get(settings.server.admin_token_env)


def _port_in_use(exc: OSError) -> bool:
    return exc.errno == errno.EADDRINUSE


def _run_worker(
    settings: Settings,
    config_path: str,
    store_url: str,
    host: str,
    port: int,
    reuse_port: bool,
    history_url: str | None = None,
) -> int:
    """Serve in this process until SIGTERM/SIGINT (then drain and settle)."""
    from gateway.app import create_app
    from gateway.store.client import StoreMisconfigured

    log = get_logger("gateway.cli")
    app = create_app(settings, store_url, config_path, history_url)

    def announce(*_: object) -> None:
        # aiohttp calls its `print` once every site listens: not before the port is bound.
        log.info(
            "gateway listening",
            url=f"http://{host}:{port}",
            models=[m.name for m in settings.models],
            pid=os.getpid(),
        )

    try:
        web.run_app(
            app,
            host=host,
            port=port,
            access_log=None,
            print=announce,
            loop=_new_loop(),
            shutdown_timeout=settings.server.drain_timeout,
            keepalive_timeout=settings.server.idle_timeout,
            reuse_port=reuse_port,
            # A client that goes away cancels its handler at once, so the upstream request is
            # closed (an abort to vLLM and llama.cpp) instead of running on unread.
            handler_cancellation=True,
        )
    except StoreMisconfigured as exc:
        log.error("refusing to start", reason=str(exc))
        return 1
    except OSError as exc:
        if not _port_in_use(exc):
            raise
        log.error("refusing to start", reason=f"port {port} on {host} is already in use")
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from gateway.store.embedded import DataDirLocked, EmbeddedStore, EmbeddedStoreError
    from gateway.workers import supervise

    configure_logging(args.log_level)
    log = get_logger("gateway.cli")
    settings = _load_or_exit(args.config)
    host = args.host or settings.server.host
    port = settings.server.port if args.port is None else args.port
    workers = settings.server.workers if args.workers is None else args.workers
    if args.worker:  # started by a supervisor, which runs the store and passes its URL
        store_url = os.environ[WORKER_STORE_ENV]
        given = os.environ.get(WORKER_HISTORY_ENV) or None
        return _run_worker(settings, args.config, store_url, host, port, True, given)
    if _admin_token_unset(settings):
        variable = settings.server.admin_token_env
        log.warning(
            f"admin API disabled: {variable} is not set; every /admin route answers 401",
            variable=variable,
        )
    store: EmbeddedStore | None = None
    store_url = settings.store.url
    if store_url == "embedded":
        # Locks the data directory first: a second gateway on it refuses before touching it.
        store = EmbeddedStore(settings.store.data_dir, appendfsync=settings.store.appendfsync)
        try:
            store.start()
        except DataDirLocked as exc:
            log.error("refusing to start", reason=str(exc), holder=exc.holder)
            return 1
        except EmbeddedStoreError as exc:
            log.error("embedded store failed to start", error=str(exc))
            return 1
        store_url = store.local_url
        store.watch()  # restarted if it dies, by a thread that lives until store.stop()
        log.info("embedded store started", data_dir=str(store.data_dir), pid=store.pid)
    history: EmbeddedPostgres | None = None
    history_url: str | None = None
    if settings.history.url == "embedded" and settings.billing.metering:
        from gateway.history.embedded import EmbeddedPostgres, EmbeddedPostgresError

        history = EmbeddedPostgres(Path(settings.store.data_dir) / "history")
        try:
            history_url = history.start()
        except (EmbeddedPostgresError, OSError) as exc:
            log.error("embedded history database failed to start", error=str(exc))
            if store is not None:
                store.stop()
            return 1
        history.watch()
        log.info("embedded history database started", pid=history.pid, port=history.port)
    try:
        if workers <= 1:
            return _run_worker(settings, args.config, store_url, host, port, False, history_url)
        argv = ["serve", "--config", args.config, "--host", host, "--port", str(port)]
        argv += ["--log-level", args.log_level, "--worker"]
        # Not on the command line: a URL may hold a password.
        env = {WORKER_STORE_ENV: store_url, WORKER_HISTORY_ENV: history_url or ""}
        return supervise(workers, argv, env, settings.server.drain_timeout)
    finally:
        # Only now, after the drain: the calls it let finish have settled on this store.
        if history is not None:
            history.stop()
            log.info("embedded history database stopped")
        if store is not None:
            store.stop()
            log.info("embedded store stopped")


def _check_config(args: argparse.Namespace) -> int:
    # Secrets are often not at hand where a file is checked (CI, a laptop): an unset one is a
    # warning here, and `serve` refuses to start without it.
    settings = _load_or_exit(args.config, require_secrets=False)
    for problem in settings.unset_secrets():
        print(f"warning: {problem} (serve refuses to start without it)", file=sys.stderr)
    if _admin_token_unset(settings):
        variable = settings.server.admin_token_env
        print(
            f"warning: server.admin_token_env: environment variable {variable} is not set "
            "(the admin API is disabled without it: every /admin route answers 401)",
            file=sys.stderr,
        )
    print(f"{args.config}: ok ({len(settings.models)} models)")
    return 0


# `audit` exit codes: every account adds up, some do not, the store could not be audited.
AUDIT_OK, AUDIT_FAILING, AUDIT_NO_STORE = 0, 1, 2


def _audit(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisClusterException, RedisError

    from gateway.audit import audit_store
    from gateway.store.client import connect_store, without_credentials
    from gateway.store.embedded import DataDirLocked, EmbeddedStore, EmbeddedStoreError

    settings = _load_or_exit(args.config)
    url = args.store_url or settings.store.url
    store: EmbeddedStore | None = None
    if url == "embedded":
        # No gateway on the data directory: open it ourselves, holding its lock meanwhile.
        store = EmbeddedStore(settings.store.data_dir, appendfsync=settings.store.appendfsync)
        try:
            url = store.start()
        except DataDirLocked as exc:  # a gateway holds it: audit the store it runs
            store = None
            running = _running_store_url(settings.store.data_dir)
            if running is None:
                print(f"audit: {exc}; its store does not answer", file=sys.stderr)
                return AUDIT_NO_STORE
            url = running
        except (EmbeddedStoreError, OSError) as exc:
            print(f"audit: the embedded store could not be started: {exc}", file=sys.stderr)
            return AUDIT_NO_STORE

    history_url = _history_url_for_audit(settings)

    async def run() -> int:
        client = connect_store(url)
        try:
            report = await audit_store(client)
            if history_url:
                await _audit_history(client, history_url, report)
        finally:
            await client.aclose()
        print(report.render())
        return AUDIT_OK if report.ok else AUDIT_FAILING

    try:
        return asyncio.run(run())
    except (RedisError, RedisClusterException, OSError, ValueError) as exc:
        # A URL redis-py cannot read (ValueError), a store that is down, refuses our password
        # or answers too slowly: one line naming the store without its credentials.
        where = without_credentials(url)
        reason = " ".join(str(exc).split()) or exc.__class__.__name__
        print(f"audit: cannot audit the store at {where}: {reason}", file=sys.stderr)
        return AUDIT_NO_STORE
    finally:
        if store is not None:
            store.stop()


def _history_url_for_audit(settings: Settings) -> str | None:
    """The history database `audit` checks too: the configured server's, or the embedded one
    a running gateway serves (its URL file); None with history off or nothing running."""
    configured = settings.history.url
    if configured == "off" or not settings.billing.metering:
        return None
    if configured != "embedded":
        return configured
    from gateway.history.embedded import URL_FILE

    path = Path(settings.store.data_dir) / "history" / URL_FILE
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


async def _audit_history(client: Any, history_url: str, report: Any) -> None:
    import asyncpg

    from gateway.history.audit import audit_history

    try:
        conn = await asyncpg.connect(history_url, timeout=10)
    except (OSError, asyncpg.PostgresError) as exc:
        print(f"audit: the history database does not answer ({exc}); not checked", file=sys.stderr)
        return
    try:
        checked = await audit_history(client, conn, report)
        print(f"history: checked {checked} accounts against the database", file=sys.stderr)
    finally:
        await conn.close()


def _running_store_url(data_dir: str, wait: float = 15.0) -> str | None:
    """The URL of the store another process runs on `data_dir`, waiting while that store
    starts or is restarted (its `store.url` then names no living server)."""
    from gateway.store.embedded import EmbeddedStore

    deadline = time.monotonic() + wait
    while (url := EmbeddedStore.running_url(data_dir)) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return url


# What a backup of the embedded store holds, relative to its data directory: the append-only
# files (the ledger), the password they are served with, and the settlement journal (what the
# store had not yet acknowledged). The rest (valkey.conf, store.url, the socket, the lock,
# the logs) is written afresh at each start.
BACKUP_PARTS = ("appendonlydir", "store.password", "journal")


def _write_backup(data_dir: Path, out: Path) -> list[str]:
    """A gzipped tar of BACKUP_PARTS, written beside `out` and renamed into place. With the
    store's AOF rewrites off, the append-only files only grow meanwhile: each is copied up to
    the size it had when reached (a command cut at the end is one Valkey drops at load)."""
    import tarfile

    partial = out.with_name(out.name + ".partial")
    taken: list[str] = []
    with tarfile.open(partial, "w:gz") as tar:
        for part in BACKUP_PARTS:
            path = data_dir / part
            if path.exists():
                tar.add(path, arcname=part)
                taken.append(part)
    os.chmod(partial, 0o600)  # it holds the store's password
    partial.rename(out)
    return taken


def _aof_rewrite_settled(client: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        info = client.info("persistence")
        if not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]:
            if info.get("aof_last_bgrewrite_status", "ok") != "ok":
                raise RuntimeError("the store's last AOF rewrite failed (see valkey.log)")
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the store's AOF rewrite did not end within {timeout:.0f}s")
        time.sleep(0.1)


def _backup_live(url: str, data_dir: Path, out: Path, timeout: float) -> list[str]:
    """A running store: automatic AOF rewrites off (so no file of the log is replaced while
    it is copied), BGREWRITEAOF (one compact base file), copy, rewrites back as they were."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=30, decode_responses=True)
    try:
        setting = "auto-aof-rewrite-percentage"
        before = str(client.config_get(setting)[setting])
        client.config_set(setting, 0)
        try:
            _aof_rewrite_settled(client, timeout)  # one already under way ends first
            client.bgrewriteaof()
            _aof_rewrite_settled(client, timeout)
            return _write_backup(data_dir, out)
        finally:
            client.config_set(setting, before)
    finally:
        client.close()


def _backup(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from gateway.store.embedded import DataDirLocked, EmbeddedStore

    settings = _load_or_exit(args.config, require_secrets=False)  # no secret is needed here
    if settings.store.url != "embedded":
        print(
            "backup: the store is not embedded: back it up where it runs "
            "(its append-only files after BGREWRITEAOF, or its snapshots)",
            file=sys.stderr,
        )
        return 1
    data_dir = Path(settings.store.data_dir).resolve()
    out = Path(args.out)
    if not (data_dir / "appendonlydir").is_dir():
        print(f"backup: {data_dir} holds no embedded store yet", file=sys.stderr)
        return 1
    if out.exists():
        print(f"backup: {out} exists; name a new file", file=sys.stderr)
        return 1
    store = EmbeddedStore(data_dir)
    try:
        store.lock()  # nobody serves it: copied as it is, holding the lock meanwhile
    except DataDirLocked:
        url = _running_store_url(str(data_dir))
        if url is None:
            print(f"backup: {data_dir} is locked but its store does not answer", file=sys.stderr)
            return 1
        try:
            taken = _backup_live(url, data_dir, out, args.timeout)
        except (RedisError, RuntimeError, OSError) as exc:
            print(f"backup: {exc}", file=sys.stderr)
            return 1
        how = "from the running store"
    else:
        try:
            taken = _write_backup(data_dir, out)
        finally:
            store.unlock()
        how = "from the stopped store"
    print(f"backup: {out} ({', '.join(taken)}) {how} in {data_dir}")
    return 0


def _mock_upstream(args: argparse.Namespace) -> int:
    from gateway.mock_upstream import MockOptions, run_mock_upstream

    api_key = os.environ.get(args.api_key_env) if args.api_key_env else None
    options = MockOptions(
        tokenizer=args.tokenizer,
        ttft=args.ttft,
        token_delay=args.token_delay,
        default_max_tokens=args.max_tokens,
        api_key=api_key,
    )
    try:
        run_mock_upstream(args.host, args.port, options)
    except OSError as exc:
        if not _port_in_use(exc):
            raise
        print(f"mock-upstream: port {args.port} on {args.host} is already in use", file=sys.stderr)
        return 1
    return 0


_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _mock_address(settings: Settings) -> tuple[str, int] | str:
    """Where the demo's mock upstream must listen: the one loopback address the config's
    upstreams name (or why there is none)."""
    found: set[tuple[str, int]] = set()
    for model in settings.models:
        for upstream in model.upstreams:
            parts = urlsplit(upstream.url)
            if parts.scheme == "http" and parts.hostname in _LOOPBACK:
                found.add((parts.hostname, parts.port or 80))
    if len(found) != 1:
        named = ", ".join(f"{h}:{p}" for h, p in sorted(found)) or "none"
        return f"expected the config's upstreams to name one loopback http address (got {named})"
    return found.pop()


def _port_free(host: str, port: int) -> bool:
    """True when a server could listen on host:port now (with SO_REUSEADDR, as aiohttp binds:
    a port whose last connections are in TIME_WAIT counts as free)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """Poll `url` until it answers 200 (True) or `proc` exits or time runs out (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url, timeout=0.5):  # noqa: S310 - our own loopback URL
                return True
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    return False


def _stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _demo(args: argparse.Namespace) -> int:
    """The mock upstream and the gateway in front of it, in one command. The mock is a child
    in a session of its own, so a terminal's Ctrl-C (SIGINT to the process group) reaches the
    gateway alone, which drains its calls (the mock still answering them) and stops; the mock
    is stopped then, or as soon as this process dies, even by SIGKILL (PR_SET_PDEATHSIG)."""
    from gateway.store.embedded import child_preexec

    settings = _load_or_exit(args.config)
    mock = _mock_address(settings)
    if isinstance(mock, str):
        print(f"demo: {args.config}: {mock}", file=sys.stderr)
        return 1
    mock_host, mock_port = mock
    host = settings.server.host
    port = settings.server.port if args.port is None else args.port
    for what, (h, p) in (("the mock upstream", mock), ("the gateway", (host, port))):
        if not _port_free(h, p):
            print(
                f"demo: port {p} on {h} is already in use; {what} needs it "
                "(is another demo, mock-upstream or gateway still running?)",
                file=sys.stderr,
            )
            return 1
    command = [sys.executable, "-m", "gateway", "mock-upstream"]
    command += ["--host", mock_host, "--port", str(mock_port)]
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, preexec_fn=child_preexec(), start_new_session=True
    )
    try:
        where = f"[{mock_host}]" if ":" in mock_host else mock_host
        if not _wait_ready(f"http://{where}:{mock_port}/healthz", proc, timeout=30.0):
            code = proc.poll()
            why = f"exited with {code}" if code is not None else "did not answer within 30s"
            print(f"demo: the mock upstream {why}", file=sys.stderr)
            return 1
        serve = argparse.Namespace(
            config=args.config,
            host=None,
            port=args.port,
            workers=None,
            log_level=args.log_level,
            worker=False,
        )
        return _serve(serve)
    except KeyboardInterrupt:  # Ctrl-C before the gateway took over SIGINT
        return 130
    finally:
        _stop(proc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inference-gateway",
        description="OpenAI-compatible reverse proxy that meters every call inline.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path of the YAML config file")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=_server_int("port"), help="override server.port")
    serve.add_argument(
        "--workers", type=_server_int("workers"), help="override server.workers (processes)"
    )
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file; exit 1 if invalid")
    check.add_argument("--config", required=True)
    check.set_defaults(func=_check_config)

    audit = sub.add_parser("audit", help="check every account's money adds up; exit 1 if not")
    audit.add_argument("--config", required=True)
    audit.add_argument("--store-url", help="audit this store instead of the config's")
    audit.set_defaults(func=_audit)

    backup = sub.add_parser(
        "backup",
        help="copy the embedded store (ledger, password, journal) to a .tar.gz, live or stopped",
    )
    backup.add_argument("--config", required=True, help="the gateway's config (its data_dir)")
    backup.add_argument("--out", required=True, help="the archive to write (a new file)")
    backup.add_argument(
        "--timeout", type=float, default=300.0, help="seconds the AOF rewrite may take"
    )
    backup.set_defaults(func=_backup)

    mock = sub.add_parser("mock-upstream", help="run the demo OpenAI-compatible model server")
    mock.add_argument("--host", default="127.0.0.1")
    mock.add_argument("--port", type=int, default=9000)
    mock.add_argument("--tokenizer", default="o200k_base", choices=["o200k_base", "cl100k_base"])
    mock.add_argument("--ttft", type=float, default=0.0, help="seconds before the first token")
    mock.add_argument("--token-delay", type=float, default=0.0, help="seconds between tokens")
    mock.add_argument("--max-tokens", type=int, default=16, help="tokens when none are asked")
    mock.add_argument("--api-key-env", help="require the key held in this environment variable")
    mock.set_defaults(func=_mock_upstream)

    demo = sub.add_parser(
        "demo",
        help="run the mock upstream and the gateway in front of it; Ctrl-C stops both",
    )
    demo.add_argument(
        "--config",
        default="config/demo.yaml",
        help="the gateway's config; the mock listens where its upstreams point "
        "(default: config/demo.yaml)",
    )
    demo.add_argument("--port", type=_server_int("port"), help="override server.port")
    demo.add_argument("--log-level", default="info")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `inference-gateway` script."""
    args = _parser().parse_args(argv)
    code: int = args.func(args)
    return code
