"""Health probes (S9): liveness, readiness and the component report.

Health is public and never rate limited.  ``live`` depends on nothing but
the reactor; ``ready`` answers 503 while starting, when the database cannot
answer, and while shutting down; the full report runs every registered
component check (see ``stdaemon/health/service.py``; the daemon's own ``database`` and
``disk`` are ``stdaemon/health/checks.py``); ``?include_providers=true`` (or
``include_replicate=true``, SimpleTuner's name) adds the live provider checks.
"""

from __future__ import annotations

import json

from klein import Klein

from stdaemon.timestamps import iso
from stdaemon.health.service import DEGRADED, HEALTHY, UNHEALTHY, overall
from stdaemon.http.surface import PUBLIC, Response, Surface, route
from stdaemon.http.validation import QueryModel


class HealthQuery(QueryModel):
    include_providers: bool = False
    include_replicate: bool = False   # what SimpleTuner's ``cloud status --replicate`` sends


class HealthSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/health", "/health")

    @route(app, "/api/cloud/health/live", access=PUBLIC, rate_limited=False)
    def live(self, request):
        """Liveness: the reactor answers."""
        return {"status": "ok"}

    @route(app, "/health", access=PUBLIC, rate_limited=False)
    def health_alias(self, request):
        """Liveness (short path)."""
        return {"status": "ok"}

    @route(app, "/api/cloud/health/ready", access=PUBLIC, rate_limited=False)
    async def ready(self, request):
        """Readiness: 503 while starting, stopping or without a database."""
        health = self.ctx.health
        if health.phase != "ready":
            reason = "shutting down" if health.phase == "stopping" else (health.not_ready_reason or "starting")
            return Response({"status": "not_ready", "reason": reason}, status=503,
                            headers={"Retry-After": "1"})
        component = await self.ctx.health_checks.database()
        if component.status == UNHEALTHY:
            return Response({"status": "not_ready", "reason": "database unavailable"}, status=503,
                            headers={"Retry-After": "5"})
        return {"status": "ready"}

    @route(app, "/api/cloud/health", access=PUBLIC, rate_limited=False, query=HealthQuery)
    async def full(self, request, query: HealthQuery):
        """The component report."""
        include = query.include_providers or query.include_replicate
        components = await self.ctx.health.check_all(include_optional=include)
        status, listed = self._components_json(components)
        if self.ctx.health.phase == "stopping" and status == HEALTHY:
            status = DEGRADED
        now = self.ctx.clock.seconds()
        head = json.dumps({
            "status": status,
            "version": self.ctx.version,
            "uptime_seconds": round(now - self.ctx.started_at, 3),
            "timestamp": iso(now),
        }, separators=(",", ":"))
        body = f'{head[:-1]},"components":{listed}}}'.encode()
        return Response(body, status=503 if status == UNHEALTHY else 200, content_type="application/json")

    _rendered: tuple = ((), HEALTHY, "[]")

    def _components_json(self, components: list) -> tuple[str, str]:
        """The overall status and the JSON of the components, worked out again only when a result
        changed: while results are kept (``server.health_cache_seconds``) reports hand back the
        very same (frozen) components."""
        kept, status, listed = self._rendered
        if kept is not components and (len(kept) != len(components)
                                       or any(a is not b for a, b in zip(kept, components))):
            status = overall(components)
            listed = json.dumps([c.as_dict() for c in components], separators=(",", ":"), default=str)
            self._rendered = (components, status, listed)
        return status, listed
