"""Health components and readiness (S9).

The composition root (``stdaemon.service.build_app``) registers each
capability's components once, in report order::

    app.health.register("rate_limiter", check)   # async () -> Component

(the daemon's own ``database`` and ``disk`` first: ``stdaemon/health/checks.py``).

``check_all()`` runs every check concurrently, each bounded by a timeout, and
turns a failing or hanging check into an ``unhealthy`` component rather than
an error.  Requests arriving while a check runs wait for that one run, and
with ``server.health_cache_seconds`` a component's result is kept that long
on the injected clock, so a busy health endpoint costs one round of checks
per run or interval, not one per request (``invalidate()`` forgets the results at once; the root calls it after
every request that may change state, so what the API just changed shows in the
next report).  Optional components (live provider checks) are never kept, only
shared between concurrent requests.  Readiness (``starting``/``ready``/``stopping`` + database) is kept
apart from the components.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}


@dataclass(frozen=True)
class Component:
    """One component's finding. Frozen: a kept result is handed to every report that reuses it."""

    name: str
    status: str
    message: str = ""
    latency_ms: Optional[float] = None

    def as_dict(self) -> dict:
        # a plain dict of the four fields (dataclasses.asdict deep-copies: a tenth of a full report)
        return {"name": self.name, "status": self.status, "message": self.message,
                "latency_ms": self.latency_ms}


def overall(components: list[Component]) -> str:
    """Worst of the components (pure)."""
    worst = HEALTHY
    for component in components:
        if _RANK.get(component.status, 2) > _RANK[worst]:
            worst = component.status
    return worst


Check = Callable[[], Awaitable[Component]]


#: How long a component's result is reused (seconds of the injected clock; config
#: ``server.health_cache_seconds``, default 1). 0: only concurrent reports share a run.
CACHE_SECONDS = 1.0


class HealthRegistry:
    def __init__(self, clock: Any, timeout: float = 5.0, cache_seconds: float = CACHE_SECONDS):
        self.clock = clock
        self.timeout = timeout
        self.cache_seconds = cache_seconds
        self._checks: dict[str, tuple[Check, bool]] = {}
        self._results: dict[str, tuple[Component, float]] = {}       # name → (result, finished at)
        self._running: dict[str, list[defer.Deferred]] = {}          # name → waiters of the run
        self.phase = "starting"       # starting | ready | stopping
        self.not_ready_reason: Optional[str] = "starting"
        # the last report made only of kept results: (its oldest result's time, the components),
        # handed out again as it is while that oldest result is still fresh
        self._report: Optional[tuple[float, list]] = None

    def register(self, name: str, check: Check, optional: bool = False) -> None:
        """``optional`` components run only when asked for (providers)."""
        self._checks[name] = (check, optional)
        self._results.pop(name, None)
        self._report = None

    def invalidate(self) -> None:
        """Forget the kept results: the next report runs every check."""
        self._results.clear()
        self._report = None

    def names(self, include_optional: bool = False) -> list[str]:
        return [n for n, (_, opt) in self._checks.items() if include_optional or not opt]

    def check_all(self, include_optional: bool = False) -> defer.Deferred:
        """A Deferred of every component (registration order). When every result is still kept,
        it has already fired: a report then costs no Deferred per component."""
        now = self.clock.seconds()
        report = self._report
        if report is not None and not include_optional and now - report[0] < self.cache_seconds:
            return defer.succeed(report[1])
        names = self.names(include_optional)
        results: list = []
        pending: list[tuple[int, defer.Deferred]] = []
        for name in names:
            kept = self._results.get(name)
            if kept is not None and now - kept[1] < self.cache_seconds and not self._checks[name][1]:
                results.append(kept[0])
            else:
                pending.append((len(results), self._shared_run(name)))
                results.append(None)
        if not pending:
            if not include_optional and names:
                oldest = min(self._results[name][1] for name in names)
                self._report = (oldest, results)
            return defer.succeed(results)

        def fill(found: list) -> list:
            for (index, _), component in zip(pending, found):
                results[index] = component
            return results

        return defer.gatherResults([d for _, d in pending]).addCallback(fill)

    def _shared_run(self, name: str) -> defer.Deferred:
        """The result of the check run in progress for ``name`` (one is started if none is)."""
        waiter: defer.Deferred = defer.Deferred()
        waiters = self._running.get(name)
        if waiters is not None:
            waiters.append(waiter)
            return waiter
        self._running[name] = [waiter]

        def done(component: Component) -> None:
            self._results[name] = (component, self.clock.seconds())
            self._report = None
            for each in self._running.pop(name, []):
                each.callback(component)

        # _run never fails (a failing check is an unhealthy component)
        defer.Deferred.fromCoroutine(self._run(name)).addCallback(done)
        return waiter

    async def _run(self, name: str) -> Component:
        check, _ = self._checks[name]
        started = self.clock.seconds()
        try:
            d = defer.ensureDeferred(check())
            d.addTimeout(self.timeout, self.clock)
            component = await d
        except defer.TimeoutError:
            return Component(name, UNHEALTHY, f"check timed out after {self.timeout:g} s")
        except Exception as e:  # a broken check is a finding, not a 500
            return Component(name, UNHEALTHY, f"check failed: {type(e).__name__}")
        if component.latency_ms is None:
            component = replace(component, latency_ms=round((self.clock.seconds() - started) * 1000, 3))
        return component
