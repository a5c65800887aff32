"""Prometheus metrics (S10): one object owning its own CollectorRegistry.

No module-level metrics on the global registry: each :class:`Metrics`
instance has its own ``CollectorRegistry``, so tests and several daemons in
one process never collide.  One custom collector per category renders, on
scrape, from figures kept in memory (:mod:`stdaemon.metrics.collectors`):
counters are bumped where events happen (the hooks below) and state gauges
read cheap sources (breaker objects, approval counts, the audit writer's
counters).  A scrape never scans a table, so it costs the same with 100 000
jobs as with 10.

Hooks (called by the capability where the event happens; all are cheap,
synchronous and never raise into the caller):

=================================================  ==========================================
``observe_http(endpoint, status, latency_ms)``     the root, after every request
``job_created(status, cost_usd=0.0, ...)``          jobs: after a new job row is committed
``job_changed(before, after)``                      jobs: after any committed job row change
                                                   (two row dicts; derives the status move,
                                                   cost delta and duration)
``job_transition(old, new, cost_delta, duration)``  jobs: the same, from plain values
``job_deleted(status, ...)``                        jobs: after a job row is deleted
``rate_limited()``                                  rate limiter: each violation (429)
``set_tracked_clients_source(fn)``                  rate limiter: ``fn() -> int``
``approval_changed(old, new)``                      approvals (only without a source)
``register_approvals_source(fn)``                   approvals: ``fn() -> {"pending", "by_status"}``
``audit_recorded(timestamp=None)``                  audit (only without a source)
``register_audit_source(fn)``                       audit: ``fn() -> (total, last_24h)``
``register_breaker_source(fn)``                     breakers: ``fn() -> [(provider, state_value,
                                                   failures_total)]``
``register_provider_source(fn)``                    providers: ``fn() -> [(provider,
                                                   percent_used|None, balance_usd|None)]``
``register_uploads_source(fn)``                     the S3 endpoint: ``fn() -> (uploads_total,
                                                   upload_bytes_total, upload_failures_total)``
``set_db_latency_source(fn)``                       health: ``fn() -> ms | None``
``register_cluster_source(fn)``                     cluster (only with ``cluster.redis_url``):
                                                   ``fn() -> dict`` (exported with ``health``)
``register_jobs_source(fn, track=None)``            jobs: ``fn() -> dict`` like
                                                   :meth:`Metrics.jobs_figures`; the job hooks
                                                   then forward to ``track(before, after)``
=================================================  ==========================================

The composition root (``stdaemon.service.build_app``) registers every source
once the capability exists, and points :attr:`Metrics.spend` at the providers;
:func:`load_saved` (start, and after a backup restore) reads the saved
settings and the providers' spend of the current period.

Settings (``prometheus_enabled``, ``prometheus_categories``) are layered:
config ``metrics.*`` under values saved through the API in the ``settings``
table (namespace ``metrics``, :mod:`stdaemon.metrics.store`).
``metrics.bearer_token`` is config only.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from stdaemon.jobs import status as st
from stdaemon.logs import get_logger
from stdaemon.metrics import collectors as families
from stdaemon.metrics import store
from stdaemon.metrics.collectors import APPROVAL_STATUSES, Category, Selection, first_per_provider
from stdaemon.config.schema import MetricsConfig
from stdaemon.invalid import InvalidValue
from stdaemon.metrics.settings import CATEGORIES, SETTING_KEYS, validate_update
from stdaemon.metrics.spend import SpendTracker

log = get_logger("stdaemon.metrics")

DAY = 86400.0
MINUTE = 60.0


def _job_duration(job: Mapping[str, Any]) -> Optional[float]:
    if job.get("status") not in st.TERMINAL:
        return None
    started, completed = job.get("started_at"), job.get("completed_at")
    if started is None or completed is None:
        return None
    return max(0.0, float(completed) - float(started))


class Metrics:
    def __init__(self, clock: Any, config: Optional[MetricsConfig] = None, started_at: Optional[float] = None):
        """``config``: the ``metrics`` config section (default: its defaults); ``started_at``:
        the daemon's start (the uptime gauge's origin; default: now)."""
        if config is None:
            config = MetricsConfig()
        self.clock = clock
        self.started_at = clock.seconds() if started_at is None else started_at
        self.registry = CollectorRegistry(auto_describe=False)
        # endpoint → [count, total latency ms]; endpoint_status → count
        self.http_requests: dict[str, list] = {}
        self.http_errors: dict[str, int] = {}
        # Rate limiting (S11): ``rate_limited()`` for every violation and the
        # tracked-clients reader (both kept as attributes the middleware uses).
        self.rate_limit_violations = 0
        self.rate_limit_tracked_clients: Callable[[], int] = lambda: 0
        # Jobs: kept by the hooks, loaded by ``load_jobs`` (one aggregate query),
        # unless a jobs source owns them.
        self.jobs_total = 0
        self.jobs_by_status: dict[str, int] = {s: 0 for s in st.STATUSES}
        self.cost_usd_total = 0.0
        self.duration_seconds_total = 0.0
        self.durations = 0
        self._jobs_source: Optional[Callable[[], Mapping[str, Any]]] = None
        self._jobs_track: Optional[Callable[[Optional[Mapping], Optional[Mapping]], None]] = None
        # Approvals / audit: sources, or counts kept by the fallback hooks.
        self._approvals_source: Optional[Callable[[], Mapping[str, Any]]] = None
        self.approvals_by_status: dict[str, int] = {s: 0 for s in APPROVAL_STATUSES}
        self._audit_source: Optional[Callable[[], tuple[int, int]]] = None
        self.audit_total = 0
        self._audit_buckets: dict[int, int] = {}
        # Uploads through the S3 endpoint (since start-up).
        self._uploads_source: Callable[[], tuple[int, int, int]] = lambda: (0, 0, 0)
        # Health.
        self.uptime_origin = self.started_at
        self._db_latency_source: Callable[[], Optional[float]] = lambda: None
        self._cluster_source: Optional[Callable[[], Mapping[str, Any]]] = None
        # Breakers and providers.
        self._breaker_sources: list[Callable[[], Iterable[tuple]]] = []
        self._provider_sources: list[Callable[[], Iterable[tuple]]] = []
        # The providers' spend in their cost period (see ``stdaemon.metrics.spend``).
        self.spend = SpendTracker(clock)
        # Settings: config values, overlaid by those saved through the API.
        self._config_settings = {
            "prometheus_enabled": bool(config.prometheus_enabled),
            "prometheus_categories": tuple(config.prometheus_categories),
        }
        self.bearer_token: str = config.bearer_token or ""
        self._api_settings: dict[str, Any] = {}
        self.collectors: dict[str, Category] = {
            "jobs": Category("jobs", self._collect_jobs),
            "http": Category("http", self._collect_http),
            "rate_limits": Category("rate_limits", self._collect_rate_limits),
            "approvals": Category("approvals", self._collect_approvals),
            "audit": Category("audit", self._collect_audit),
            "health": Category("health", self._collect_health),
            "circuit_breakers": Category("circuit_breakers", self._collect_breakers),
            "provider": Category("provider", self._collect_provider),
        }
        for name in CATEGORIES:
            self.registry.register(self.collectors[name])

    # -- settings -----------------------------------------------------------------------

    def apply_saved(self, saved: Mapping[str, Any]) -> None:
        """Settings read from the database (invalid saved values are ignored)."""
        values: dict[str, Any] = {}
        for key, value in saved.items():
            try:
                values.update({k: v for k, v in validate_update({key: value}).items() if v is not None})
            except InvalidValue as exc:
                log.warning("Ignoring saved metrics setting {field}: {reason}", field=exc.field,
                            reason=exc.reason)
        self._api_settings = values

    def settings(self) -> dict[str, Any]:
        enabled = self._api_settings.get("prometheus_enabled", self._config_settings["prometheus_enabled"])
        categories = self._api_settings.get("prometheus_categories",
                                            self._config_settings["prometheus_categories"])
        return {"prometheus_enabled": bool(enabled), "prometheus_categories": list(categories)}

    def sources(self) -> dict[str, str]:
        return {key: ("api" if key in self._api_settings else "config") for key in SETTING_KEYS}

    @property
    def enabled(self) -> bool:
        return self.settings()["prometheus_enabled"]

    @property
    def categories(self) -> list[str]:
        return self.settings()["prometheus_categories"]

    # -- rendering ---------------------------------------------------------------------

    def render(self, categories: Optional[Sequence[str]] = None,
               accept: Optional[str] = None) -> tuple[bytes, str]:
        """The exposition of ``categories`` (default: the configured ones) in the
        format ``accept`` asks for: text 0.0.4 unless OpenMetrics is requested."""
        chosen = self.categories if categories is None else list(categories)
        encoder, content_type = choose_encoder(accept or "")
        selection = Selection([self.collectors[c] for c in CATEGORIES if c in chosen])
        return encoder(selection), content_type

    # -- hooks: http ------------------------------------------------------------------

    def observe_http(self, endpoint: str, status: int, latency_ms: float) -> None:
        entry = self.http_requests.get(endpoint)
        if entry is None:
            entry = self.http_requests[endpoint] = [0, 0.0]
        entry[0] += 1
        entry[1] += latency_ms
        if status >= 400:
            key = f"{endpoint}_{status}"
            self.http_errors[key] = self.http_errors.get(key, 0) + 1

    # -- hooks: jobs ------------------------------------------------------------------

    def register_jobs_source(self, fn: Optional[Callable[[], Mapping[str, Any]]],
                             track: Optional[Callable[[Optional[Mapping], Optional[Mapping]], None]] = None) -> None:
        """Let another owner of job figures feed the ``jobs`` category
        (``fn() -> dict`` shaped like :meth:`jobs_figures`); ``None`` unsets.
        With ``track(before, after)`` the job hooks below forward every change
        to that owner, so callers always use ``ctx.metrics.job_*`` and the
        figures stay in one place."""
        self._jobs_source = fn
        self._jobs_track = track if fn is not None else None

    def _forward(self, before: Optional[Mapping], after: Optional[Mapping]) -> bool:
        if self._jobs_track is None:
            return False
        self._jobs_track(before, after)
        return True

    def job_created(self, status: str, cost_usd: float = 0.0, *, provider: Optional[str] = None,
                    created_at: Optional[float] = None) -> None:
        if self._jobs_track is not None:
            self._forward(None, {"status": status, "cost_usd": cost_usd or 0.0, "provider": provider,
                                 "created_at": created_at, "started_at": None, "completed_at": None})
            self._add_spend(cost_usd or 0.0, provider, created_at)
            return
        self.jobs_total += 1
        self.jobs_by_status[status] = self.jobs_by_status.get(status, 0) + 1
        self._add_cost(cost_usd or 0.0, provider, created_at)

    def job_transition(self, old: Optional[str], new: Optional[str], cost_delta: float = 0.0,
                       duration: Optional[float] = None, *, provider: Optional[str] = None,
                       created_at: Optional[float] = None) -> None:
        """A committed change of one job: status ``old → new`` (equal when only
        columns changed), cost change in USD, and its run time when it just
        finished (terminal with both timestamps)."""
        if self._jobs_track is not None:
            blank = {"cost_usd": 0.0, "started_at": None, "completed_at": None}
            self._forward(dict(blank, status=old) if old is not None else None,
                          dict(blank, status=new, cost_usd=cost_delta or 0.0,
                               started_at=0.0 if duration is not None else None,
                               completed_at=duration) if new is not None else None)
            self._add_spend(cost_delta or 0.0, provider, created_at)
            return
        if old != new:
            if old is not None:
                self.jobs_by_status[old] = max(0, self.jobs_by_status.get(old, 0) - 1)
            if new is not None:
                self.jobs_by_status[new] = self.jobs_by_status.get(new, 0) + 1
        if cost_delta:
            self._add_cost(cost_delta, provider, created_at)
        if duration is not None:
            self.duration_seconds_total += duration
            self.durations += 1

    def job_changed(self, before: Optional[Mapping[str, Any]], after: Optional[Mapping[str, Any]]) -> None:
        """Derive the transition from the row before and after a committed write
        (``store.transition`` returns both).  Either may be None (no-op then,
        except a None ``before`` counts a new job)."""
        try:
            if after is None:
                return
            if self._jobs_track is not None:
                if before is not None and dict(before) == dict(after):
                    return
                self._forward(before, after)
                delta = float(after.get("cost_usd") or 0.0) - float((before or {}).get("cost_usd") or 0.0)
                self._add_spend(delta, after.get("provider"), after.get("created_at"))
                return
            if before is None:
                self.job_created(after["status"], float(after.get("cost_usd") or 0.0),
                                 provider=after.get("provider"), created_at=after.get("created_at"))
                return
            delta = float(after.get("cost_usd") or 0.0) - float(before.get("cost_usd") or 0.0)
            old_duration, new_duration = _job_duration(before), _job_duration(after)
            duration = new_duration if old_duration is None else None
            self.job_transition(before["status"], after["status"], delta, duration,
                                provider=after.get("provider"), created_at=after.get("created_at"))
        except Exception:
            log.failure("Metrics job hook failed")

    def job_deleted(self, status: str, duration: Optional[float] = None,
                    job: Optional[Mapping[str, Any]] = None) -> None:
        """A job row was deleted: it leaves ``jobs_by_status`` and the duration
        average; ``jobs_total`` and ``cost_usd_total`` are counters and keep it."""
        if self._jobs_track is not None:
            self._forward(job if job is not None else {"status": status, "cost_usd": 0.0, "started_at": None,
                                                       "completed_at": None}, None)
            return
        if job is not None:
            duration = _job_duration(job)
        self.jobs_by_status[status] = max(0, self.jobs_by_status.get(status, 0) - 1)
        if duration is not None and self.durations > 0:
            self.durations -= 1
            self.duration_seconds_total = max(0.0, self.duration_seconds_total - duration)

    def _add_cost(self, delta: float, provider: Optional[str], created_at: Optional[float]) -> None:
        self.cost_usd_total += delta
        self._add_spend(delta, provider, created_at)

    def _add_spend(self, delta: float, provider: Optional[str], created_at: Optional[float]) -> None:
        if provider is not None and delta:
            self.spend.add(provider, delta, created_at)

    def load_job_aggregates(self, aggregates: Mapping[str, tuple]) -> None:
        """Replace the job figures with the result of :func:`stdaemon.metrics.store.job_aggregates`."""
        by_status = {s: 0 for s in st.STATUSES}
        total = 0
        cost = duration_sum = 0.0
        durations = 0
        for status, (count, cost_sum, dur_sum, dur_count) in aggregates.items():
            by_status[status] = count
            total += count
            cost += cost_sum
            duration_sum += dur_sum
            durations += dur_count
        self.jobs_by_status, self.jobs_total, self.cost_usd_total = by_status, total, cost
        self.duration_seconds_total, self.durations = duration_sum, durations

    async def load_jobs(self, db: Any) -> None:
        self.load_job_aggregates(await db.run_read(store.job_aggregates))

    def jobs_figures(self) -> dict[str, Any]:
        if self._jobs_source is not None:
            return dict(self._jobs_source())
        by_status = dict(self.jobs_by_status)
        return {
            "jobs_total": self.jobs_total,
            "by_status": by_status,
            "active": sum(by_status.get(s, 0) for s in st.ACTIVE),
            "cost_usd_total": self.cost_usd_total,
            "job_duration_seconds_avg": (self.duration_seconds_total / self.durations) if self.durations else 0.0,
        }

    # -- hooks: rate limits ---------------------------------------------------------------

    def rate_limited(self) -> None:
        self.rate_limit_violations += 1

    def set_tracked_clients_source(self, fn: Callable[[], int]) -> None:
        self.rate_limit_tracked_clients = fn

    # -- hooks: approvals ----------------------------------------------------------------

    def register_approvals_source(self, fn: Optional[Callable[[], Mapping[str, Any]]]) -> None:
        """``fn() -> {"pending": int, "by_status": {status: int}}``."""
        self._approvals_source = fn

    def approval_changed(self, old: Optional[str], new: Optional[str]) -> None:
        """Fallback counting when no approvals source is registered: a request
        was created (``old`` None) or moved ``old → new``."""
        if old is not None:
            self.approvals_by_status[old] = max(0, self.approvals_by_status.get(old, 0) - 1)
        if new is not None:
            self.approvals_by_status[new] = self.approvals_by_status.get(new, 0) + 1

    # -- hooks: audit -------------------------------------------------------------------

    def register_audit_source(self, fn: Optional[Callable[[], tuple[int, int]]]) -> None:
        """``fn() -> (entries_total, entries_last_24h)``."""
        self._audit_source = fn

    def audit_recorded(self, timestamp: Optional[float] = None) -> None:
        """Fallback counting when no audit source is registered."""
        ts = self.clock.seconds() if timestamp is None else timestamp
        self.audit_total += 1
        minute = int(ts // MINUTE)
        self._audit_buckets[minute] = self._audit_buckets.get(minute, 0) + 1
        if len(self._audit_buckets) > 1500:
            self._trim_audit_buckets()

    def _trim_audit_buckets(self) -> None:
        horizon = int(math.floor((self.clock.seconds() - DAY) / MINUTE))
        for minute in [m for m in self._audit_buckets if m < horizon]:
            del self._audit_buckets[minute]

    def audit_figures(self) -> tuple[int, int]:
        if self._audit_source is not None:
            total, last_24h = self._audit_source()
            return int(total), int(last_24h)
        self._trim_audit_buckets()
        horizon = int(math.floor((self.clock.seconds() - DAY) / MINUTE))
        return self.audit_total, sum(n for m, n in self._audit_buckets.items() if m >= horizon)

    # -- hooks: health, breakers, providers, uploads ------------------------------------

    def set_db_latency_source(self, fn: Callable[[], Optional[float]]) -> None:
        self._db_latency_source = fn

    def register_cluster_source(self, fn: Callable[[], Mapping[str, Any]]) -> None:
        """Events relayed/received and timer leases of several instances (``ClusterService.figures``)."""
        self._cluster_source = fn

    def register_breaker_source(self, fn: Callable[[], Iterable[tuple]]) -> None:
        """``fn() -> [(provider, state_value 0|1|2, failures_total)]``."""
        self._breaker_sources.append(fn)

    def register_provider_source(self, fn: Callable[[], Iterable[tuple]]) -> None:
        """``fn() -> [(provider, cost_limit_percent_used | None, credit_balance_usd | None)]``."""
        self._provider_sources.append(fn)

    def register_uploads_source(self, fn: Callable[[], tuple[int, int, int]]) -> None:
        """``fn() -> (uploads_total, upload_bytes_total, upload_failures_total)``."""
        self._uploads_source = fn

    # -- collectors -----------------------------------------------------------------------

    def _collect_jobs(self) -> Iterable[Any]:
        # Job outputs received over the S3 endpoint are counted by the storage
        # capability as bytes arrive (since start-up).
        return families.jobs_families(self.jobs_figures(), self._uploads_source())

    def _collect_http(self) -> Iterable[Any]:
        return families.http_families(self.http_requests, self.http_errors)

    def _collect_rate_limits(self) -> Iterable[Any]:
        return families.rate_limit_families(self.rate_limit_violations,
                                            int(self.rate_limit_tracked_clients() or 0))

    def _collect_approvals(self) -> Iterable[Any]:
        if self._approvals_source is not None:
            figures = self._approvals_source()
            by_status = dict(figures.get("by_status") or {})
            pending = figures.get("pending", by_status.get("pending", 0))
        else:
            by_status = dict(self.approvals_by_status)
            pending = by_status.get("pending", 0)
        return families.approval_families(pending, by_status)

    def _collect_audit(self) -> Iterable[Any]:
        return families.audit_families(*self.audit_figures())

    def _collect_health(self) -> Iterable[Any]:
        yield from families.health_families(max(0.0, self.clock.seconds() - self.uptime_origin),
                                            self._db_latency_source())
        if self._cluster_source is not None:
            yield from families.cluster_families(self._cluster_source())

    def _collect_breakers(self) -> Iterable[Any]:
        return families.breaker_families(first_per_provider(self._breaker_sources))

    def _collect_provider(self) -> Iterable[Any]:
        return families.provider_families(first_per_provider(self._provider_sources))


async def save_settings(metrics: Metrics, db: Any, changes: Mapping[str, Any], now: float) -> None:
    """Save validated ``changes`` (``None``: back to the config value) and apply what is saved."""
    await db.run_write(store.save_settings, changes, now)
    metrics.apply_saved(await db.run_read(store.load_settings))


async def load_saved(metrics: Metrics, db: Any) -> None:
    """The settings saved through the API and the providers' spend of the current
    period, from the database (at start, and after a backup restore)."""
    metrics.apply_saved(await db.run_read(store.load_settings))
    if metrics.spend.providers:
        await metrics.spend.refresh(db)
