"""The README's quick start, run as written: `inference-gateway demo` on config/demo.yaml,
then the curl walk-through (and the notifications example that reuses its `$ADMIN`) in one
shell, then the OpenAI SDK snippet with the Python that runs the tests. Only the port
numbers are changed (8080 and 9000 may be taken where the tests run)."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.procs import children, free_port, wait_http

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()


def _section(title: str) -> str:
    """The README's text from the heading `title` to the next heading of any level (a `#`
    line inside a code block is no heading)."""
    lines: list[str] = []
    inside = fenced = False
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#+ ", line):
            if inside:
                break
            inside = line.rstrip("\n").split(" ", 1)[1] == title
            continue
        if inside:
            lines.append(line)
    assert lines, f"no section {title!r} in README.md"
    return "".join(lines)


def _blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.M | re.S)


QUICK_START = _blocks(_section("Quick start"), "sh")[0].strip()
CURL = _blocks(_section("Try it with curl"), "sh")[0]
SDK = _blocks(_section("Try it with the OpenAI SDK"), "python")[0]
NOTIFICATIONS = next(b for b in _blocks(README, "sh") if "/admin/accounts/acme/notifications" in b)


def test_the_quick_start_is_one_command_that_runs_the_demo() -> None:
    """No mock upstream started by hand in the background (it outlived Ctrl-C): the demo
    command runs both, with the token the examples below use."""
    steps = [step.strip() for step in QUICK_START.split("&&")]
    assert steps[0] == "python3 -m venv .venv"
    assert steps[1] == ".venv/bin/pip install -q -e ."
    assert steps[2] == "GATEWAY_ADMIN_TOKEN=dev-admin-token .venv/bin/inference-gateway demo"
    assert len(steps) == 3
    assert "Authorization: Bearer dev-admin-token" in CURL
    assert 'ADMIN_TOKEN = "dev-admin-token"' in SDK


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[int]:
    """`GATEWAY_ADMIN_TOKEN=dev-admin-token inference-gateway demo` on config/demo.yaml (on
    free ports, with a data directory of the test's own); yields the gateway's port."""
    config = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    port, mock_port = free_port(), free_port()
    config["server"]["port"] = port
    config["store"]["data_dir"] = str(tmp_path / "store")
    upstream = config["models"][0]["upstreams"][0]
    upstream["url"] = upstream["url"].replace(":9000/", f":{mock_port}/")
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(config))
    log = tmp_path / "demo.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--config", str(path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "GATEWAY_ADMIN_TOKEN": "dev-admin-token"},
            cwd=REPO,
            start_new_session=True,
        )
    try:
        wait_http(f"http://127.0.0.1:{port}/readyz", proc, timeout=60)
        yield port
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for pid, _ in children(proc.pid):
                    os.kill(pid, signal.SIGKILL)
                proc.kill()
                proc.wait()


def _on(port: int, snippet: str) -> str:
    return snippet.replace("localhost:8080", f"localhost:{port}").replace(
        "127.0.0.1:8080", f"127.0.0.1:{port}"
    )


@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's examples use curl")
def test_the_curl_and_sdk_examples_run_as_written(demo: int, tmp_path: Path) -> None:
    shell = subprocess.run(
        ["bash", "-c", "set -e\n" + _on(demo, CURL) + "\n" + _on(demo, NOTIFICATIONS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert shell.returncode == 0, shell.stdout + shell.stderr
    out = shell.stdout
    assert '"object":"chat.completion"' in out, out
    assert '"balance":"9.99' in out, out  # 10.00 topped up, one call billed
    assert '"status":"ok"' in out, out  # its usage record
    assert '"error"' not in out, out

    script = tmp_path / "sdk_demo.py"
    script.write_text(_on(demo, SDK))
    sdk = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert sdk.returncode == 0, sdk.stderr
    lines = sdk.stdout.strip().splitlines()
    assert len(lines) == 2, sdk.stdout
    assert len(lines[0].split()) == 8  # max_tokens=8: the mock answers one word a token
    assert len(lines[1].split()) == 16  # the streamed answer, the mock's default length
