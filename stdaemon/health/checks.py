"""The daemon's own health components (S9): ``database`` and ``disk``.

Registered first by the composition root (:meth:`CoreChecks.register`), so
every report starts with them.  The latency of the last database query they
timed is kept here (:attr:`CoreChecks.last_db_latency_ms`): the metrics'
``simpletuner_health_database_latency_ms`` gauge reads it, and a scrape of the
``health`` category measures it afresh (:meth:`CoreChecks.measure_database`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

from stdaemon.health.service import DEGRADED, HEALTHY, UNHEALTHY, Component, HealthRegistry
from stdaemon.store.database import Database

DISK_DEGRADED_BYTES = 1024 ** 3          # < 1 GiB free: degraded
DISK_UNHEALTHY_BYTES = 100 * 1024 ** 2   # < 100 MiB free: unhealthy


class CoreChecks:
    def __init__(self, db: Database, clock: Any, outputs_root: Callable[[], str]):
        """``outputs_root()``: the directory job outputs are written to now (the disk check's)."""
        self.db = db
        self.clock = clock
        self.outputs_root = outputs_root
        #: milliseconds of the last timed database query (None: none yet, or the last scrape's failed)
        self.last_db_latency_ms: Optional[float] = None

    def register(self, health: HealthRegistry) -> None:
        health.register("database", self.database)
        health.register("disk", self.disk)

    async def _timed_ping(self) -> float:
        started = self.clock.seconds()
        await self.db.ping()
        return round((self.clock.seconds() - started) * 1000, 3)

    async def measure_database(self) -> None:
        """A real query timed on the clock, for the database latency gauge."""
        try:
            self.last_db_latency_ms = await self._timed_ping()
        except Exception:
            self.last_db_latency_ms = None

    async def database(self) -> Component:
        try:
            latency = await self._timed_ping()
        except Exception as e:
            return Component("database", UNHEALTHY, f"SQLite database unavailable: {type(e).__name__}")
        self.last_db_latency_ms = latency
        return Component("database", HEALTHY, "SQLite database accessible", latency)

    async def disk(self) -> Component:
        # The filesystem job outputs are written to: the configured s3_output_path.
        directory = self.outputs_root()
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
