"""A private PostgreSQL beside the embedded store, for `history.url: embedded`.

The binaries come from the `pgserver` package (PostgreSQL 16, built for manylinux and macOS;
nothing is downloaded at run time). Only its binaries are used: this module runs `initdb`
once and `postgres` itself, as the embedded Valkey is run (gateway/store/embedded.py): its data
in `<store.data_dir>/history` (0700), listening on 127.0.0.1 at a free port with a password
kept in that directory (0600), its own session (the terminal's signals are the gateway's),
tied to the gateway's life (PR_SET_PDEATHSIG), restarted if it dies, stopped (a fast
shutdown: its WAL makes every committed row durable) after the gateway's drain.

PostgreSQL refuses to run as root. A gateway run as root runs it as `nobody`: the history
directory is given to that user, and each directory above it gets the search bit for others
(`o+x`, never read), so that user can reach it; a warning names each directory changed.

A missing binary is a clear error naming the fix, never a silent fallback to no history.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from gateway.observability.logging import get_logger
from gateway.store.embedded import (
    _password_of,
    _private_dir,
    _write_private,
    child_preexec,
)

__all__ = ["URL_FILE", "EmbeddedPostgres", "EmbeddedPostgresError", "postgres_binaries"]

log = get_logger("gateway.history")

DATABASE = "gateway"
USER = "gateway"
UNPRIVILEGED = "nobody"
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 5.0)
URL_FILE = "url"


class EmbeddedPostgresError(RuntimeError):
    """The embedded PostgreSQL could not be started (the message says why and what to do)."""


def postgres_binaries() -> Path:
    """The directory of `initdb` and `postgres` from the `pgserver` package."""
    spec = importlib.util.find_spec("pgserver")
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise EmbeddedPostgresError(
            "history.url: embedded needs PostgreSQL's binaries from the pgserver package "
            "(pip install pgserver), or set history.url to a postgresql:// server, or to off"
        )
    path = Path(next(iter(locations))) / "pginstall" / "bin"
    if not (path / "postgres").exists():
        raise EmbeddedPostgresError(f"pgserver is installed but has no PostgreSQL in {path}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class EmbeddedPostgres:
    """One private PostgreSQL server on a data directory."""

    def __init__(self, data_dir: str | Path, port: int | None = None) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.pgdata = self.data_dir / "pgdata"
        self.port: int | None = port
        self._process: subprocess.Popen[bytes] | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._password: str | None = None
        self._user: pwd.struct_passwd | None = None

    @property
    def url(self) -> str:
        assert self.port is not None
        assert self._password is not None
        return f"postgresql://{USER}:{self._password}@127.0.0.1:{self.port}/{DATABASE}"

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- start ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> str:
        """Create the cluster if it is new, start the server, wait until it takes
        connections, and return its URL."""
        binaries = postgres_binaries()
        _private_dir(self.data_dir)
        self._password = _password_of(self.data_dir)
        if os.geteuid() == 0:
            self._user = pwd.getpwnam(UNPRIVILEGED)
            self._reachable_by(self._user)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(binaries)
        self._stopping.clear()
        self._launch(binaries, timeout)
        self._create_database(binaries, timeout)
        # Where it answers while it runs, for other commands and tools (it holds the password).
        _write_private(self.data_dir / URL_FILE, self.url + "\n")
        return self.url

    def _create_database(self, binaries: Path, timeout: float) -> None:
        """The gateway's database, once (initdb makes only `postgres`)."""
        marker = self.pgdata / "gateway.created"
        if marker.exists():
            return
        assert self.port is not None
        env = {**os.environ, "PGPASSWORD": self._password or "", "PGCONNECT_TIMEOUT": "5"}
        deadline = time.monotonic() + timeout
        while True:
            done = subprocess.run(
                [
                    str(binaries / "psql"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    str(self.port),
                    "-U",
                    USER,
                    "-d",
                    "postgres",
                    "-v",
                    "ON_ERROR_STOP=1",
                    "-c",
                    f"CREATE DATABASE {DATABASE}",
                ],
                capture_output=True,
                env=env,
                check=False,
            )
            error = done.stderr.decode(errors="replace")
            if done.returncode == 0 or "already exists" in error:
                break
            if time.monotonic() > deadline or "starting up" not in error:
                raise EmbeddedPostgresError(f"could not create the database: {error[-500:]}")
            time.sleep(0.1)
        _write_private(marker, "1\n")
        if self._user is not None:
            os.chown(marker, self._user.pw_uid, self._user.pw_gid)

    def _reachable_by(self, user: pwd.struct_passwd) -> None:
        """Give the directory to `user`, and the search bit to every directory above it."""
        for path in self.data_dir.parents:
            mode = path.stat().st_mode
            if not mode & 0o001:
                os.chmod(path, mode | 0o001)
                log.warning(
                    "gave others the search bit (o+x) so the embedded PostgreSQL, run as an "
                    "unprivileged user, can reach its data",
                    directory=str(path),
                    user=user.pw_name,
                )
        for root, dirs, files in os.walk(self.data_dir):
            for name in (*dirs, *files):
                os.lchown(os.path.join(root, name), user.pw_uid, user.pw_gid)
        os.chown(self.data_dir, user.pw_uid, user.pw_gid)

    @property
    def _uid(self) -> int | None:
        return None if self._user is None else self._user.pw_uid

    @property
    def _gid(self) -> int | None:
        return None if self._user is None else self._user.pw_gid

    def _initdb(self, binaries: Path) -> None:
        if self.pgdata.exists():  # a cluster whose creation was cut short: begin again
            shutil.rmtree(self.pgdata)
        secret = self.data_dir / "initdb.pw"
        _write_private(secret, (self._password or "") + "\n")
        if self._user is not None:
            os.chown(secret, self._user.pw_uid, self._user.pw_gid)
        try:
            done = subprocess.run(
                [
                    str(binaries / "initdb"),
                    "-D",
                    str(self.pgdata),
                    "-U",
                    USER,
                    "--pwfile",
                    str(secret),
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--locale=C",
                ],
                capture_output=True,
                check=False,
                user=self._uid,
                group=self._gid,
            )
        finally:
            secret.unlink(missing_ok=True)
        if done.returncode != 0:
            raise EmbeddedPostgresError(
                f"initdb failed ({done.returncode}): {done.stderr.decode(errors='replace')[-800:]}"
            )

    def _launch(self, binaries: Path, timeout: float) -> None:
        # The first start picks a port; a restart keeps it (the gateway's URL names it).
        self.port = self.port or _free_port()
        log_file = open(self.data_dir / "postgres.log", "ab")  # noqa: SIM115 - for the child
        if self._user is not None:
            os.chown(self.data_dir / "postgres.log", self._user.pw_uid, self._user.pw_gid)
        try:
            self._process = subprocess.Popen(
                [
                    str(binaries / "postgres"),
                    "-D",
                    str(self.pgdata),
                    "-p",
                    str(self.port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",
                    "-c",
                    "max_connections=50",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.data_dir),
                start_new_session=True,
                preexec_fn=child_preexec(),
                user=self._uid,
                group=self._gid,
            )
        finally:
            log_file.close()
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Until the server answers a startup packet (it may still refuse while it
        recovers: a connection from the caller then waits a little more)."""
        assert self.port is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                raise EmbeddedPostgresError(
                    f"the embedded PostgreSQL exited during start (code {code}); "
                    f"see {self.data_dir / 'postgres.log'}"
                )
            if _accepts(self.port):
                return
            time.sleep(0.1)
        self._terminate()
        raise EmbeddedPostgresError(f"the embedded PostgreSQL did not start within {timeout:.0f}s")

    # -- life ----------------------------------------------------------------------------

    def watch(self) -> None:
        """Restart the server whenever it dies, until `stop()`."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="history-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        deaths = 0
        while True:
            while (process := self._process) is None or process.poll() is None:
                if self._stopping.wait(0.1):
                    self._terminate()
                    return
            deaths += 1
            delay = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]
            log.error(
                "embedded PostgreSQL died; restarting",
                pid=process.pid,
                code=process.returncode,
                restart_in_s=delay,
            )
            if self._stopping.wait(delay):
                return
            try:
                self._launch(postgres_binaries(), timeout=60.0)
            except (EmbeddedPostgresError, OSError) as exc:
                log.error("embedded PostgreSQL restart failed", error=str(exc))
                continue
            deaths = 0
            log.warning("embedded PostgreSQL restarted", pid=self.pid, port=self.port)

    def kill(self) -> None:
        """SIGKILL the server and its backends, its whole process group (tests: a crash; the
        watcher, if any, restarts it)."""
        if self._process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def stop(self, timeout: float = 30.0) -> None:
        """A fast shutdown (SIGINT: open transactions roll back, committed ones are on disk),
        then SIGKILL if it takes longer than `timeout`."""
        self._stopping.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.join()
        self._terminate(timeout)

    def _terminate(self, timeout: float = 30.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    """True once the server answers an SSL request (a startup packet it always answers)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"\x00\x00\x00\x08\x04\xd2\x16\x2f")  # SSLRequest
            return sock.recv(1) in (b"N", b"S")
    except OSError:
        return False
