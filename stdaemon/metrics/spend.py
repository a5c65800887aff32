"""Per-provider spend in the current cost period, for
``simpletuner_cost_limit_percent_used`` (S10).

Read from the database at start and every ``SPEND_REFRESH_INTERVAL`` (one
indexed query per provider over the period only, ``metrics.provider_spend``
timer), followed in between by the cost deltas of the job hooks.  Reading it
on scrape costs nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from twisted.internet import defer

from stdaemon.jobs import costs
from stdaemon.logs import get_logger
from stdaemon.metrics.store import provider_spend

log = get_logger("stdaemon.metrics")

# How often the per-provider period spend is re-read from the database
# (between reads it follows the cost deltas the job hooks report).
SPEND_REFRESH_INTERVAL = 60.0


class SpendTracker:
    """Until :meth:`follow` names the providers, it tracks none (``figures()`` is empty)."""

    def __init__(self, clock: Any):
        self.clock = clock
        # provider → [period, period_start, spent]
        self.current: dict[str, list] = {}
        self.settings: Callable[[str], Mapping[str, Any]] = lambda provider: {}
        self.providers: Sequence[str] = ()
        self.refresh_needed: Callable[[], None] = lambda: None
        self._db: Any = None
        self._refreshing: Optional[defer.Deferred] = None

    def follow(self, providers: Sequence[str], settings: Callable[[str], Mapping[str, Any]], db: Any) -> None:
        """Track ``providers`` with their cost-limit ``settings(provider)``, re-reading the
        period's spend from ``db`` when a new period starts (in the background)."""
        self.providers = tuple(providers)
        self.settings = settings
        self._db = db
        self.refresh_needed = self._refresh_in_background

    def _refresh_in_background(self) -> None:
        if self._refreshing is not None:
            return
        d = self._refreshing = defer.ensureDeferred(self.refresh(self._db))
        d.addErrback(lambda f: log.failure("Refreshing provider spend failed", failure=f))

        def done(_: Any) -> None:
            self._refreshing = None

        d.addBoth(done)

    def _start(self, period: str) -> float:
        return costs.period_start(self.clock.seconds(), period)

    def add(self, provider: str, delta: float, created_at: Optional[float]) -> None:
        entry = self.current.get(provider)
        if entry is None:
            return
        if created_at is None or created_at >= entry[1]:
            entry[2] += delta

    def set(self, provider: str, period: str, start: float, spent: float) -> None:
        self.current[provider] = [period, start, spent]

    def figures(self) -> list[tuple[str, Optional[float], Optional[float]]]:
        out = []
        for provider in self.providers:
            values = self.settings(provider)
            if not values.get("cost_limit_enabled") or not values.get("cost_limit_amount"):
                continue
            period = values.get("cost_limit_period", "monthly")
            try:
                start = self._start(period)
            except ValueError:
                continue
            entry = self.current.get(provider)
            if entry is None or entry[0] != period or entry[1] != start:
                # A new period (or period setting): what was spent since its start
                # is re-read in the background; until then only new costs count.
                self.current[provider] = entry = [period, start, 0.0]
                self.refresh_needed()
            out.append((provider, round(entry[2] / float(values["cost_limit_amount"]) * 100.0, 4), None))
        return out

    async def refresh(self, db: Any) -> None:
        for provider in self.providers:
            values = self.settings(provider)
            period = values.get("cost_limit_period", "monthly")
            try:
                start = self._start(period)
            except ValueError:
                continue
            spent = await db.run_read(provider_spend, provider, start)
            self.set(provider, period, start, spent)
