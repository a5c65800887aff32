"""The App: the framework parts and one typed attribute per capability service.

Built once by :func:`stdaemon.service.build_app` (the composition root), which
constructs every capability service in dependency order and assigns it here
exactly once.  Surfaces receive the App and read services from it; services
themselves never see it: they are given their collaborators explicitly.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Optional

from twisted.application.service import MultiService

from stdaemon import __version__
from stdaemon.users.auth import Authenticator
from stdaemon.config import Config, state_path
from stdaemon.http.client_ip import parse_networks
from stdaemon.health.service import HealthRegistry
from stdaemon.metrics.service import Metrics, load_saved as load_saved_metrics_settings
from stdaemon.store.database import Database
from stdaemon.store.engines import engine_for
from stdaemon.timers import SafeTimerService
from stdaemon.users.store import change_counters

if TYPE_CHECKING:  # the capability services' types; the App itself imports none of them
    from stdaemon.approvals.service import ApprovalService, QuotaService
    from stdaemon.audit.service import AuditLog
    from stdaemon.backup.service import BackupService
    from stdaemon.cluster.service import ClusterService
    from stdaemon.configs.service import ConfigService
    from stdaemon.events.service import EventBus
    from stdaemon.health.checks import CoreChecks
    from stdaemon.jobs.dispatch import Submissions
    from stdaemon.jobs.http_logs import LogStreams
    from stdaemon.jobs.service import JobService
    from stdaemon.outbound.breaker import BreakerRegistry
    from stdaemon.outbound.http import HTTPClientFactory
    from stdaemon.providers.service import ProviderManager
    from stdaemon.ratelimit.http import RateLimitMiddleware
    from stdaemon.ratelimit.service import RateLimiting
    from stdaemon.s3.credentials import UploadCredentials
    from stdaemon.s3.progress import UploadProgress
    from stdaemon.s3.service import S3Service
    from stdaemon.secrets.service import SecretsManager
    from stdaemon.users.sessions import SessionManager
    from stdaemon.webhooks.service import WebhookService


class App:
    version = __version__

    # -- capability services, each assigned once by stdaemon.service.build_app --
    health_checks: "CoreChecks"
    cluster: "ClusterService"
    secrets: "SecretsManager"
    audit: "AuditLog"
    backups: "BackupService"
    rate_limiter: "RateLimiting"
    rate_limit_middleware: "RateLimitMiddleware"
    sessions: "SessionManager"
    providers: "ProviderManager"
    http_clients: "HTTPClientFactory"
    breakers: "BreakerRegistry"
    jobs: "JobService"
    submissions: "Submissions"
    job_log_streams: "LogStreams"
    configs: "ConfigService"
    events: "EventBus"
    approvals: "ApprovalService"
    quotas: "QuotaService"
    upload_credentials: "UploadCredentials"
    upload_progress: "UploadProgress"
    s3: "S3Service"
    webhooks: "WebhookService"
    #: the one-time first sign-in link while no user has a password (logged at start)
    setup_url: Optional[str] = None

    def __init__(self, config: Config, reactor: Any, clock: Optional[Any] = None,
                 db: Optional[Database] = None):
        self.config = config
        self.reactor = reactor
        # Every timer and timestamp goes through ``clock`` (IReactorTime).
        self.clock = clock if clock is not None else reactor
        self.started_at = self.clock.seconds()
        self.db = db or Database(self.database_path, reactor, readers=config.database.pool_size,
                                 engine=engine_for(config.database.url, self.database_path))
        self.health = HealthRegistry(self.clock, cache_seconds=config.server.health_cache_seconds)
        self.metrics = Metrics(self.clock, config.metrics, started_at=self.started_at)
        self.auth = Authenticator(self.db, self.clock)
        self.trusted_proxies = parse_networks(config.server.trusted_proxies)
        # Long-running services (timers, pools) are children of this one.
        self.services = MultiService()
        self.services.setName("stdaemon-app")
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
                  now: bool = False, lease: Any = None) -> SafeTimerService:
        """A periodic job on the injected clock that survives its own errors
        (logged and counted in ``timer_failures``).  With a ``lease`` (several
        instances, ``stdaemon.cluster.leases``) a tick runs only on the lease holder."""

        def count(timer: str) -> None:
            self.timer_failures[timer] = self.timer_failures.get(timer, 0) + 1

        timer = SafeTimerService(name, interval, fn, self.clock, now=now, on_error=count, lease=lease)
        timer.setServiceParent(self.services)
        return timer

    async def poll_change_counters(self) -> None:
        """One read of the database's change counters (bumped by triggers, whoever writes): the
        verified-key cache and the kept job rows forget what another process may have changed,
        settings saved through the API are read again when they changed, and with a shared
        database the job totals are read again when jobs changed."""

        counters = await self.db.run_read(change_counters)
        if self.db.saw_counter("auth", counters.get("auth", 0)):
            self.auth.invalidate()
        if self.db.saw_counter("settings", counters.get("settings", 0)):
            # Provider and metrics settings saved through the API (here, by another instance or
            # by a restore) are read again.
            await self.providers.load()
            await load_saved_metrics_settings(self.metrics, self.db)
        moved = self.db.saw_counter("jobs", counters.get("jobs", 0))
        if moved and self.db.shared:
            # Other instances change jobs too: the running totals behind the job metrics are
            # read again (one aggregate query) so every instance reports the shared figures.
            await self.jobs.load()

    def outputs_dir(self) -> str:
        """Root of stored job outputs (S8 ``s3_output_path`` default)."""
        return self.path("outputs")

    def outputs_root(self) -> str:
        """Where job outputs are stored now: the provider setting ``s3_output_path``
        when it was set (file, env or API), else :meth:`outputs_dir`."""
        value, source = self.providers.effective("replicate")["s3_output_path"]
        if source == "default" or not value:
            return self.outputs_dir()
        return os.path.abspath(os.path.expanduser(str(value)))
