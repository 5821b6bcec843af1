"""/metrics in Prometheus text format, and one JSON access line per call with no secrets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.logging import ACCESS_FLUSH_SECONDS
from tests.admin_client import Admin
from tests.conftest import GATEWAY_ENV, model_entry
from tests.procs import Proc, free_port, wait_http

SERIES = {
    "gateway_requests",
    "gateway_request_duration_seconds",
    "gateway_time_to_first_token_seconds",
    "gateway_tokens",
    "gateway_billed_micros",
    "gateway_rejections",
    "gateway_upstream_errors",
    "gateway_redis_call_seconds",
    "gateway_requests_in_flight",
    "gateway_config_reloads",
}
ACCESS_FIELDS = {
    "request_id",
    "account",
    "key_id",
    "model",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "cost",
    "upstream",
    "latency_ms",
    "ttft_ms",
}
SECRET_PROMPT = "my-very-private-prompt-text"


async def _calls(gw: Proc, key: str) -> dict[str, str]:
    """A few calls of every outcome; returns request ids by outcome."""
    ids = {}
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": SECRET_PROMPT}],
        "max_tokens": 3,
    }
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        for name, payload, headers in [
            ("ok", body, {}),
            ("stream", {**body, "stream": True}, {}),
            ("unknown_model", {**body, "model": "nope"}, {}),
            ("upstream_500", body, {"x-mock-status": "500"}),
            ("cut", {**body, "max_tokens": 10, "stream": True}, {"x-mock-disconnect-after": "2"}),
        ]:
            async with session.post(
                gw.url + "/v1/chat/completions", data=orjson.dumps(payload), headers=headers
            ) as resp:
                ids[name] = resp.headers["x-request-id"]
                with contextlib.suppress(aiohttp.ClientPayloadError):
                    await resp.read()
    async with (
        aiohttp.ClientSession(headers={"Authorization": "Bearer sk-gw-x.key_1.wrong"}) as session,
        session.post(gw.url + "/v1/chat/completions", data=orjson.dumps(body)) as resp,
    ):
        ids["bad_key"] = resp.headers["x-request-id"]
    return ids


async def test_metrics_series_and_values(make_gateway: Callable[..., Proc], mock_a: Proc) -> None:
    """/metrics parses as Prometheus text, carries every series of SPEC section 6 with the
    right counts, and no label holds an account id."""
    gw = make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")])
    account_id, key = Admin(gw.url).funded(["m"])
    ids = await _calls(gw, key)
    # A call is counted when its handler ends, which (for a cut stream) can be a moment after
    # the client has given up on it: wait until every call is in.
    deadline = time.monotonic() + 10
    while True:
        async with aiohttp.ClientSession() as session, session.get(gw.url + "/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            text = await resp.text()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        counted = sum(
            s.value for s in families["gateway_requests"].samples if s.name.endswith("_total")
        )
        if counted >= len(ids) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    assert counted == len(ids)
    assert set(families) >= SERIES, SERIES - set(families)
    assert account_id not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in families.values()
        for s in family.samples
    }
    assert samples[("gateway_requests_total", (("model", "m"), ("status", "200")))] == 3
    assert samples[("gateway_requests_total", (("model", "other"), ("status", "404")))] == 1
    assert samples[("gateway_requests_total", (("model", "m"), ("status", "500")))] == 1
    assert samples[("gateway_rejections_total", (("reason", "model_not_found"),))] == 1
    assert samples[("gateway_rejections_total", (("reason", "invalid_api_key"),))] == 1
    assert samples[("gateway_tokens_total", (("model", "m"), ("type", "completion")))] == 3 + 3 + 2
    assert samples[("gateway_billed_micros_total", (("model", "m"),))] > 0
    assert samples[("gateway_time_to_first_token_seconds_count", (("model", "m"),))] == 2
    assert samples[("gateway_requests_in_flight", ())] == 0
    # Every kind of the upstream's errors is there (at zero unless it happened): the one
    # upstream error of these calls, under the upstream's own label.
    upstream = {
        dict(k[1])["kind"]: v for k, v in samples.items() if k[0] == "gateway_upstream_errors_total"
    }
    assert upstream == {"upstream_error": 1, "upstream_unavailable": 0, "upstream_timeout": 0}
    assert samples[("gateway_redis_call_seconds_count", (("operation", "reserve"),))] >= 4
    assert samples[("gateway_redis_call_seconds_count", (("operation", "settle"),))] >= 3


def _access_lines(gw: Proc) -> dict[str, dict[str, Any]]:
    lines = {}
    for raw in gw.log().splitlines():
        if raw.startswith("{"):
            line = json.loads(raw)
            if line.get("event") == "call":
                lines[line["request_id"]] = line
    return lines


async def test_access_log_has_fields_and_no_secrets(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """Each call writes one JSON access line with request id, account, key id, model, status,
    tokens, cost, upstream, latency and TTFT; neither the key's secret nor the prompt appears
    anywhere in the log."""
    gw = make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")])
    admin = Admin(gw.url)
    account_id, key = admin.funded(["m"])
    ids = await _calls(gw, key)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and len(_access_lines(gw)) < len(ids):
        await asyncio.sleep(0.05)
    lines = _access_lines(gw)
    ok = lines[ids["ok"]]
    assert set(ok) >= ACCESS_FIELDS
    assert ok["account"] == account_id
    assert ok["key_id"] == key.split(".")[1]
    assert ok["model"] == "m"
    assert ok["status"] == 200
    assert ok["completion_tokens"] == 3
    assert ok["prompt_tokens"] > 0
    assert ok["cost"] == admin.usage(account_id)[0]["cost"]
    assert ok["upstream"].startswith("127.0.0.1:")
    assert ok["latency_ms"] > 0
    stream = lines[ids["stream"]]
    assert stream["stream"] is True
    assert 0 < stream["ttft_ms"] <= stream["latency_ms"]
    assert lines[ids["unknown_model"]]["error"] == "model_not_found"
    assert lines[ids["bad_key"]]["status"] == 401
    assert lines[ids["cut"]]["outcome"] == "upstream_error"
    log = gw.log()
    secret = key.split(".", 2)[2]
    assert secret not in log
    assert key not in log
    assert SECRET_PROMPT not in log


def test_terminal_gets_readable_logs(tmp_path: Path, mock_a: Proc) -> None:
    """Run in a terminal, the gateway writes human-readable lines instead of JSON."""
    port = free_port()
    config = tmp_path / "tty.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"port": port},
                "store": {"url": "embedded", "data_dir": str(tmp_path / "store")},
                "models": [model_entry("m", mock_a.url, upstream_model="mock-model")],
            }
        )
    )
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=follower,
        stderr=follower,
        env={**os.environ, **GATEWAY_ENV},
    )
    os.close(follower)
    output = b""
    try:
        deadline = time.monotonic() + 15
        while b"gateway listening" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                output += os.read(leader, 4096)
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
    finally:
        proc.terminate()
        deadline = time.monotonic() + 15
        while proc.poll() is None and time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.2)
            if ready:
                try:
                    output += os.read(leader, 4096)
                except OSError:
                    break
        if proc.poll() is None:
            proc.kill()  # never leave a gateway behind, whatever the test found
        proc.wait(timeout=15)
        os.close(leader)
    text = output.decode(errors="replace")
    assert "gateway listening" in text
    listening = next(line for line in text.splitlines() if "gateway listening" in line)
    assert not listening.lstrip().startswith("{")


def test_grafana_dashboard_uses_exported_series() -> None:
    """The sample Grafana dashboard is valid JSON and charts only series the gateway exports."""
    import re

    path = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "inference-gateway.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(gateway_[a-z_]+)", e)}
    exported = set()
    for name in SERIES | {"gateway_notifications"}:
        exported |= {name, f"{name}_total", f"{name}_bucket", f"{name}_count", f"{name}_sum"}
    assert used
    assert used <= exported, used - exported


async def test_access_lines_are_batched_but_never_lost(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """Access lines are written in batches (at most ACCESS_FLUSH_SECONDS late), and the
    ones still waiting when the gateway is stopped are written before it exits."""
    gw = make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")])
    _, key = Admin(gw.url).funded(["m"])
    body = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {key}"}) as session:
        async with session.post(gw.url + "/v1/chat/completions", data=body) as r:
            first = r.headers["x-request-id"]
        await asyncio.sleep(ACCESS_FLUSH_SECONDS + 0.4)
        assert first in _access_lines(gw)
        ids = []
        for _ in range(5):
            async with session.post(gw.url + "/v1/chat/completions", data=body) as r:
                ids.append(r.headers["x-request-id"])
    assert gw.stop(signal.SIGTERM) == 0
    assert set(ids) <= set(_access_lines(gw))
