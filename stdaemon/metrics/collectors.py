"""The metric families of each category (S10), built from figures kept in
memory: a scrape never reads the database.  Each function returns the
families of one category in exposition order; names and help texts are the
guide's.  :class:`Category` is the custom collector registered per category.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from stdaemon.jobs import status as st
from stdaemon.logs import get_logger

log = get_logger("stdaemon.metrics")

APPROVAL_STATUSES = ("pending", "approved", "rejected", "expired", "cancelled")


class Selection:
    """A registry-like view rendering only some categories (scrape, preview)."""

    def __init__(self, collectors: Sequence[Any]):
        self._collectors = collectors

    def collect(self) -> Iterable[Any]:
        for collector in self._collectors:
            yield from collector.collect()


class Category:
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


def first_per_provider(sources: Iterable[Callable[[], Iterable[tuple]]]) -> Iterator[tuple]:
    """The rows ``(provider, …)`` of every source, a provider's first row only."""
    seen: set[str] = set()
    for source in sources:
        for row in source():
            if row[0] in seen:
                continue
            seen.add(row[0])
            yield row


def jobs_families(figures: Mapping[str, Any], uploads: tuple[int, int, int]) -> Iterable[Any]:
    """``figures`` shaped like ``Metrics.jobs_figures()``; ``uploads`` the S3 endpoint's
    (objects and parts stored, bytes stored, failures) since start-up."""
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
    uploads_total, upload_bytes, upload_failures = uploads
    yield CounterMetricFamily("simpletuner_s3_uploads_total",
                              "Objects and parts stored through the S3 endpoint", value=uploads_total)
    yield CounterMetricFamily("simpletuner_s3_upload_bytes", "Bytes stored through the S3 endpoint",
                              value=upload_bytes)
    yield CounterMetricFamily("simpletuner_s3_upload_failures", "Uploads refused or broken off",
                              value=upload_failures)


def http_families(requests_by_endpoint: Mapping[str, list], errors_by_endpoint: Mapping[str, int]) -> list:
    """``requests_by_endpoint``: endpoint → [count, total latency ms];
    ``errors_by_endpoint``: ``<endpoint>_<status>`` → count."""
    requests = CounterMetricFamily("simpletuner_http_requests_total",
                                   "HTTP requests by METHOD_<route template>", labels=["endpoint"])
    latency = GaugeMetricFamily("simpletuner_http_request_latency_ms_avg",
                                "Average request latency in milliseconds by METHOD_<route template>",
                                labels=["endpoint"])
    for endpoint, (count, total_ms) in sorted(requests_by_endpoint.items()):
        requests.add_metric([endpoint], count)
        latency.add_metric([endpoint], total_ms / count if count else 0.0)
    errors = CounterMetricFamily("simpletuner_http_errors_total",
                                 "HTTP responses with status >= 400 by METHOD_<route template>_<status>",
                                 labels=["endpoint_status"])
    for key, count in sorted(errors_by_endpoint.items()):
        errors.add_metric([key], count)
    return [requests, errors, latency]


def rate_limit_families(violations: int, tracked_clients: int) -> Iterable[Any]:
    yield CounterMetricFamily("simpletuner_rate_limit_violations_total",
                              "Requests refused by the rate limiter (429)", value=violations)
    yield GaugeMetricFamily("simpletuner_rate_limit_tracked_clients",
                            "Client addresses the rate limiter currently tracks", value=tracked_clients)


def approval_families(pending: int, by_status: Mapping[str, int]) -> Iterable[Any]:
    yield GaugeMetricFamily("simpletuner_approval_requests_pending", "Approval requests waiting for a decision",
                            value=pending)
    family = GaugeMetricFamily("simpletuner_approval_requests_by_status", "Approval requests by status",
                               labels=["status"])
    for status in sorted(set(APPROVAL_STATUSES) | set(by_status)):
        family.add_metric([status], by_status.get(status, 0))
    yield family


def audit_families(total: int, last_24h: int) -> Iterable[Any]:
    yield CounterMetricFamily("simpletuner_audit_log_entries_total", "Entries in the audit log", value=total)
    yield GaugeMetricFamily("simpletuner_audit_log_entries_24h", "Audit log entries written in the last 24 h",
                            value=last_24h)


def health_families(uptime_seconds: float, db_latency_ms: Optional[float]) -> Iterable[Any]:
    yield GaugeMetricFamily("simpletuner_uptime_seconds", "Seconds since the daemon started",
                            value=uptime_seconds)
    family = GaugeMetricFamily("simpletuner_health_database_latency_ms",
                               "Latency of the last database health query in milliseconds")
    if db_latency_ms is not None:
        family.add_metric([], db_latency_ms)
    yield family


def cluster_families(figures: Mapping[str, Any]) -> Iterable[Any]:
    """Several instances on one Redis (exported with ``health`` when ``cluster.redis_url`` is set);
    ``figures`` shaped like ``stdaemon.cluster.service.ClusterService.figures()``."""
    yield CounterMetricFamily("simpletuner_cluster_events_relayed_total",
                              "Job events this instance published to the other instances",
                              value=figures["events_relayed"])
    yield CounterMetricFamily("simpletuner_cluster_events_received_total",
                              "Job events received from other instances and shown to this instance's streams",
                              value=figures["events_received"])
    yield CounterMetricFamily("simpletuner_cluster_events_dropped_total",
                              "Job events never relayed (queue full while Redis was unreachable)",
                              value=figures["events_dropped"])
    yield GaugeMetricFamily("simpletuner_cluster_events_pending",
                            "Job events waiting for Redis to be relayed", value=figures["events_pending"])
    yield CounterMetricFamily("simpletuner_cluster_events_subscriptions_total",
                              "Subscriptions to the events channel (the first and one per reconnection)",
                              value=figures["subscriptions"])
    connected = GaugeMetricFamily("simpletuner_cluster_redis_connected",
                                  "1 while the connection to the cluster's Redis is up", labels=["connection"])
    for name, up in sorted(figures["connected"].items()):
        connected.add_metric([name], 1 if up else 0)
    yield connected
    held = GaugeMetricFamily("simpletuner_cluster_lease_held",
                             "1 while this instance holds the timer's lease (it runs the timer)", labels=["timer"])
    acquired = CounterMetricFamily("simpletuner_cluster_lease_acquired_total",
                                   "Times this instance took the timer's lease", labels=["timer"])
    lost = CounterMetricFamily("simpletuner_cluster_lease_lost_total",
                               "Times this instance found its lease of the timer gone", labels=["timer"])
    skipped = CounterMetricFamily("simpletuner_cluster_lease_skipped_total",
                                  "Runs of the timer skipped here: another instance holds the lease, or Redis "
                                  "was unreachable", labels=["timer", "reason"])
    for timer, is_held, n_acquired, n_lost, elsewhere, unavailable in figures["leases"]:
        held.add_metric([timer], 1 if is_held else 0)
        acquired.add_metric([timer], n_acquired)
        lost.add_metric([timer], n_lost)
        skipped.add_metric([timer, "held_elsewhere"], elsewhere)
        skipped.add_metric([timer, "redis_unavailable"], unavailable)
    yield from (held, acquired, lost, skipped)


#: (family type, name, help) of the ``circuit_breakers`` category, in the order of a row's values
BREAKER_FAMILIES = (
    (GaugeMetricFamily, "simpletuner_circuit_breaker_state",
     "Circuit breaker state per provider (0 closed, 1 half-open, 2 open)"),
    (CounterMetricFamily, "simpletuner_circuit_breaker_failures_total",
     "Provider call failures counted by the circuit breaker"),
)
#: the same for the ``provider`` category
PROVIDER_FAMILIES = (
    (GaugeMetricFamily, "simpletuner_cost_limit_percent_used",
     "Share of the provider's cost limit used in the current period (percent)"),
    (GaugeMetricFamily, "simpletuner_credit_balance_usd",
     "Provider credit balance in USD (when the provider reports it)"),
)


def per_provider_families(specs: Sequence[tuple[type, str, str]], rows: Iterable[tuple]) -> list:
    """One family per spec, labelled ``provider``: a row ``(provider, value, …)`` gives each
    family its value (a value of None: no sample for that provider)."""
    out = [kind(name, documentation, labels=["provider"]) for kind, name, documentation in specs]
    for provider, *values in rows:
        for family, value in zip(out, values):
            if value is not None:
                family.add_metric([provider], value)
    return out


def breaker_families(rows: Iterable[tuple]) -> list:
    """``rows``: ``(provider, state_value 0|1|2, failures_total)``, one per provider."""
    return per_provider_families(BREAKER_FAMILIES, rows)


def provider_families(rows: Iterable[tuple]) -> list:
    """``rows``: ``(provider, cost_limit_percent_used | None, credit_balance_usd | None)``."""
    return per_provider_families(PROVIDER_FAMILIES, rows)
