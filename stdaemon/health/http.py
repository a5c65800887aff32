"""Health probes (S9): liveness, readiness and the component report.

Health is public and never rate limited.  ``live`` depends on nothing but
the reactor; ``ready`` answers 503 while starting, when the database cannot
answer, and while shutting down; the full report runs every registered
component check (see ``stdaemon/health/service.py``); ``?include_providers=true`` (or
``include_replicate=true``, SimpleTuner's name) adds the live provider checks.
"""

from __future__ import annotations

import os

from klein import Klein

from stdaemon.timestamps import iso
from stdaemon.health.service import DEGRADED, HEALTHY, UNHEALTHY, Component, overall
from stdaemon.http.surface import PUBLIC, Response, Surface, route
from stdaemon.http.validation import QueryModel

DISK_DEGRADED_BYTES = 1024 ** 3          # < 1 GiB free: degraded
DISK_UNHEALTHY_BYTES = 100 * 1024 ** 2   # < 100 MiB free: unhealthy


class HealthQuery(QueryModel):
    include_providers: bool = False
    include_replicate: bool = False   # what SimpleTuner's ``cloud status --replicate`` sends


class HealthSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/health", "/health")

    def __init__(self, ctx):
        super().__init__(ctx)
        ctx.health.register("database", self.check_database)
        ctx.health.register("disk", self.check_disk)

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
        component = await self.check_database()
        if component.status == UNHEALTHY:
            return Response({"status": "not_ready", "reason": "database unavailable"}, status=503,
                            headers={"Retry-After": "5"})
        return {"status": "ready"}

    @route(app, "/api/cloud/health", access=PUBLIC, rate_limited=False, query=HealthQuery)
    async def full(self, request, query: HealthQuery):
        """The component report."""
        include = query.include_providers or query.include_replicate
        components = await self.ctx.health.check_all(include_optional=include)
        status = overall(components)
        if self.ctx.health.phase == "stopping" and status == HEALTHY:
            status = DEGRADED
        body = {
            "status": status,
            "version": self.ctx.version,
            "uptime_seconds": round(self.ctx.clock.seconds() - self.ctx.started_at, 3),
            "timestamp": iso(self.ctx.clock.seconds()),
            "components": [c.as_dict() for c in components],
        }
        return Response(body, status=503 if status == UNHEALTHY else 200)

    # -- component checks ------------------------------------------------------

    async def check_database(self) -> Component:
        started = self.ctx.clock.seconds()
        try:
            await self.ctx.db.ping()
        except Exception as e:
            return Component("database", UNHEALTHY, f"SQLite database unavailable: {type(e).__name__}")
        latency = round((self.ctx.clock.seconds() - started) * 1000, 3)
        self.ctx.last_db_latency_ms = latency
        return Component("database", HEALTHY, "SQLite database accessible", latency)

    async def check_disk(self) -> Component:
        # The filesystem job outputs are written to: the configured s3_output_path.
        directory = self.ctx.outputs_root()
        probe = directory
        while probe and not os.path.exists(probe):
            parent = os.path.dirname(probe)
            if parent == probe:
                break
            probe = parent
        try:
            stats = os.statvfs(probe or "/")
        except OSError as e:
            return Component("disk", UNHEALTHY, f"cannot stat {directory}: {e.strerror}")
        free = stats.f_bavail * stats.f_frsize
        message = f"{free / 1024 ** 3:.1f} GiB free for outputs at {directory}"
        if free < DISK_UNHEALTHY_BYTES:
            return Component("disk", UNHEALTHY, message)
        if free < DISK_DEGRADED_BYTES:
            return Component("disk", DEGRADED, message)
        return Component("disk", HEALTHY, message)
