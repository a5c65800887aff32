"""Health components and readiness (S9).

Capabilities register their components once, here::

    ctx.health.register("rate_limiter", check)   # async () -> Component

``check_all()`` runs every check concurrently, each bounded by a timeout, and
turns a failing or hanging check into an ``unhealthy`` component rather than
an error.  Readiness (``starting``/``ready``/``stopping`` + database) is kept
apart from the components.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer

HEALTHY = "healthy"
DEGRADED = "degraded"
UNHEALTHY = "unhealthy"
_RANK = {HEALTHY: 0, DEGRADED: 1, UNHEALTHY: 2}


@dataclass
class Component:
    name: str
    status: str
    message: str = ""
    latency_ms: Optional[float] = None

    def as_dict(self) -> dict:
        return asdict(self)


def overall(components: list[Component]) -> str:
    """Worst of the components (pure)."""
    worst = HEALTHY
    for component in components:
        if _RANK.get(component.status, 2) > _RANK[worst]:
            worst = component.status
    return worst


Check = Callable[[], Awaitable[Component]]


class HealthRegistry:
    def __init__(self, clock: Any, timeout: float = 5.0):
        self.clock = clock
        self.timeout = timeout
        self._checks: dict[str, tuple[Check, bool]] = {}
        self.phase = "starting"       # starting | ready | stopping
        self.not_ready_reason: Optional[str] = "starting"

    def register(self, name: str, check: Check, optional: bool = False) -> None:
        """``optional`` components run only when asked for (providers)."""
        self._checks[name] = (check, optional)

    def names(self, include_optional: bool = False) -> list[str]:
        return [n for n, (_, opt) in self._checks.items() if include_optional or not opt]

    async def check_all(self, include_optional: bool = False) -> list[Component]:
        names = self.names(include_optional)
        results = await defer.gatherResults(
            [defer.Deferred.fromCoroutine(self._run(name)) for name in names])
        return list(results)

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
            component.latency_ms = round((self.clock.seconds() - started) * 1000, 3)
        return component
