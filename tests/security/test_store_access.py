"""The embedded store answers only the gateway: a local process without its password, or
running as another user, can neither read nor write the ledger nor cut the gateway's
connections."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.ledger.journal import store_identity
from gateway.store.client import exposure_warning, without_credentials
from gateway.store.embedded import PASSWORD_FILE, EmbeddedStore
from tests.procs import free_port

# Commands an intruder on the loopback port would send first.
INTRUSIONS = [
    ("HSET", "gw:{a:victim}:account", "balance", "1000000000"),
    ("HGETALL", "gw:{a:victim}:account"),
    ("CLIENT", "KILL", "TYPE", "normal"),
    ("CLIENT", "LIST"),
    ("CONFIG", "GET", "requirepass"),
    ("FLUSHALL",),
    ("KEYS", "*"),
]


def _resp(*args: str) -> bytes:
    out = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _raw(port: int, *commands: tuple[str, ...]) -> list[bytes]:
    """Send commands on a fresh TCP connection, as any local process could; the first line
    of each reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(_resp(*c) for c in commands))
        data = b""
        while data.count(b"\r\n") < len(commands):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.split(b"\r\n")[: len(commands)]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[EmbeddedStore]:
    store = EmbeddedStore(tmp_path / "data", port=free_port())
    store.start()
    client = redis.Redis.from_url(store.url)
    client.hset("gw:{a:victim}:account", mapping={"balance": 5, "state": "active"})
    client.close()
    yield store
    store.stop()


def test_the_tcp_port_refuses_every_command_without_the_password(store: EmbeddedStore) -> None:
    assert store.port is not None
    replies = _raw(store.port, *INTRUSIONS)
    assert all(reply.startswith(b"-NOAUTH") for reply in replies), replies
    wrong = _raw(store.port, ("AUTH", "guess"), ("HGET", "gw:{a:victim}:account", "balance"))
    assert wrong[0].startswith(b"-WRONGPASS"), wrong
    assert wrong[1].startswith(b"-NOAUTH"), wrong
    # The ledger is as it was, and the gateway's own URL (password included) still works.
    client = redis.Redis.from_url(store.url)
    assert client.hget("gw:{a:victim}:account", "balance") == b"5"
    client.close()
    unix = redis.Redis.from_url(store.local_url)
    assert unix.ping()
    unix.close()


def test_no_client_of_redis_py_gets_in_without_the_password(store: EmbeddedStore) -> None:
    """The same with a real client library, on both the TCP port and the Unix socket."""
    plain = redis.Redis(host="127.0.0.1", port=store.port, socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        plain.hset("gw:{a:victim}:account", "balance", 1)
    plain.close()
    assert store.socket_path is not None
    local = redis.Redis(unix_socket_path=str(store.socket_path), socket_timeout=5)
    with pytest.raises(redis.AuthenticationError):
        local.get("anything")
    local.close()


def test_secrets_and_data_are_the_owners_alone(store: EmbeddedStore) -> None:
    data = store.data_dir
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for name in (PASSWORD_FILE, "valkey.conf", "store.url", "store.lock"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    assert store.password in (data / "valkey.conf").read_text()  # hence 0600
    assert (data / PASSWORD_FILE).read_text().strip() == store.password
    assert len(store.password) >= 43  # 256 bits, URL-safe
    assert store.password not in " ".join(_cmdline(store.pid))  # never on a command line


def _cmdline(pid: int | None) -> list[str]:
    assert pid is not None
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


_PROBE = """
import json, os, socket, sys
data = sys.argv[1]
port = int(sys.argv[2])
out = {"parent": sorted(os.listdir(os.path.dirname(data)))}
for name in ("store.password", "valkey.conf", "store.url"):
    try:
        open(f"{data}/{name}").read()
        out[name] = "read"
    except OSError as exc:
        out[name] = type(exc).__name__
try:
    s = socket.socket(socket.AF_UNIX)
    s.connect(f"{data}/valkey.sock")
    out["socket"] = "connected"
except OSError as exc:
    out["socket"] = type(exc).__name__
with socket.create_connection(("127.0.0.1", port), timeout=5) as tcp:
    tcp.sendall(b"*2\\r\\n$3\\r\\nGET\\r\\n$1\\r\\nx\\r\\n")
    out["tcp"] = tcp.recv(64).decode().split()[0]
print(json.dumps(out))
"""


# An interpreter another user may run (the test's own may sit under a private home).
_SYSTEM_PYTHON = next(
    (p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)), None
)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a probe as another user")
@pytest.mark.skipif(_SYSTEM_PYTHON is None, reason="no system python3 for the probe")
def test_another_user_cannot_read_the_password_nor_use_the_socket() -> None:
    """A process of another local user (`nobody`) finds every door shut. The data directory
    sits in a directory everyone may enter (pytest's own temporary directories are private,
    which would shut the doors for us)."""

    shared = Path(tempfile.mkdtemp(prefix="gw-shared-", dir="/tmp"))
    os.chmod(shared, 0o755)  # noqa: S103 - the point: a directory others may enter
    store = EmbeddedStore(shared / "data", port=free_port())
    store.start()
    try:
        seen = _probe(store)
    finally:
        store.stop()
        shutil.rmtree(shared, ignore_errors=True)
    assert seen == {
        "parent": ["data"],
        "store.password": "PermissionError",
        "valkey.conf": "PermissionError",
        "store.url": "PermissionError",
        "socket": "PermissionError",
        "tcp": "-NOAUTH",
    }, seen


def _probe(store: EmbeddedStore) -> dict[str, object]:
    import json

    assert _SYSTEM_PYTHON is not None
    probe = subprocess.run(
        [_SYSTEM_PYTHON, "-c", _PROBE, str(store.data_dir), str(store.port)],
        user=65534,
        group=65534,
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
        env={"PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert probe.returncode == 0, probe.stderr
    seen: dict[str, object] = json.loads(probe.stdout)
    return seen


def test_an_open_data_dir_is_narrowed_and_the_password_kept(tmp_path: Path) -> None:
    """A data directory left world-readable by an older version is made 0700 at start; the
    password survives restarts, so clients holding the URL reconnect after one."""
    data = tmp_path / "open"
    data.mkdir(mode=0o755)
    os.chmod(data, 0o755)  # noqa: S103 - as an older version left it
    first = EmbeddedStore(data)
    first.start()
    password = first.password
    first.stop()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    again = EmbeddedStore(data)
    again.start()
    try:
        assert again.password == password
        client = redis.Redis.from_url(again.url)
        assert client.ping()
        client.close()
    finally:
        again.stop()


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("redis://10.0.0.5:6379/0", True),
        ("redis://store.internal:6379/0", True),
        ("redis+cluster://10.0.0.5:7000", True),
        ("redis://[2001:db8::1]:6379/0", True),
        ("redis://:s3cret@10.0.0.5:6379/0", False),
        ("redis://gateway:s3cret@10.0.0.5:6379/0", False),
        ("rediss://10.0.0.5:6380/0", False),
        ("rediss+cluster://10.0.0.5:7000", False),
        ("redis://127.0.0.1:6379/0", False),
        ("redis://127.8.9.10:6379/0", False),
        ("redis://[::1]:6379/0", False),
        ("redis://localhost:6379/0", False),
        ("unix:///run/valkey/valkey.sock", False),
    ],
)
def test_a_store_on_another_host_without_password_or_tls_is_warned_of(
    url: str, warned: bool
) -> None:
    warning = exposure_warning(url)
    assert (warning is not None) == warned, warning
    if warning:
        assert "neither a password nor TLS" in warning


def test_messages_and_journal_names_leave_credentials_out() -> None:
    assert without_credentials("redis://u:pw@h:1/0") == "redis://h:1/0"
    assert without_credentials("unix://:pw@/run/v.sock?db=0") == "unix:///run/v.sock?db=0"
    assert without_credentials("redis://h:1/0") == "redis://h:1/0"
    assert store_identity("redis://:old@h:1/0", embedded=False) == store_identity(
        "redis://:new@h:1/0", embedded=False
    )
