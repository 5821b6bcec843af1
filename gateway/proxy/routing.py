"""Which upstream serves a call: smooth weighted round-robin, then the others for failover."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from math import gcd

from gateway.config.schema import API_ROUTES, ModelConfig, Settings

__all__ = ["ANY_API", "ModelRoute", "RoutingTable", "Upstream"]

# A passthrough route's calls go to any upstream of the model (its `apis` name metered APIs).
ANY_API = "*"


@dataclass(frozen=True, slots=True)
class Upstream:
    """One upstream endpoint of one model, ready to call."""

    base_url: str
    model: str  # the upstream's name for the model
    api_key: str | None
    label: str  # host:port, for logs and metrics; never carries a secret


def _weighted_schedule(weights: list[int]) -> list[int]:
    """Indices in smooth weighted round-robin order (nginx's algorithm), one cycle long."""
    divisor = 0
    for weight in weights:
        divisor = gcd(divisor, weight)
    reduced = [w // divisor for w in weights]
    current = [0] * len(reduced)
    total = sum(reduced)
    schedule: list[int] = []
    for _ in range(total):
        for i, weight in enumerate(reduced):
            current[i] += weight
        best = max(range(len(current)), key=current.__getitem__)
        current[best] -= total
        schedule.append(best)
    return schedule


class ModelRoute:
    """A model's upstreams and, per API, the position of its round-robin over those that
    speak it (each upstream's `apis`)."""

    __slots__ = ("_counters", "_orders", "config", "upstreams")

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.upstreams = tuple(
            Upstream(
                base_url=u.url,
                model=config.upstream_model(u),
                api_key=u.api_key.get_secret_value() if u.api_key is not None else None,
                label=u.url.split("://", 1)[-1].split("/", 1)[0],
            )
            for u in config.upstreams
        )
        self._orders: dict[str, list[tuple[Upstream, ...]]] = {}
        self._counters: dict[str, itertools.count[int]] = {}
        for api in (*API_ROUTES, ANY_API):
            speaking = [
                i for i, u in enumerate(config.upstreams) if api == ANY_API or api in u.apis
            ]
            if not speaking:
                continue
            schedule = _weighted_schedule([config.upstreams[i].weight for i in speaking])
            n = len(speaking)
            # For each slot: the picked upstream first, then every other one once (failover).
            self._orders[api] = [
                tuple(self.upstreams[speaking[(first + k) % n]] for k in range(n))
                for first in schedule
            ]
            self._counters[api] = itertools.count()

    def speaks(self, api: str) -> bool:
        """Whether some upstream of the model serves `api`."""
        return api in self._orders and api != ANY_API

    def apis(self) -> list[str]:
        """The APIs the model's upstreams serve, in API_ROUTES order."""
        return [api for api in self._orders if api != ANY_API]

    def candidates(self, api: str = "chat") -> tuple[Upstream, ...]:
        """Upstreams that speak `api` (ANY_API: every upstream, for a passthrough route), to
        try for the next call of it, in order."""
        orders = self._orders[api]
        return orders[next(self._counters[api]) % len(orders)]


class RoutingTable:
    """Routes for every configured model of one config snapshot."""

    __slots__ = ("routes",)

    def __init__(self, settings: Settings) -> None:
        self.routes = {model.name: ModelRoute(model) for model in settings.models}

    def get(self, name: str) -> ModelRoute | None:
        return self.routes.get(name)

    def upstream_labels(self) -> list[str]:
        """Every upstream's label, once each, in config order."""
        seen: dict[str, None] = {}
        for route in self.routes.values():
            for upstream in route.upstreams:
                seen.setdefault(upstream.label)
        return list(seen)
