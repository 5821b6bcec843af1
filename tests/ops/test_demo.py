"""`inference-gateway demo`: the mock upstream and the gateway in one command, as the README's
quick start runs it. Ctrl-C (SIGINT to the terminal's process group) stops both and frees
both ports, so a second run works; a port already taken is one line and exit 1, no traceback.
Also the one-line port errors of `serve` and `mock-upstream`, and the warning at start when
the admin token is unset."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.admin_client import Admin
from tests.procs import children, free_port, start_gateway, store_pid, wait_dead

REPO = Path(__file__).resolve().parents[2]
TOKEN = "demo-test-token"
CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}


def _demo_config(tmp: Path) -> tuple[Path, int, int]:
    """config/demo.yaml as shipped, on free ports and a data directory of the test's own."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    gateway_port, mock_port = free_port(), free_port()
    config["server"]["port"] = gateway_port
    config["store"]["data_dir"] = str(tmp / "store")
    upstream = config["models"][0]["upstreams"][0]
    assert upstream["url"] == "http://127.0.0.1:9000/v1"  # what the README's demo uses
    upstream["url"] = f"http://127.0.0.1:{mock_port}/v1"
    path = tmp / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, gateway_port, mock_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GATEWAY_ADMIN_TOKEN"}
    return {**env, **extra}


def _start_demo(config: Path, log: Path, token: str | None = TOKEN) -> subprocess.Popen[bytes]:
    """`inference-gateway demo` as a terminal runs it: the leader of a process group of its
    own (which a test can signal whole, as Ctrl-C does, without hitting pytest)."""
    env = _env(GATEWAY_ADMIN_TOKEN=token) if token else _env()
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=REPO,
            start_new_session=True,
        )


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"demo exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=1) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url}/readyz not ready within {timeout}s:\n{log.read_text()}")


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _mock_pid(demo: subprocess.Popen[bytes]) -> int:
    found = [pid for pid, cmd in children(demo.pid) if b"mock-upstream" in cmd]
    assert len(found) == 1, children(demo.pid)
    return found[0]


def _billed_call(url: str) -> None:
    """The README's curl walk-through: an account, a top-up, a subscription, a key, a call."""
    admin = Admin(url, TOKEN)
    account, key = admin.funded(["demo-model"], "10.00")
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(CHAT).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as resp:
        answer = json.load(resp)
    assert answer["usage"]["completion_tokens"] == 8
    (record,) = admin.usage(account)
    assert record["completion_tokens"] == 8
    assert admin.account(account)["balance"] != "10.000000"


@pytest.fixture
def reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Demos a failing test left running: their groups are killed."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            for pid, _ in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_demo_serves_a_billed_call_and_ctrl_c_stops_everything(
    tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    config, gateway_port, mock_port = _demo_config(tmp_path)
    url = f"http://127.0.0.1:{gateway_port}"
    for run in (1, 2):  # the second run finds both ports free again
        log = tmp_path / f"demo-{run}.log"
        demo = _start_demo(config, log)
        reaper.append(demo)
        _ready(url, demo, log)
        mock = _mock_pid(demo)
        store = store_pid(tmp_path / "store")
        assert store is not None
        _billed_call(url)

        os.killpg(demo.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        assert demo.wait(timeout=60) == 0, log.read_text()
        assert wait_dead(mock), "the mock upstream outlived the demo"
        assert wait_dead(store), "the embedded store outlived the demo"
        assert _port_free(mock_port)
        assert _port_free(gateway_port)
        assert "Traceback" not in log.read_text()


def test_demo_takes_the_mock_down_with_it_even_on_sigkill(
    tmp_path: Path, reaper: list[subprocess.Popen[bytes]]
) -> None:
    config, gateway_port, _ = _demo_config(tmp_path)
    log = tmp_path / "demo.log"
    demo = _start_demo(config, log)
    reaper.append(demo)
    _ready(f"http://127.0.0.1:{gateway_port}", demo, log)
    mock = _mock_pid(demo)
    demo.kill()
    demo.wait(timeout=10)
    assert wait_dead(mock), "the mock upstream outlived a SIGKILLed demo"


@pytest.mark.parametrize("which", ["mock", "gateway"])
def test_demo_with_a_port_taken_says_so_in_one_line(
    tmp_path: Path, which: str, reaper: list[subprocess.Popen[bytes]]
) -> None:
    config, gateway_port, mock_port = _demo_config(tmp_path)
    port = mock_port if which == "mock" else gateway_port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        log = tmp_path / "demo.log"
        demo = _start_demo(config, log)
        reaper.append(demo)
        assert demo.wait(timeout=60) == 1
    lines = log.read_text().splitlines()
    assert len(lines) == 1, lines
    assert f"port {port} on 127.0.0.1 is already in use" in lines[0]
    assert not (tmp_path / "store").exists()  # refused before starting anything


def test_serve_and_mock_upstream_with_their_port_taken_say_so_in_one_line(
    tmp_path: Path,
) -> None:
    port = free_port()
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump({"store": {"data_dir": str(tmp_path / "store")}, "models": []})
    )
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        for args in (
            ["serve", "--config", str(config), "--port", str(port)],
            ["mock-upstream", "--port", str(port)],
        ):
            result = subprocess.run(
                [sys.executable, "-m", "gateway", *args],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
                env=_env(GATEWAY_ADMIN_TOKEN=TOKEN),
            )
            assert result.returncode == 1, (args, result.stderr)
            assert "Traceback" not in result.stderr, result.stderr
            assert f"port {port} on 127.0.0.1 is already in use" in result.stderr, result.stderr
            assert "gateway listening" not in result.stderr  # said once the port is bound


def test_serve_warns_at_start_when_the_admin_token_is_unset(tmp_path: Path) -> None:
    """Without the variable the admin API is disabled: said once, at start, as a warning
    naming the variable; with it set, no such warning."""
    config = {
        "server": {"admin_token_env": "TEST_FC_ADMIN_TOKEN"},
        "store": {"data_dir": str(tmp_path / "store")},
        "models": [],
    }
    for token in ("", TOKEN):  # empty counts as unset, as the admin API decides
        gateway = start_gateway(tmp_path, config, env={"TEST_FC_ADMIN_TOKEN": token})
        try:
            reply = Admin(gateway.url, TOKEN).call("GET", "/admin/accounts/nobody")
        finally:
            assert gateway.stop(signal.SIGINT) == 0
        disabled = [
            event
            for event in gateway.events()
            if event["level"] == "warning" and event["event"].startswith("admin API disabled")
        ]
        if not token:
            assert reply.status == 401
            (warning,) = disabled
            assert warning["variable"] == "TEST_FC_ADMIN_TOKEN"
            assert warning["event"] == (
                "admin API disabled: TEST_FC_ADMIN_TOKEN is not set; every /admin route answers 401"
            )
        else:
            assert reply.status == 404
            assert disabled == []
