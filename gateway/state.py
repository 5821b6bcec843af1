"""What the running app holds: the current config snapshot and the objects built from it.

A reload builds a new `Snapshot` and swaps the one reference in `ConfigHolder`; a call in
flight keeps the snapshot it started with.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.config.schema import Settings
from gateway.metering.prompt import MediaEstimates
from gateway.pricing import Prices, schedule_of
from gateway.proxy.routing import RoutingTable

__all__ = ["ConfigHolder", "Snapshot"]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One validated config and what a call needs of it, built once: its routing table, each
    billed model's price sheets (by model name), the media estimates of its holds."""

    settings: Settings
    routing: RoutingTable
    schedules: dict[str, tuple[Prices, ...]] = field(default_factory=dict)
    media: MediaEstimates = field(default_factory=MediaEstimates)
    loaded_at: int = field(default_factory=lambda: int(time.time()))

    @classmethod
    def build(cls, settings: Settings) -> Snapshot:
        return cls(
            settings=settings,
            routing=RoutingTable(settings),
            schedules={model.name: schedule_of(model) for model in settings.models},
            media=MediaEstimates.of(settings.billing),
        )


class ConfigHolder:
    """The current snapshot; replaced whole, never edited."""

    __slots__ = ("path", "snapshot")

    def __init__(self, settings: Settings, path: str | None = None) -> None:
        self.snapshot = Snapshot.build(settings)
        self.path = path

    def swap(self, settings: Settings) -> Snapshot:
        """Serve `settings` from now on; return the new snapshot."""
        self.snapshot = Snapshot.build(settings)
        return self.snapshot
