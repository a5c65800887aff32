"""Build the service tree from the config.

``StdaemonService`` (a MultiService) owns:
- the listeners, built from endpoint strings (``tcp:``, ``ssl:``,
  ``systemd:domain=INET:name=…``); bound in ``privilegedStartService`` so a
  port that cannot be bound stops start-up with a clear message;
- the App context (database, health, metrics, auth, capabilities) and its
  child services (timers, pools);
- start-up: open the database and migrate, create the first admin key, wire
  the capabilities, then mark the daemon ready;
- graceful stop on SIGTERM: not ready, stop accepting, let in-flight requests
  finish (bounded by ``server.shutdown_timeout``), stop timers, close the
  database.

Size: ``build_app`` is the one composition root, so every capability's wiring lives here by
design; splitting it would scatter the order in which services are built.
"""

from __future__ import annotations

import signal
from typing import Any, Optional

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import ILogObserver
from twisted.python.components import Componentized

from stdaemon.app import App
from stdaemon.approvals.http import ApprovalsSurface
from stdaemon.approvals.http_quotas import QuotasSurface
from stdaemon.approvals.service import ApprovalService, QuotaService
from stdaemon.approvals.service import EXPIRY_INTERVAL as APPROVAL_EXPIRY_INTERVAL
from stdaemon.audit import store as audit_store
from stdaemon.audit.chain import MINUTE
from stdaemon.audit.http import AuditSurface
from stdaemon.audit.service import AuditLog, key_file_path
from stdaemon.backup.http import AdminBackupsSurface
from stdaemon.backup.service import BackupService
from stdaemon.backup.store import JobStore
from stdaemon.cluster.service import ClusterService
from stdaemon.config import Config
from stdaemon.configs.http import ConfigsSurface
from stdaemon.configs.service import ConfigService
from stdaemon.console.http import ConsoleSurface
from stdaemon.events.http import EventsSurface
from stdaemon.events.service import PUBLIC_JOB_FIELDS, EventBus
from stdaemon.health.checks import CoreChecks
from stdaemon.health.http import HealthSurface
from stdaemon.http.openapi import OpenApiSurface
from stdaemon.http.request import StdaemonSite
from stdaemon.http.root import Root
from stdaemon.jobs.dispatch import Submissions
from stdaemon.jobs.http import JobsSurface
from stdaemon.jobs.http_logs import JobLogsSurface
from stdaemon.jobs.http_logs import LogStreams
from stdaemon.jobs.service import JobService
from stdaemon.logs import configure_structured_logging, get_logger, make_observer, reopen_log_files, track_observer
from stdaemon.metrics import service as metrics_service
from stdaemon.metrics.http import MetricsSurface
from stdaemon.metrics.spend import SPEND_REFRESH_INTERVAL
from stdaemon.providers.http import ProvidersSurface
from stdaemon.providers.service import ProviderManager
from stdaemon.providers.settings import PROVIDERS
from stdaemon.ratelimit import service as rate_limit
from stdaemon.ratelimit.http import RateLimitMiddleware
from stdaemon.ratelimit.rules import rule_set_from_config
from stdaemon.s3.backend import object_backend
from stdaemon.s3.credentials import UPLOAD_BUCKET, UploadCredentials
from stdaemon.s3.http import StorageSurface
from stdaemon.s3.progress import UploadProgress
from stdaemon.s3.service import S3Service
from stdaemon.secrets.http import AdminSecretsSurface
from stdaemon.secrets.service import SecretsService
from stdaemon.store import key_fingerprints
from stdaemon.threads import BlockingPool, PoolService, install_pool
from stdaemon.users import store as users
from stdaemon.users.auth import GENERATION_POLL_SECONDS
from stdaemon.users.http import UsersSurface
from stdaemon.users.http_auth import AuthSurface
from stdaemon.users.sessions import SessionManager
from stdaemon.webhooks.http import WebhooksSurface
from stdaemon.webhooks.http_endpoints import WebhookEndpointsSurface
from stdaemon.webhooks.service import SWEEP_INTERVAL as WEBHOOK_SWEEP_INTERVAL
from stdaemon.webhooks.service import WebhookService

log = get_logger("stdaemon.service")

SETUP_LINK_TTL = 30 * 60.0  # seconds the first sign-in link stays valid (injected clock)
CHECKSUM_LOAD_DELAY = 1.0  # seconds after ready before the C checksum libraries are imported


def build_app(config: Config, reactor: Any, clock: Optional[Any] = None) -> tuple[App, Root]:
    """The composition root: every capability service built once, in dependency order, each given
    its collaborators explicitly; then the surfaces, which only read services from the App."""
    app = App(config, reactor, clock)
    # health: the daemon's own components, first in every report (database, disk)
    checks = app.health_checks = CoreChecks(app.db, app.clock, app.outputs_root)
    checks.register(app.health)
    app.metrics.set_db_latency_source(lambda: checks.last_db_latency_ms)

    # cluster (cluster.redis_url): job events relayed to the other instances (see "events"); timers
    # that must run once (DB-wide or provider work) get lease=once, those acting on this instance's
    # memory or disk run everywhere. One instance: relay and once are None, every timer runs here.
    app.cluster = ClusterService(config.cluster, app.clock, reactor, event_fields=PUBLIC_JOB_FIELDS)
    app.cluster.setServiceParent(app.services)
    once = app.cluster.leases

    # secrets: env -> file -> AWS -> Vault, cached; its own thread pool; health "secrets"
    secrets = SecretsService(config, app.clock, reactor=reactor)
    secrets.setServiceParent(app.services)
    app.secrets = secrets.manager
    app.health.register("secrets", secrets.health)

    # audit: the one writer (record/record_soon/sampled/append); key from secrets or its file (S7)
    audit = AuditLog(app.db, app.clock, reactor, config.audit, key_file_path(config), app.secrets)
    audit.setServiceParent(app.services)
    app.audit = audit
    app.add_timer("audit-sampler", MINUTE, audit.flush_sampler)
    app.add_timer("audit-counts", 3600.0, audit.refresh_counts)
    app.add_timer("audit-retention", 3600.0, audit.prune, lease=once)
    app.health.register("audit", audit.health)

    # backups: online backups and restore (keeping the audit log), one thread; S13
    backup_pool = BlockingPool(reactor, "stdaemon-backup", maxthreads=1)
    PoolService(backup_pool).setServiceParent(app.services)
    backup_store = JobStore(app.database_path, config=config, clock=app.clock,
                            preserved_tables=audit_store.PRESERVED_TABLES)
    app.backups = BackupService(app.db, backup_store, backup_pool, config.backup, app.clock)
    app.backups.after_restore.append(audit.refresh_counts)  # the restored log is recounted
    if config.backup.enabled and app.db.dialect == "postgresql":
        log.warning("backup.enabled is set, but the database is PostgreSQL: stdaemon takes no "
                    "scheduled backups of it; back it up with pg_dump (README, Backup and restore)")
        app.health.register("backup", app.backups.health)
    elif config.backup.enabled:
        app.add_timer("backup", config.backup.interval, app.backups.scheduled, lease=once)
        app.health.register("backup", app.backups.health)

    # S3 (S8): per-job upload credentials, upload progress and the object store of /api/cloud/storage
    s3_pool = install_pool(app, "s3-io", maxthreads=16)
    app.upload_credentials = UploadCredentials(app.db, app.clock,
                                               app.path("config", "cloud", "upload_credentials.key"),
                                               config.jobs.upload_credential_ttl)
    app.upload_progress = UploadProgress(app.clock)
    # storage.backend: the outputs directory (default) or an S3-compatible store shared by instances
    store = object_backend(config.storage, app.outputs_dir(), app.path("spool"), app.clock.seconds(),
                           config.environ, app.secrets.get)
    app.s3 = S3Service(store, s3_pool, app.upload_progress, app.clock, app.outputs_root)
    if config.storage.backend == "s3":
        app.health.register("object_store", app.s3.health)
    app.add_timer("upload-credential-expiry", 60.0, app.upload_credentials.sweep, lease=once)
    # Stale multipart uploads live on this instance's disk (local), or in the store every instance
    # shares (s3): there, one instance sweeps them.
    app.add_timer("s3-multipart-cleanup", 3600.0, app.s3.cleanup, now=True,
                  lease=once if config.storage.backend == "s3" else None)

    # rate limiting: one RateLimiting (also behind the guide's get_rate_limiter), its middleware, health, sweep
    limits = config.rate_limit
    rules = rule_set_from_config(limits)  # malformed rules stop start-up (InvalidValue naming the key path)
    limiting = rate_limit.make_rate_limiting(limits, app.clock, reactor, app.state_dir)
    limiting.setName("rate-limiter")
    limiting.setServiceParent(app.services)
    rate_limit.install(limiting)
    app.rate_limiter = limiting
    # surfaces that refuse before the body (S3) count their refusals through it too
    app.rate_limit_middleware = RateLimitMiddleware(limiting, rules, clock=app.clock, metrics=app.metrics,
                                                    audit=app.audit, exempt_loopback=limits.exempt_loopback)
    app.health.register("rate_limiter", limiting.health)
    app.metrics.set_tracked_clients_source(app.rate_limit_middleware.tracked_clients)
    app.add_timer("rate-limit-clients-sweep", 30.0, app.rate_limit_middleware.sweep)

    # sessions: the st_session strategy (after API keys) + CSRF, the password pool, the sweep timer
    passwords = BlockingPool(reactor, "stdaemon-passwords", maxthreads=2)
    sessions = SessionManager(app.db, app.clock, passwords, ttl=config.auth.session_ttl,
                              public_url=config.server.public_url)
    app.auth.add_strategy(sessions.authenticate)
    PoolService(passwords).setServiceParent(app.services)
    app.add_timer("session-sweep", sessions.sweep_interval, sessions.sweep, lease=once)
    app.sessions = sessions
    # providers: settings, the outbound client factory and breakers; circuit_breaker:/provider: health
    providers = ProviderManager(config, reactor, app.clock, app.db, app.secrets, app.audit)
    providers.setServiceParent(app.services)
    for name in PROVIDERS:
        app.health.register(f"circuit_breaker:{name}", lambda p=name: providers.breaker_health(p))
        app.health.register(f"provider:{name}", lambda p=name: providers.provider_health(p), optional=True)
    app.providers = providers
    app.http_clients = providers.http
    app.breakers = providers.breakers
    # state cached from the database is reloaded after a restore swaps it (sessions' keys, providers)
    app.backups.after_restore.extend([app.providers.load, _forget_verified_keys(app)])
    # job log streams (SSE, `jobs logs --follow`): ended when the daemon drains
    app.job_log_streams = LogStreams()
    app.drain_hooks.append(app.job_log_streams.close_all)
    # events: the live event bus behind /api/events/stream; its streams end when the daemon drains
    app.events = EventBus(app.clock)
    app.drain_hooks.append(app.events.close_all)
    app.cluster.relay_events(app.events)  # several instances: job events to and from the others
    # configs: named training configs in <state>/configs/<name>/, read and written in their own pool
    app.configs = ConfigService(app.path("configs"), install_pool(app, "stdaemon-configs", maxthreads=2))
    # jobs: the lifecycle and the one job-update path (poller, webhooks, API); "jobs.poll" timer
    app.jobs = JobService(app.db, app.clock, app.providers, app.audit, app.metrics, app.events,
                          app.upload_credentials)
    app.jobs.timer = app.add_timer("jobs.poll", config.jobs.poll_interval, app.jobs.poll_once, lease=once)
    app.backups.after_restore.append(app.jobs.load)
    app.submissions = Submissions(app.jobs, app.providers, app.configs, config.server.public_url)
    # approvals and quotas: checked at submission, a held job gets its request; "approval-expiry" timer
    app.quotas = QuotaService(app.db, app.clock, app.audit)
    app.approvals = ApprovalService(app.db, app.clock, app.audit, app.quotas, app.jobs, app.submissions,
                                    app.providers, config.providers)
    app.add_timer("approval-expiry", APPROVAL_EXPIRY_INTERVAL, app.approvals.expire_due, lease=once)
    app.submissions.submission_checks.append(app.approvals.submission_check)
    app.submissions.hold_hooks.append(app.approvals.hold_job)
    # webhooks: deliveries applied through the jobs' update path; "webhook-deliveries-sweep" timer
    app.webhooks = WebhookService(app.db, app.clock, app.jobs, app.providers, app.secrets, app.audit)
    app.add_timer("webhook-deliveries-sweep", WEBHOOK_SWEEP_INTERVAL, app.webhooks.sweep, lease=once)
    app.backups.after_restore.append(app.webhooks.forget_recent)
    # providers → webhooks: a replaced API token forgets the signing secret learnt with the old one
    app.providers.token_changed_hooks.append(app.webhooks.forget_secret)
    # metrics: the figures the capabilities above keep; the providers' spend in their cost period
    wire_metrics(app)
    app.cluster.register(app.health, app.metrics)  # several instances: cluster_events/_leases, figures

    # the surfaces: they only read the services above; rate limiting is the first middleware
    root = Root(app, build_surfaces(app))
    root.middlewares.insert(0, app.rate_limit_middleware)
    return app, root


def build_surfaces(app: App) -> list:
    """Every HTTP surface, composed under one root, in the order their routes are matched.
    Add new surfaces here."""
    surfaces: list = [
        HealthSurface(app),  # /health, /api/cloud/health*
        AdminBackupsSurface(app),  # /api/admin/backups*, /api/admin/database, /api/backup*, /api/database/*
        AdminSecretsSurface(app),  # /api/admin/secrets (states, never values)
        AuthSurface(app),  # /api/auth/*
        UsersSurface(app),  # /api/users*
        ApprovalsSurface(app),  # /api/approvals*
        QuotasSurface(app),  # /api/quotas*
        EventsSurface(app),  # /api/events/stream
        ConsoleSurface(app),  # web console: /, /console/, /static/<name> (S15)
        ProvidersSurface(app),  # /api/cloud/providers*
        JobsSurface(app),  # /api/cloud/jobs*
        ConfigsSurface(app),  # /api/configs* (named training configs)
        JobLogsSurface(app),  # /api/cloud/jobs/<id>/logs/stream (SSE, `jobs logs --follow`)
        StorageSurface(app),  # /api/cloud/storage (S3)
        AuditSurface(app),  # /api/audit*
        WebhooksSurface(app),  # /api/webhooks/<provider>
        WebhookEndpointsSurface(app),  # GET /api/webhooks* (SimpleTuner's `webhooks` commands)
        MetricsSurface(app),  # /api/cloud/metrics/prometheus, /api/cloud/metrics/config*, /api/metrics/*
    ]
    surfaces.append(OpenApiSurface(app, surfaces))  # /api/openapi.json, from the routes above (S19)
    return surfaces


def wire_metrics(ctx: App) -> None:
    metrics, db = ctx.metrics, ctx.db
    # the job hooks (webhooks, approvals) forward to the jobs service: one set of job figures
    metrics.register_jobs_source(ctx.jobs.metrics, track=ctx.jobs.track)
    metrics.register_approvals_source(ctx.approvals.metrics)
    audit_log = ctx.audit
    metrics.register_audit_source(lambda: (audit_log.total, audit_log.count_last_24h()))
    breakers = ctx.breakers
    metrics.register_breaker_source(
        lambda: [(name, b.state_value, b.failures_total) for name, b in sorted(breakers.all().items())])
    progress = ctx.upload_progress
    metrics.register_uploads_source(
        lambda: (progress.uploads_total, progress.upload_bytes_total, progress.upload_failures_total))
    metrics.spend.follow(PROVIDERS, ctx.providers.values, db)
    metrics.register_provider_source(metrics.spend.figures)
    ctx.add_timer("metrics.provider_spend", SPEND_REFRESH_INTERVAL,
                  lambda: defer.ensureDeferred(metrics.spend.refresh(db)))
    # saved settings and spend re-read after a restore swaps the database
    ctx.backups.after_restore.append(lambda: metrics_service.load_saved(metrics, db))


def _forget_verified_keys(ctx: App) -> Any:
    async def forget() -> None:
        ctx.auth.invalidate()
    return forget


async def start_capabilities(ctx: App) -> None:
    """Start-up work that needs the open database (runs before ``ready``)."""
    await ctx.poll_change_counters()
    # Key/user and job changes by another instance or stdaemon-admin: verified keys and kept job
    # rows are forgotten within a second.
    ctx.add_timer("change-counters", GENERATION_POLL_SECONDS,
                  lambda: defer.ensureDeferred(ctx.poll_change_counters()))
    await ctx.audit.start()  # audit HMAC key (secrets or 0600 key file) and counters
    await ctx.upload_credentials.start(ctx.secrets)  # its key (secrets or 0600 key file)
    await check_shared_keys(ctx)
    await ctx.s3.start()  # the object store's keys when they are named secrets
    await ctx.providers.load()  # provider settings saved through the API
    await ctx.jobs.load()  # running job totals for metrics (ctx.jobs.metrics())
    await ctx.approvals.load()  # approval request counts for metrics
    await metrics_service.load_saved(ctx.metrics, ctx.db)  # metrics settings saved through the API; provider spend


class KeyMismatch(RuntimeError):
    """This instance's keys differ from the ones the shared database was written with."""


async def check_shared_keys(ctx: App) -> None:
    """Compare this instance's audit and upload-credential keys with the fingerprints recorded in
    the database (:mod:`stdaemon.store.key_fingerprints`). On a shared database a difference stops
    start-up (the instance stays not ready, saying which key): serving with it would write audit
    entries that never verify and fail uploads whose credentials another instance issued. On the
    embedded database the operator replaced a key file: the new fingerprint is recorded."""
    mine = {"audit": ctx.audit.key_fingerprint(),
            "upload_credentials": key_fingerprints.fingerprint(ctx.upload_credentials.key)}
    differing = await ctx.db.run_write(key_fingerprints.compare_and_record, mine, ctx.now(),
                                       not ctx.db.shared)
    if not differing:
        return
    names = ", ".join(sorted(differing))
    if ctx.db.shared:
        raise KeyMismatch(
            f"this instance's {names} key differs from the one the shared database was written with: "
            "give every instance the same AUDIT_HMAC_KEY and UPLOAD_CREDENTIALS_KEY secrets (or copy "
            "the key files; README: Running several instances)")
    log.warning("The {names} key changed since the last start; older audit entries verify only with "
                "the old key, and upload credentials issued before cannot be read", names=names)


def listen_descriptions(config: Config) -> list[str]:
    """Endpoint strings; with ``server.ssl_cert``/``ssl_key`` set, ``tcp:``
    listeners serve HTTPS directly (``ssl:`` with that certificate)."""
    out = []
    for description in config.server.listen:
        if config.server.ssl_cert and description.startswith("tcp:"):
            rest = description[len("tcp:"):]
            cert = _escape(config.server.ssl_cert)
            key = _escape(config.server.ssl_key)
            description = f"ssl:{rest}:privateKey={key}:certKey={cert}"
        out.append(description)
    return out


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


class StdaemonService(MultiService):
    def __init__(self, config: Config, reactor: Any, clock: Optional[Any] = None,
                 log_observer: Any = None):
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.ctx, self.root = build_app(config, reactor, clock)
        self.ctx.services.setServiceParent(self)
        self.site = StdaemonSite(self.root, body_policy=self.root.body_policy)
        self.ports: list = []
        self.log_observer = log_observer
        self.started: defer.Deferred = defer.Deferred()
        self._warm_up: Any = None  # the delayed load of the checksum libraries

    # -- logging under twistd -----------------------------------------------

    def setServiceParent(self, parent: Any) -> None:
        # twistd asks the application for an ILogObserver when no --logger
        # was given: offer the structured observer (JSON or text per config).
        if isinstance(parent, Componentized) and self.log_observer is not None:
            if parent.getComponent(ILogObserver, None) is None:
                parent.setComponent(ILogObserver, self.log_observer)
        super().setServiceParent(parent)

    # -- start -----------------------------------------------------------------

    def privilegedStartService(self) -> None:
        for description in listen_descriptions(self.config):
            endpoint = serverFromString(self.reactor, description)
            d = endpoint.listen(self.site)
            failures: list = []
            d.addCallbacks(self.ports.append, failures.append)
            if failures:
                reason = failures[0].getErrorMessage()
                for port in self.ports:
                    port.stopListening()
                raise SystemExit(f"stdaemon: cannot listen on {description}: {reason}")
        super().privilegedStartService()

    def startService(self) -> None:
        if not self.ports:
            # Started without privilegedStartService (tests, embedding).
            self.privilegedStartService()
        super().startService()
        if self.reactor is _global_reactor():
            self.reactor.callWhenRunning(self._install_signal_handlers)
        d = defer.Deferred.fromCoroutine(self._start())
        d.addErrback(self._start_failed)
        d.chainDeferred(self.started)

    def _install_signal_handlers(self) -> None:
        """After the reactor's own handlers: SIGHUP reopens log files
        (logrotate); SIGTERM stops gracefully and the process then exits 0
        (twistd would otherwise re-raise the signal and exit -15)."""

        def on_term(number: int, frame: Any) -> None:
            log.info("Received SIGTERM, stopping gracefully")
            self.reactor.callFromThread(self.reactor.stop)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGHUP, lambda *_: self.reactor.callFromThread(reopen_log_files))

    async def _start(self) -> None:
        ctx = self.ctx
        version = await ctx.db.start()
        log.info("Database: {engine} {where}", engine=ctx.db.dialect,
                 where=ctx.db.engine.description)  # a URL without its password
        key_path = ctx.path("config", "cloud", "admin.key")
        written = await ctx.db.run_write(users.ensure_admin_key, key_path, ctx.now())
        if written:
            log.warning("Created the first admin API key; it is in {path} (mode 0600)", path=written)
        await self._setup_link()
        await start_capabilities(ctx)
        ctx.health.phase = "ready"
        ctx.health.not_ready_reason = None
        # The C CRC libraries load in the s3-io pool a moment after ready (awscrt holds the GIL for
        # tens of milliseconds while it loads): neither the start nor the first upload waits for it.
        self._warm_up = ctx.clock.callLater(CHECKSUM_LOAD_DELAY, ctx.s3.load_checksum_libraries)
        log.info("stdaemon {version} ready on {listen} (schema version {schema})",
                 version=ctx.version, listen=", ".join(self.config.server.listen), schema=version)

    async def _setup_link(self) -> None:
        """Until a first password is set, each start prints a one-time link
        (like Jupyter's token URL) that lets the first admin choose one in the
        console: valid SETUP_LINK_TTL seconds, single use, stored hashed."""
        ctx = self.ctx
        issued = await ctx.db.run_write(users.issue_setup_token, ctx.now(), SETUP_LINK_TTL)
        if issued is None:
            return
        token, username = issued
        base = (self.config.server.public_url or "").rstrip("/")
        if not base and self.ports:
            host = self.ports[0].getHost()
            address = getattr(host, "host", "127.0.0.1")
            if address in ("0.0.0.0", "::", ""):
                address = "127.0.0.1"
            if ":" in address:
                address = f"[{address}]"
            scheme = "https" if self.config.server.ssl_cert else "http"
            base = f"{scheme}://{address}:{host.port}"
        ctx.setup_url = f"{base}/console/#setup={token}"
        log.warning("First sign-in: open {url} within {minutes} minutes to set the password of "
                    "{username} (the link works once)", url=ctx.setup_url,
                    minutes=int(SETUP_LINK_TTL // 60), username=username)

    def _start_failed(self, failure: Any) -> None:
        self.ctx.health.not_ready_reason = f"start-up failed: {failure.getErrorMessage()}"
        log.failure("Start-up failed; the daemon is not ready", failure=failure)

    # -- stop ------------------------------------------------------------------

    def stopService(self) -> defer.Deferred:
        return defer.Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        ctx = self.ctx
        ctx.health.phase = "stopping"
        if self._warm_up is not None and self._warm_up.active():
            self._warm_up.cancel()
        log.info("Stopping: no new connections, finishing {n} in-flight request(s)", n=self.root.inflight)
        await defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in self.ports])
        self.ports = []
        for hook in list(ctx.drain_hooks):  # end long-lived responses (SSE) so requests drain
            hook()
        if self.root.inflight:
            idle = self.root.idle()
            idle.addTimeout(self.config.server.shutdown_timeout, ctx.clock)
            try:
                await idle
            except defer.TimeoutError:
                log.warning("{n} request(s) still running after {t} s; stopping anyway",
                            n=self.root.inflight, t=self.config.server.shutdown_timeout)
        await defer.maybeDeferred(MultiService.stopService, self)
        ctx.db.stop()
        log.info("Stopped; database closed")


def _global_reactor() -> Any:
    # Imported when asked for, not at module import: importing it installs the default reactor,
    # and twistd must be free to install the one it was asked for first.
    from twisted.internet import reactor

    return reactor


def make_service(config: Config, reactor: Any = None, clock: Any = None,
                 install_logging: bool = False) -> StdaemonService:
    if reactor is None:
        reactor = _global_reactor()
    observer = make_observer(config.logging.level, config.logging.format == "json",
                             config.logging.file or None)
    track_observer(observer)
    if install_logging:
        configure_structured_logging(config.logging.level, config.logging.format == "json",
                                     config.logging.file or None)
    return StdaemonService(config, reactor, clock, log_observer=observer)
