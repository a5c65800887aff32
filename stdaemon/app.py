"""The App context: one object that holds each single source of truth.

Built once by :func:`stdaemon.service.build_app` and passed to every surface
and service.  Capabilities hang their objects here (``ctx.audit``,
``ctx.secrets``, ``ctx.http_clients``, ``ctx.rate_limiter``, …) so there is
exactly one of each.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import MultiService

from stdaemon import __version__
from stdaemon.users.auth import Authenticator
from stdaemon.config import Config, state_path
from stdaemon.http.client_ip import parse_networks
from stdaemon.health.service import HealthRegistry
from stdaemon.metrics.service import Metrics
from stdaemon.store.database import Database
from stdaemon.timers import SafeTimerService


class App:
    version = __version__

    def __init__(self, config: Config, reactor: Any, clock: Optional[Any] = None,
                 db: Optional[Database] = None):
        self.config = config
        self.reactor = reactor
        # Every timer and timestamp goes through ``clock`` (IReactorTime).
        self.clock = clock if clock is not None else reactor
        self.started_at = self.clock.seconds()
        self.db = db or Database(self.database_path, reactor)
        self.health = HealthRegistry(self.clock, cache_seconds=config.server.health_cache_seconds)
        self.metrics = Metrics(self.clock)
        self.auth = Authenticator(self.db, self.clock)
        self.trusted_proxies = parse_networks(config.server.trusted_proxies)
        # Long-running services (timers, pools) are children of this one.
        self.services = MultiService()
        self.services.setName("stdaemon-app")
        # Filled in by capabilities as they are wired (see service.py).
        self.audit: Any = None
        self.secrets: Any = None
        self.http_clients: Any = None
        self.rate_limiter: Any = None
        self.timer_failures: dict[str, int] = {}
        # Called when the daemon starts draining (after it stops listening):
        # end long-lived responses such as SSE streams.
        self.drain_hooks: list[Callable[[], None]] = []

    @property
    def state_dir(self) -> str:
        return state_path(self.config)

    @property
    def database_path(self) -> str:
        return state_path(self.config, "config", "cloud", "jobs.db")

    def path(self, *parts: str) -> str:
        return state_path(self.config, *parts)

    def now(self) -> float:
        return self.clock.seconds()

    def add_timer(self, name: str, interval: float, fn: Callable[[], Any],
                  now: bool = False) -> SafeTimerService:
        """A periodic job on the injected clock that survives its own errors
        (logged and counted in ``timer_failures``)."""

        def count(timer: str) -> None:
            self.timer_failures[timer] = self.timer_failures.get(timer, 0) + 1

        timer = SafeTimerService(name, interval, fn, self.clock, now=now, on_error=count)
        timer.setServiceParent(self.services)
        return timer

    async def poll_change_counters(self) -> None:
        """One read of the database's change counters (bumped by triggers, whoever writes): the
        verified-key cache and the kept job rows forget what another process may have changed."""
        from stdaemon.users.api_keys import change_counters

        counters = await self.db.run_read(change_counters)
        self.auth.saw_generation(counters.get("auth", 0))
        self.db.saw_counter("jobs", counters.get("jobs", 0))

    last_db_latency_ms: Optional[float] = None

    def outputs_dir(self) -> str:
        """Root of stored job outputs (S8 ``s3_output_path`` default)."""
        return self.path("outputs")

    def outputs_root(self) -> str:
        """Where job outputs are stored now: the provider setting ``s3_output_path``
        when it was set (file, env or API), else :meth:`outputs_dir`."""
        import os

        providers = getattr(self, "providers", None)
        try:
            value, source = providers.effective("replicate")["s3_output_path"]
        except Exception:  # providers not wired (tests) or unknown provider
            return self.outputs_dir()
        if source == "default" or not value:
            return self.outputs_dir()
        return os.path.abspath(os.path.expanduser(str(value)))
