"""Metrics an SRE can alert on from the first event: every known series exists at zero from
the start (and from the reload that adds its model or upstream), an upstream's failures carry
its own label, and a reload that changes nothing is counted as such."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from typing import Any

import aiohttp
import orjson
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.admin_client import Admin
from tests.conftest import model_entry
from tests.procs import Proc, free_port

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _samples(gw: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(gw.url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def _post(gw: Proc, key: str, body: dict[str, Any]) -> int:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gw.url + "/v1/chat/completions",
            data=orjson.dumps(body),
            headers={"Authorization": f"Bearer {key}"},
        ) as resp,
    ):
        await resp.read()
        return resp.status


def test_known_series_exist_at_zero_from_the_start(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    gw = make_gateway([model_entry("m", mock_a.url, upstream_model="mock-model")])
    samples = _samples(gw)
    upstream = mock_a.url.removeprefix("http://")
    for result in ("ok", "error", "unchanged"):
        assert _value(samples, "gateway_config_reloads_total", result=result) == 0, result
    for kind in ("upstream_unavailable", "upstream_timeout", "upstream_error"):
        assert _value(samples, "gateway_upstream_errors_total", upstream=upstream, kind=kind) == 0
    for reason in ("invalid_api_key", "insufficient_balance", "rate_limit_exceeded"):
        assert _value(samples, "gateway_rejections_total", reason=reason) == 0, reason
    assert _value(samples, "gateway_notifications_total", channel="webhook", result="failed") == 0
    assert _value(samples, "gateway_tokens_total", model="m", type="prompt") == 0
    assert _value(samples, "gateway_billed_micros_total", model="m") == 0


async def test_a_lone_dead_upstream_is_named_in_its_errors(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """One upstream refusing connections: the 502 counts against it, not `(all)`; behind a
    failover the call succeeds and the refusal still counts."""
    dead = f"127.0.0.1:{free_port()}"
    gw = make_gateway(
        [
            model_entry("m", f"http://{dead}", upstream_model="mock-model"),
            model_entry("m2", f"http://{dead}", mock_a.url, upstream_model="mock-model"),
        ]
    )
    _, key = Admin(gw.url).funded(["m", "m2"])
    assert await _post(gw, key, CHAT) == 502
    samples = _samples(gw)
    assert (
        _value(samples, "gateway_upstream_errors_total", upstream=dead, kind="upstream_unavailable")
        == 1
    )
    assert not any(
        dict(labels).get("upstream") == "(all)"
        for name, labels in samples
        if name == "gateway_upstream_errors_total"
    )
    # m2 tries dead or alive first (round robin): over two calls the dead one refuses once.
    assert await _post(gw, key, {**CHAT, "model": "m2"}) == 200
    assert await _post(gw, key, {**CHAT, "model": "m2"}) == 200
    samples = _samples(gw)
    assert (
        _value(samples, "gateway_upstream_errors_total", upstream=dead, kind="upstream_unavailable")
        == 2
    )


def test_reloads_are_counted_by_what_they_did(
    make_gateway: Callable[..., Proc], mock_a: Proc
) -> None:
    """A reload of an unchanged file answers `reloaded: false` and counts `unchanged`; one
    that adds a model counts `ok` and creates the new model's series at zero."""
    gw = make_gateway(
        [model_entry("m", mock_a.url, upstream_model="mock-model")],
        server={"watch_config": False},
    )
    admin = Admin(gw.url)
    first = admin.call("POST", "/admin/reload")
    assert first.status == 200, first.body
    assert first.json()["reloaded"] is False
    samples = _samples(gw)
    assert _value(samples, "gateway_config_reloads_total", result="unchanged") == 1
    assert _value(samples, "gateway_config_reloads_total", result="ok") == 0
    assert gw.config_path is not None
    config = yaml.safe_load(gw.config_path.read_text())
    config["models"].append(model_entry("added", mock_a.url, upstream_model="mock-model"))
    gw.config_path.write_text(yaml.safe_dump(config))
    second = admin.call("POST", "/admin/reload")
    assert second.status == 200, second.body
    assert second.json()["reloaded"] is True
    samples = _samples(gw)
    assert _value(samples, "gateway_config_reloads_total", result="ok") == 1
    assert _value(samples, "gateway_config_reloads_total", result="unchanged") == 1
    assert _value(samples, "gateway_tokens_total", model="added", type="completion") == 0
