"""Hot reload: a new config from disk replaces the snapshot whole, or not at all.

Triggers: the file changes (watchfiles), SIGHUP, or POST /admin/reload. A call in flight keeps
the snapshot it started with, so a stream begun under the old price settles at the old price.
An invalid edit is refused, logged and counted, and the old config keeps serving; so is one that
would change a price sheet already used to bill calls (pricing.history_violations).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from watchfiles import Change, awatch

from gateway.config.loader import ConfigError, load_settings
from gateway.metering.tokenizers import warm_encodings
from gateway.observability.logging import get_logger
from gateway.observability.metrics import Metrics
from gateway.pricing import history_violations
from gateway.state import ConfigHolder, Snapshot
from gateway.timefmt import now_ms

__all__ = ["ReloadOutcome", "Reloader"]

log = get_logger("gateway.config")

# Sections a running process cannot change: they take effect at the next start.
_RESTART_ONLY = ("server", "store")


@dataclass(slots=True)
class ReloadOutcome:
    """What a reload did: refused (`problems`), applied (`changed`), or neither (the file
    says what the running config says)."""

    problems: list[str] = field(default_factory=list)
    changed: bool = False


class Reloader:
    """Reloads one holder's config from its file."""

    def __init__(
        self,
        holder: ConfigHolder,
        metrics: Metrics,
        on_swap: Callable[[Snapshot], None] | None = None,
    ) -> None:
        self.holder = holder
        self.metrics = metrics
        self.on_swap = on_swap  # told of every new snapshot (metrics priming)
        self._lock = asyncio.Lock()
        self._target = Path(holder.path).resolve() if holder.path else None

    async def reload(self, trigger: str) -> list[str]:
        """Load and swap the config; return the problems (empty when it was applied)."""
        return (await self.reload_outcome(trigger)).problems

    async def reload_outcome(self, trigger: str) -> ReloadOutcome:
        """Load and swap the config; say whether it was refused, applied or unchanged."""
        path = self.holder.path
        if path is None:
            return ReloadOutcome(["(file): this gateway was not started from a config file"])
        async with self._lock:
            old = self.holder.snapshot.settings
            try:
                new = await asyncio.to_thread(load_settings, path)
            except ConfigError as exc:
                self.metrics.config_reloads.labels("error").inc()
                log.error(
                    "config reload refused; the old config keeps serving",
                    trigger=trigger,
                    path=path,
                    problems=exc.problems,
                )
                return ReloadOutcome(exc.problems)
            history = history_violations(old, new, now_ms())
            if history:
                self.metrics.config_reloads.labels("error").inc()
                log.error(
                    "config reload refused; the old config keeps serving",
                    trigger=trigger,
                    path=path,
                    problems=history,
                )
                return ReloadOutcome(history)
            if new == old:
                self.metrics.config_reloads.labels("unchanged").inc()
                log.info("config reload: nothing changed", trigger=trigger, path=path)
                return ReloadOutcome()
            await warm_encodings(new)  # a new model's first call must not pay for it
            snapshot = self.holder.swap(new)
            if self.on_swap is not None:
                self.on_swap(snapshot)
            self.metrics.config_reloads.labels("ok").inc()
            old_models = {m.name for m in old.models}
            new_models = {m.name for m in new.models}
            log.info(
                "config reloaded",
                trigger=trigger,
                path=path,
                models_added=sorted(new_models - old_models),
                models_removed=sorted(old_models - new_models),
                models_changed=sorted(
                    m.name for m in new.models if m.name in old_models and old.model(m.name) != m
                ),
            )
            for section in _RESTART_ONLY:
                if getattr(old, section) != getattr(new, section):
                    log.warning(
                        "config section changed; it takes effect at restart", section=section
                    )
            return ReloadOutcome(changed=True)

    async def watch(self) -> None:
        """Reload whenever the file is written or replaced (editors often rename over it)."""
        target = self._target
        if target is None or not self.holder.snapshot.settings.server.watch_config:
            return

        def is_config(change: Change, changed: str) -> bool:
            return Path(changed).resolve() == target and change != Change.deleted

        async for _ in awatch(target.parent, watch_filter=is_config, debounce=200, step=50):
            await self.reload("file")
