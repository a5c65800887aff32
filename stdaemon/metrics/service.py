"""Prometheus metrics (S10): one object owning its own CollectorRegistry.

No module-level metrics on the global registry: each :class:`Metrics`
instance has its own ``CollectorRegistry``, so tests and several daemons in
one process never collide.  One custom collector per category renders, on
scrape, from figures kept in memory: counters are bumped where events happen
(the hooks below) and state gauges read cheap sources (breaker objects,
approval counts, the audit writer's counters).  A scrape never scans a
table, so it costs the same with 100 000 jobs as with 10.

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
``register_jobs_source(fn, track=None)``            jobs (optional): ``fn() -> dict`` like
                                                   :meth:`Metrics.jobs_figures`; the job hooks
                                                   then forward to ``track(before, after)``
=================================================  ==========================================

``install(ctx)`` (wiring) and ``await start(ctx)`` (start-up, database open)
bind the defaults: the uptime and database-latency sources, the per-provider
cost-limit tracker, and sources other capabilities expose on ``ctx``
(``ctx.approvals.metrics()``, ``ctx.audit.total``/``count_last_24h()``,
``ctx.breakers``, ``ctx.jobs.metrics()``) when they did not register one
themselves.  Without a jobs source, job figures are loaded from the database
with ONE aggregate query at start and after a backup restore.

Settings (``prometheus_enabled``, ``prometheus_categories``) are layered:
config ``metrics.*`` under values saved through the API in the ``settings``
table (namespace ``metrics``).  ``metrics.bearer_token`` is config only.
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import choose_encoder

from stdaemon.config.loader import METRIC_CATEGORIES
from stdaemon.jobs import status as st
from stdaemon.logs import get_logger
from stdaemon.invalid import InvalidValue

log = get_logger("stdaemon.metrics")

CATEGORIES: tuple[str, ...] = tuple(METRIC_CATEGORIES)

# The guide's configuration templates.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "minimal": ("jobs",),
    "standard": ("jobs", "http", "health"),
    "security": ("jobs", "http", "rate_limits", "audit", "approvals"),
    "full": CATEGORIES,
}

SETTINGS_NAMESPACE = "metrics"
SETTING_KEYS = ("prometheus_enabled", "prometheus_categories")

DAY = 86400.0
MINUTE = 60.0
# How often the per-provider period spend is re-read from the database
# (between reads it follows the cost deltas the job hooks report).
SPEND_REFRESH_INTERVAL = 60.0

APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "cancelled")


def normalise_categories(value: Any, field: str = "prometheus_categories") -> tuple[str, ...]:
    """A list of known categories (duplicates dropped, order kept) or InvalidValue."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise InvalidValue(field, "must be a list of category names")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in CATEGORIES:
            raise InvalidValue(field, f"unknown category {item!r} (known: {', '.join(CATEGORIES)})")
        if item not in out:
            out.append(item)
    return tuple(out)


def validate_update(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a PUT body; ``None`` for a key means back to the config value."""
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key not in SETTING_KEYS:
            raise InvalidValue(key, f"unknown setting (known: {', '.join(SETTING_KEYS)})")
        if value is None:
            changes[key] = None
        elif key == "prometheus_enabled":
            if not isinstance(value, bool):
                raise InvalidValue(key, "must be true or false")
            changes[key] = value
        else:
            changes[key] = list(normalise_categories(value, key))
    return changes


# -- pure SQL helpers (conn first) ------------------------------------------------


def load_settings(conn) -> dict[str, Any]:
    rows = conn.execute("SELECT key, value_json FROM settings WHERE namespace = ?", (SETTINGS_NAMESPACE,))
    out = {}
    for key, raw in rows:
        try:
            out[key] = json.loads(raw)
        except ValueError:
            continue
    return out


def save_settings(conn, changes: Mapping[str, Any], now: float) -> None:
    for key, value in changes.items():
        if value is None:
            conn.execute("DELETE FROM settings WHERE namespace = ? AND key = ?", (SETTINGS_NAMESPACE, key))
        else:
            conn.execute(
                "INSERT INTO settings (namespace, key, value_json, updated_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(namespace, key) DO UPDATE SET value_json = excluded.value_json, "
                "updated_at = excluded.updated_at",
                (SETTINGS_NAMESPACE, key, json.dumps(value), now))


_TERMINAL_SQL = ", ".join(f"'{s}'" for s in sorted(st.TERMINAL))

JOB_AGGREGATE_SQL = (
    "SELECT status, COUNT(*), COALESCE(SUM(cost_usd), 0), "
    "COALESCE(SUM(CASE WHEN started_at IS NOT NULL AND completed_at IS NOT NULL "
    f"AND status IN ({_TERMINAL_SQL}) THEN completed_at - started_at END), 0), "
    "COUNT(CASE WHEN started_at IS NOT NULL AND completed_at IS NOT NULL "
    f"AND status IN ({_TERMINAL_SQL}) THEN 1 END) "
    "FROM jobs GROUP BY status"
)


def job_aggregates(conn) -> dict[str, tuple[int, float, float, int]]:
    """ONE aggregate query: status → (count, cost sum, duration sum, durations)."""
    return {row[0]: (int(row[1]), float(row[2]), float(row[3]), int(row[4]))
            for row in conn.execute(JOB_AGGREGATE_SQL)}


def provider_spend(conn, provider: str, since: float) -> float:
    row = conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM jobs WHERE provider = ? AND created_at >= ?",
                       (provider, since)).fetchone()
    return float(row[0])


def audit_counts(conn, since: float) -> tuple[int, dict[int, int]]:
    """Audit entries in total and per minute since ``since`` (fallback counting)."""
    try:
        total = conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0]
        rows = conn.execute("SELECT CAST(timestamp / 60 AS INTEGER), COUNT(*) FROM audit_log "
                            "WHERE timestamp >= ? GROUP BY 1", (since,)).fetchall()
    except Exception:  # no audit table in this schema
        return 0, {}
    return int(total), {int(m): int(n) for m, n in rows}


def _job_duration(job: Mapping[str, Any]) -> Optional[float]:
    if job.get("status") not in st.TERMINAL:
        return None
    started, completed = job.get("started_at"), job.get("completed_at")
    if started is None or completed is None:
        return None
    return max(0.0, float(completed) - float(started))


# -- the metrics object ---------------------------------------------------------------


class _Selection:
    """A registry-like view rendering only some categories (scrape, preview)."""

    def __init__(self, collectors: Sequence[Any]):
        self._collectors = collectors

    def collect(self) -> Iterable[Any]:
        for collector in self._collectors:
            yield from collector.collect()


class _Category:
    """Custom collector of one category: ``render()`` yields metric families."""

    def __init__(self, name: str, render: Callable[[], Iterable[Any]]):
        self.name = name
        self._render = render

    def collect(self) -> Iterable[Any]:
        try:
            families = list(self._render())
        except Exception:
            log.failure("Metrics category {category} failed to render", category=self.name)
            return []
        return families


class Metrics:
    def __init__(self, clock: Any, config: Any = None):
        self.clock = clock
        self.started_at = clock.seconds()
        self.registry = CollectorRegistry(auto_describe=False)
        # endpoint → [count, total latency ms]; endpoint_status → count
        self.http_requests: dict[str, list] = {}
        self.http_errors: dict[str, int] = {}
        # Rate limiting (S11): ``rate_limited()`` for every violation and the
        # tracked-clients reader (both kept as attributes the middleware uses).
        self.rate_limit_violations = 0
        self.rate_limit_tracked_clients: Callable[[], int] = lambda: 0
        # Jobs: kept by the hooks, loaded by ``load_jobs`` (one aggregate query).
        self.jobs_total = 0
        self.jobs_by_status: dict[str, int] = {s: 0 for s in st.STATUSES}
        self.cost_usd_total = 0.0
        self.duration_seconds_total = 0.0
        self.durations = 0
        self._jobs_source: Optional[Callable[[], Mapping[str, Any]]] = None
        # Approvals / audit: sources, or counts kept by the fallback hooks.
        self._approvals_source: Optional[Callable[[], Mapping[str, Any]]] = None
        self.approvals_by_status: dict[str, int] = {s: 0 for s in APPROVAL_STATUSES}
        self._audit_source: Optional[Callable[[], tuple[int, int]]] = None
        self.audit_total = 0
        self._audit_buckets: dict[int, int] = {}
        # Health.
        self.uptime_origin = self.started_at
        self._db_latency_source: Callable[[], Optional[float]] = lambda: None
        # Breakers and providers.
        self._breaker_sources: list[Callable[[], Iterable[tuple]]] = []
        self._provider_sources: list[Callable[[], Iterable[tuple]]] = []
        # Settings: config values, overlaid by those saved through the API.
        self._config_settings = {
            "prometheus_enabled": bool(getattr(config, "prometheus_enabled", False)),
            "prometheus_categories": tuple(getattr(config, "prometheus_categories", ("jobs", "http", "health"))),
        }
        self.bearer_token: str = getattr(config, "bearer_token", "") or ""
        self._api_settings: dict[str, Any] = {}
        self.collectors: dict[str, _Category] = {
            "jobs": _Category("jobs", self._collect_jobs),
            "http": _Category("http", self._collect_http),
            "rate_limits": _Category("rate_limits", self._collect_rate_limits),
            "approvals": _Category("approvals", self._collect_approvals),
            "audit": _Category("audit", self._collect_audit),
            "health": _Category("health", self._collect_health),
            "circuit_breakers": _Category("circuit_breakers", self._collect_breakers),
            "provider": _Category("provider", self._collect_provider),
        }
        for name in CATEGORIES:
            self.registry.register(self.collectors[name])

    # -- settings -----------------------------------------------------------------------

    def configure(self, config: Any) -> None:
        """Take the config ``metrics`` section (done by ``install``)."""
        self._config_settings = {
            "prometheus_enabled": bool(config.prometheus_enabled),
            "prometheus_categories": tuple(config.prometheus_categories),
        }
        self.bearer_token = config.bearer_token or ""

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
        selection = _Selection([self.collectors[c] for c in CATEGORIES if c in chosen])
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

    _jobs_track: Optional[Callable[[Optional[Mapping], Optional[Mapping]], None]] = None
    _ctx: Any = None

    def _bind_jobs_owner(self) -> None:
        """Once ``ctx.jobs`` exists and keeps job figures (``metrics()``), it is
        the source and the job hooks forward to its ``track``/``_track``."""
        if self._jobs_source is not None or self._ctx is None:
            return
        jobs = getattr(self._ctx, "jobs", None)
        if callable(getattr(jobs, "metrics", None)):
            track = getattr(jobs, "track", None) or getattr(jobs, "_track", None)
            self.register_jobs_source(jobs.metrics, track=track if callable(track) else None)

    def _forward(self, before: Optional[Mapping], after: Optional[Mapping]) -> bool:
        if self._jobs_track is None:
            return False
        self._jobs_track(before, after)
        return True

    def job_created(self, status: str, cost_usd: float = 0.0, *, provider: Optional[str] = None,
                    created_at: Optional[float] = None) -> None:
        self._bind_jobs_owner()
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
        self._bind_jobs_owner()
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
        self._bind_jobs_owner()
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
        self._bind_jobs_owner()
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
        """Replace the job figures with the result of :func:`job_aggregates`."""
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
        self.load_job_aggregates(await db.run_read(job_aggregates))

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

    # -- hooks: health, breakers, providers ---------------------------------------------

    def set_db_latency_source(self, fn: Callable[[], Optional[float]]) -> None:
        self._db_latency_source = fn

    def register_breaker_source(self, fn: Callable[[], Iterable[tuple]]) -> None:
        """``fn() -> [(provider, state_value 0|1|2, failures_total)]``."""
        self._breaker_sources.append(fn)

    def register_provider_source(self, fn: Callable[[], Iterable[tuple]]) -> None:
        """``fn() -> [(provider, cost_limit_percent_used | None, credit_balance_usd | None)]``."""
        self._provider_sources.append(fn)

    # -- collectors -----------------------------------------------------------------------

    def _collect_jobs(self) -> Iterable[Any]:
        figures = self.jobs_figures()
        yield CounterMetricFamily("simpletuner_jobs_total", "Jobs recorded (in the database at start-up "
                                  "plus those created since)", value=figures["jobs_total"])
        by_status = GaugeMetricFamily("simpletuner_jobs_by_status", "Jobs in the database by status",
                                      labels=["status"])
        for status in st.STATUSES:
            by_status.add_metric([status], figures["by_status"].get(status, 0))
        yield by_status
        yield GaugeMetricFamily("simpletuner_jobs_active", "Jobs pending, uploading, queued or running",
                                value=figures["active"])
        yield CounterMetricFamily("simpletuner_cost_usd_total", "Cost of jobs in USD",
                                  value=round(figures["cost_usd_total"], 6))
        yield GaugeMetricFamily("simpletuner_job_duration_seconds_avg",
                                "Average run time of finished jobs in seconds",
                                value=figures["job_duration_seconds_avg"])
        # Job outputs received over the S3 endpoint (counted by the storage
        # surface as bytes arrive; since start-up).
        progress = getattr(self._ctx, "upload_progress", None)
        yield CounterMetricFamily("simpletuner_s3_uploads_total",
                                  "Objects and parts stored through the S3 endpoint",
                                  value=getattr(progress, "uploads_total", 0))
        yield CounterMetricFamily("simpletuner_s3_upload_bytes", "Bytes stored through the S3 endpoint",
                                  value=getattr(progress, "upload_bytes_total", 0))
        yield CounterMetricFamily("simpletuner_s3_upload_failures", "Uploads refused or broken off",
                                  value=getattr(progress, "upload_failures_total", 0))

    def _collect_http(self) -> Iterable[Any]:
        requests = CounterMetricFamily("simpletuner_http_requests_total",
                                       "HTTP requests by METHOD_<route template>", labels=["endpoint"])
        latency = GaugeMetricFamily("simpletuner_http_request_latency_ms_avg",
                                    "Average request latency in milliseconds by METHOD_<route template>",
                                    labels=["endpoint"])
        for endpoint, (count, total_ms) in sorted(self.http_requests.items()):
            requests.add_metric([endpoint], count)
            latency.add_metric([endpoint], total_ms / count if count else 0.0)
        errors = CounterMetricFamily("simpletuner_http_errors_total",
                                     "HTTP responses with status >= 400 by METHOD_<route template>_<status>",
                                     labels=["endpoint_status"])
        for key, count in sorted(self.http_errors.items()):
            errors.add_metric([key], count)
        return [requests, errors, latency]

    def _collect_rate_limits(self) -> Iterable[Any]:
        yield CounterMetricFamily("simpletuner_rate_limit_violations_total",
                                  "Requests refused by the rate limiter (429)", value=self.rate_limit_violations)
        yield GaugeMetricFamily("simpletuner_rate_limit_tracked_clients",
                                "Client addresses the rate limiter currently tracks",
                                value=int(self.rate_limit_tracked_clients() or 0))

    def _collect_approvals(self) -> Iterable[Any]:
        if self._approvals_source is not None:
            figures = self._approvals_source()
            by_status = dict(figures.get("by_status") or {})
            pending = figures.get("pending", by_status.get("pending", 0))
        else:
            by_status = dict(self.approvals_by_status)
            pending = by_status.get("pending", 0)
        yield GaugeMetricFamily("simpletuner_approval_requests_pending", "Approval requests waiting for a decision",
                                value=pending)
        family = GaugeMetricFamily("simpletuner_approval_requests_by_status", "Approval requests by status",
                                   labels=["status"])
        for status in sorted(set(APPROVAL_STATUSES) | set(by_status)):
            family.add_metric([status], by_status.get(status, 0))
        yield family

    def _collect_audit(self) -> Iterable[Any]:
        total, last_24h = self.audit_figures()
        yield CounterMetricFamily("simpletuner_audit_log_entries_total", "Entries in the audit log", value=total)
        yield GaugeMetricFamily("simpletuner_audit_log_entries_24h", "Audit log entries written in the last 24 h",
                                value=last_24h)

    def _collect_health(self) -> Iterable[Any]:
        yield GaugeMetricFamily("simpletuner_uptime_seconds", "Seconds since the daemon started",
                                value=max(0.0, self.clock.seconds() - self.uptime_origin))
        latency = self._db_latency_source()
        family = GaugeMetricFamily("simpletuner_health_database_latency_ms",
                                   "Latency of the last database health query in milliseconds")
        if latency is not None:
            family.add_metric([], latency)
        yield family

    def _collect_breakers(self) -> Iterable[Any]:
        state = GaugeMetricFamily("simpletuner_circuit_breaker_state",
                                  "Circuit breaker state per provider (0 closed, 1 half-open, 2 open)",
                                  labels=["provider"])
        failures = CounterMetricFamily("simpletuner_circuit_breaker_failures_total",
                                       "Provider call failures counted by the circuit breaker",
                                       labels=["provider"])
        seen: set[str] = set()
        for source in self._breaker_sources:
            for provider, value, failures_total in source():
                if provider in seen:
                    continue
                seen.add(provider)
                state.add_metric([provider], value)
                failures.add_metric([provider], failures_total)
        return [state, failures]

    def _collect_provider(self) -> Iterable[Any]:
        percent = GaugeMetricFamily("simpletuner_cost_limit_percent_used",
                                    "Share of the provider's cost limit used in the current period (percent)",
                                    labels=["provider"])
        balance = GaugeMetricFamily("simpletuner_credit_balance_usd",
                                    "Provider credit balance in USD (when the provider reports it)",
                                    labels=["provider"])
        seen: set[str] = set()
        for source in self._provider_sources:
            for provider, used, credit in source():
                if provider in seen:
                    continue
                seen.add(provider)
                if used is not None:
                    percent.add_metric([provider], used)
                if credit is not None:
                    balance.add_metric([provider], credit)
        return [percent, balance]

    # -- provider spend (cost-limit percent) ---------------------------------------------

    @property
    def spend(self) -> "SpendTracker":
        tracker = getattr(self, "_spend", None)
        if tracker is None:
            tracker = self._spend = SpendTracker(self.clock)
        return tracker


class SpendTracker:
    """Per-provider spend in the current cost period, for
    ``simpletuner_cost_limit_percent_used``: read from the database at start
    and every ``SPEND_REFRESH_INTERVAL`` (one indexed query per provider over
    the period only), followed in between by the cost deltas of the job
    hooks.  Reading it on scrape costs nothing."""

    def __init__(self, clock: Any):
        self.clock = clock
        # provider → [period, period_start, spent]
        self.current: dict[str, list] = {}
        self.settings: Callable[[str], Mapping[str, Any]] = lambda provider: {}
        self.providers: Sequence[str] = ()
        self.refresh_needed: Callable[[], None] = lambda: None

    def _start(self, period: str) -> float:
        from stdaemon.jobs import costs

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


# -- wiring -------------------------------------------------------------------------------


def install(ctx: Any) -> Metrics:
    """Bind the defaults that need no database (``wire_capabilities``)."""
    metrics: Metrics = ctx.metrics
    metrics._ctx = ctx
    metrics.configure(ctx.config.metrics)
    metrics.uptime_origin = getattr(ctx, "started_at", metrics.started_at)
    metrics.set_db_latency_source(lambda: getattr(ctx, "last_db_latency_ms", None))
    return metrics


async def start(ctx: Any) -> None:
    """Start-up with the database open (``start_capabilities``): saved settings,
    job figures (one aggregate query), provider spend, and sources exposed by
    other capabilities that did not register their own."""
    metrics: Metrics = ctx.metrics
    # The jobs service keeps the job figures itself (loaded by ctx.jobs.load());
    # ctx.metrics.job_* hooks forward changes made elsewhere (webhooks) to it.
    metrics._bind_jobs_owner()
    await reload(ctx)
    if metrics._approvals_source is None and callable(getattr(getattr(ctx, "approvals", None), "metrics", None)):
        metrics.register_approvals_source(ctx.approvals.metrics)
    audit = getattr(ctx, "audit", None)
    if metrics._audit_source is None:
        if audit is not None and hasattr(audit, "total") and callable(getattr(audit, "count_last_24h", None)):
            metrics.register_audit_source(lambda: (audit.total, audit.count_last_24h()))
        else:
            total, buckets = await ctx.db.run_read(audit_counts, ctx.now() - DAY)
            metrics.audit_total, metrics._audit_buckets = total, buckets
    breakers = getattr(ctx, "breakers", None)
    if not metrics._breaker_sources and breakers is not None and callable(getattr(breakers, "all", None)):
        metrics.register_breaker_source(
            lambda: [(name, b.state_value, b.failures_total) for name, b in sorted(breakers.all().items())])
    providers = getattr(ctx, "providers", None)
    if providers is not None and callable(getattr(providers, "values", None)):
        from stdaemon.providers import settings as ps

        tracker = metrics.spend
        tracker.providers = tuple(ps.PROVIDERS)
        tracker.settings = providers.values
        refreshing: list = []

        def refresh_needed() -> None:
            if refreshing:
                return
            from twisted.internet import defer

            d = defer.ensureDeferred(tracker.refresh(ctx.db))
            refreshing.append(d)
            d.addErrback(lambda f: log.failure("Refreshing provider spend failed", failure=f))
            d.addBoth(lambda _: refreshing.clear())

        tracker.refresh_needed = refresh_needed
        await tracker.refresh(ctx.db)
        if not metrics._provider_sources:
            metrics.register_provider_source(tracker.figures)
        from twisted.internet import defer

        ctx.add_timer("metrics.provider_spend", SPEND_REFRESH_INTERVAL,
                      lambda: defer.ensureDeferred(tracker.refresh(ctx.db)))
    backups = getattr(ctx, "backups", None)
    if backups is not None and hasattr(backups, "after_restore"):
        backups.after_restore.append(lambda: reload(ctx))


async def reload(ctx: Any) -> None:
    """Saved settings and job figures from the database (start, after restore)."""
    metrics: Metrics = ctx.metrics
    metrics.apply_saved(await ctx.db.run_read(load_settings))
    if metrics._jobs_source is None:
        await metrics.load_jobs(ctx.db)
    if metrics.spend.providers:
        await metrics.spend.refresh(ctx.db)
