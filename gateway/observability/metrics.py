"""Prometheus metrics of one gateway process (SPEC section 6), on a registry of its own.

Label values are bounded: model names come from the config (anything else is `other`),
upstreams are the configured host:port labels, statuses and reasons are fixed vocabularies.
No account id is ever a label. With several workers, prometheus-client's multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, set by `serve --workers`) aggregates every worker's values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["DELIVERY_RESULTS", "RELOAD_RESULTS", "UPSTREAM_ERROR_KINDS", "Metrics"]

# The fixed vocabularies of some labels, whose series are created at zero at start (`prime`).
RELOAD_RESULTS = ("ok", "error", "unchanged")
UPSTREAM_ERROR_KINDS = ("upstream_unavailable", "upstream_timeout", "upstream_error")
DELIVERY_RESULTS = ("delivered", "failed", "dead_lettered")

_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


class Metrics:
    """Every series the gateway exports."""

    def child(self, metric: MetricWrapperBase, *labels: str) -> Any:
        """`metric.labels(*labels)`, remembered: `labels()` validates and takes a lock on
        every call, a few per metered call. Label values are bounded (models, statuses,
        error codes), and so is this cache."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def __init__(self) -> None:
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        registry = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests",
            "Data-plane calls answered, by model and HTTP status.",
            ["model", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from receiving a call to the end of its answer.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from receiving a streamed call to relaying its first chunk.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "gateway_tokens",
            "Tokens billed, by model and type (prompt or completion).",
            ["model", "type"],
            registry=registry,
        )
        self.billed = Counter(
            "gateway_billed_micros",
            "Amount billed, in micro-units of the currency, by model.",
            ["model"],
            registry=registry,
        )
        # Drift = upstream - local: how far the gateway's own count is from what was billed.
        self.drift_upstream = Counter(
            "gateway_drift_upstream_tokens",
            "Upstream-reported tokens of calls billed on the upstream's usage.",
            ["model", "type"],
            registry=registry,
        )
        self.drift_local = Counter(
            "gateway_drift_local_tokens",
            "The gateway's own count of the same calls' tokens.",
            ["model", "type"],
            registry=registry,
        )
        # Usage an upstream reported above what the call could produce (billed at the bound).
        self.usage_anomalies = Counter(
            "gateway_usage_anomalies",
            "Upstream usage fields above the call's bound, by model and field (billed at it).",
            ["model", "field"],
            registry=registry,
        )
        self.rejections = Counter(
            "gateway_rejections",
            "Calls refused by the gateway, by reason (the error code).",
            ["reason"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            "gateway_upstream_errors",
            "Upstream failures, by upstream and kind.",
            ["upstream", "kind"],
            registry=registry,
        )
        self.redis_latency = Histogram(
            "gateway_redis_call_seconds",
            "Latency of ledger calls to Redis, by operation.",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight",
            "Data-plane calls being served now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Config reloads, by result (ok, error, or unchanged: the file said what it said).",
            ["result"],
            registry=registry,
        )
        self.notifications = Counter(
            "gateway_notifications",
            "Event deliveries, by channel kind and result.",
            ["channel", "result"],
            registry=registry,
        )
        self.history_exported = Counter(
            "gateway_history_exported",
            "Records written to the history database, by stream (usage, topups).",
            ["stream"],
            registry=registry,
        )
        self.history_export_failures = Counter(
            "gateway_history_export_failures",
            "Export passes that failed (the database or the store did not answer); retried.",
            registry=registry,
        )
        self.history_full_pass = Gauge(
            "gateway_history_last_full_pass_timestamp_seconds",
            "When the last full export pass began: every record settled before it is in the "
            "history database (now minus this is the export's lag).",
            registry=registry,
            multiprocess_mode="max",
        )

    def prime(
        self,
        *,
        models: Iterable[str],
        upstreams: Iterable[str],
        reasons: Iterable[str],
        channels: Iterable[str],
    ) -> None:
        """Create at zero every series whose labels are known now: a counter that first
        appears at its first increment is invisible to `increase()` and `rate()` for that
        increment (the first reload error, the first failed delivery, an upstream's first
        timeout would never show). Called at start and after each reload (new models and
        upstreams); series already there keep their values."""
        for result in RELOAD_RESULTS:
            self.child(self.config_reloads, result)
        for stream in ("usage", "topups"):
            self.child(self.history_exported, stream)
        for upstream in upstreams:
            for kind in UPSTREAM_ERROR_KINDS:
                self.child(self.upstream_errors, upstream, kind)
        for reason in reasons:
            self.child(self.rejections, reason)
        for channel in channels:
            for result in DELIVERY_RESULTS:
                self.child(self.notifications, channel, result)
        for model in models:
            self.child(self.billed, model)
            for kind in ("prompt", "completion"):
                self.child(self.tokens, model, kind)
                self.child(self.drift_upstream, model, kind)
                self.child(self.drift_local, model, kind)

    def exposition(self) -> bytes:
        """The text format for /metrics (every worker's values with several workers)."""
        return generate_latest(self._collected())

    def totals(self) -> dict[str, float]:
        """The sums the console's overview charts (every worker's, with several): calls
        answered, those answered with an error status (4xx or 5xx), micro-units billed."""
        sums = {"calls": 0.0, "errors": 0.0, "billed_micros": 0.0}
        for family in self._collected().collect():
            for sample in family.samples:
                if sample.name == "gateway_requests_total":
                    sums["calls"] += sample.value
                    if not sample.labels.get("status", "").startswith(("1", "2", "3")):
                        sums["errors"] += sample.value
                elif sample.name == "gateway_billed_micros_total":
                    sums["billed_micros"] += sample.value
        return sums

    def _collected(self) -> CollectorRegistry:
        if self.multiprocess_dir:
            registry = CollectorRegistry()
            MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
            return registry
        return self.registry
