"""The metrics object without a daemon: hooks, categories, the job aggregate
query, formats (text 0.0.4 and OpenMetrics, strict parser), promtool, settings."""

from __future__ import annotations

import subprocess

import pytest
import pytest_twisted
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from twisted.internet.task import Clock

from stdaemon.metrics import settings as m
from stdaemon.metrics import store as metrics_store
from stdaemon.metrics.service import Metrics
from stdaemon.metrics.settings import CATEGORIES, TEMPLATES
from stdaemon.metrics.spend import SpendTracker
from stdaemon.jobs import store as jobs_store
from stdaemon.store.database import connect
from stdaemon.store.schema import migrate
from stdaemon.invalid import InvalidValue
from tests.services import require_binary

T0 = 1_800_000_000.0
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"

# The guide fixes these two names; promtool's linter objects to the "ms" in
# them (a naming lint, not a format error).  Nothing else may be reported.
GUIDE_NAME_LINTS = {
    "simpletuner_health_database_latency_ms metric names should not contain abbreviated units",
    "simpletuner_http_request_latency_ms_avg metric names should not contain abbreviated units",
}

FAMILIES = {
    "jobs": {"simpletuner_jobs_total", "simpletuner_jobs_by_status", "simpletuner_jobs_active",
             "simpletuner_cost_usd_total", "simpletuner_job_duration_seconds_avg",
             "simpletuner_s3_uploads_total", "simpletuner_s3_upload_bytes_total",
             "simpletuner_s3_upload_failures_total"},
    "http": {"simpletuner_http_requests_total", "simpletuner_http_errors_total",
             "simpletuner_http_request_latency_ms_avg"},
    "rate_limits": {"simpletuner_rate_limit_violations_total", "simpletuner_rate_limit_tracked_clients"},
    "approvals": {"simpletuner_approval_requests_pending", "simpletuner_approval_requests_by_status"},
    "audit": {"simpletuner_audit_log_entries_total", "simpletuner_audit_log_entries_24h"},
    "health": {"simpletuner_uptime_seconds", "simpletuner_health_database_latency_ms"},
    "circuit_breakers": {"simpletuner_circuit_breaker_state", "simpletuner_circuit_breaker_failures_total"},
    "provider": {"simpletuner_cost_limit_percent_used", "simpletuner_credit_balance_usd"},
}


def samples(text: str) -> dict:
    """``{(sample name, frozenset(labels)): value}`` from the 0.0.4 text format."""
    out = {}
    for family in parse_text(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(text: str, name: str, **labels) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def sample_names(text: str) -> set:
    return {name for name, _labels in samples(text)}


def family_names(text: str) -> set:
    """Names in the ``# TYPE`` lines (families are listed even without samples)."""
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def promtool_problems(body: bytes) -> list[str]:
    promtool = require_binary("promtool")
    result = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    problems = [line for line in (result.stdout + result.stderr).decode().splitlines() if line.strip()]
    assert result.returncode in (0, 3), problems  # 3 = lint findings only; 1 = unparsable
    return problems


def populated() -> Metrics:
    clock = Clock()
    clock.advance(T0)
    metrics = Metrics(clock)
    clock.advance(3600.5)
    for status in ("pending", "pending", "queued", "running"):
        metrics.job_created(status)
    metrics.job_transition("running", "completed", cost_delta=12.5, duration=1800.0)
    metrics.job_transition("queued", "failed", cost_delta=0.25, duration=60.0)
    metrics.observe_http("POST_/api/cloud/jobs/submit", 200, 200.0)
    metrics.observe_http("POST_/api/cloud/jobs/submit", 500, 301.0)
    metrics.observe_http('GET_/odd/"quoted"\\path', 404, 1.0)
    for _ in range(15):
        metrics.rate_limited()
    metrics.set_tracked_clients_source(lambda: 42)
    metrics.register_approvals_source(lambda: {"pending": 3, "by_status": {"pending": 3, "approved": 25}})
    metrics.register_audit_source(lambda: (1500, 120))
    metrics.set_db_latency_source(lambda: 0.75)
    metrics.register_breaker_source(lambda: [("replicate", 2, 5)])
    metrics.register_provider_source(lambda: [("replicate", 45.5, 150.0)])
    return metrics


def test_every_guide_family_in_its_category_with_real_values():
    metrics = populated()
    text = metrics.render(CATEGORIES)[0].decode()
    for category, names in FAMILIES.items():
        only = metrics.render([category])[0].decode()
        assert sample_names(only) == names == family_names(only), category
    assert value(text, "simpletuner_uptime_seconds") == 3600.5
    assert value(text, "simpletuner_jobs_total") == 4
    assert value(text, "simpletuner_jobs_by_status", status="pending") == 2
    assert value(text, "simpletuner_jobs_by_status", status="completed") == 1
    assert value(text, "simpletuner_jobs_by_status", status="failed") == 1
    assert value(text, "simpletuner_jobs_by_status", status="running") == 0
    assert value(text, "simpletuner_jobs_active") == 2  # the two pending
    assert value(text, "simpletuner_cost_usd_total") == 12.75
    assert value(text, "simpletuner_job_duration_seconds_avg") == 930.0
    assert value(text, "simpletuner_http_requests_total", endpoint="POST_/api/cloud/jobs/submit") == 2
    assert value(text, "simpletuner_http_errors_total",
                 endpoint_status="POST_/api/cloud/jobs/submit_500") == 1
    assert value(text, "simpletuner_http_request_latency_ms_avg", endpoint="POST_/api/cloud/jobs/submit") == 250.5
    assert value(text, "simpletuner_http_requests_total", endpoint='GET_/odd/"quoted"\\path') == 1
    assert value(text, "simpletuner_rate_limit_violations_total") == 15
    assert value(text, "simpletuner_rate_limit_tracked_clients") == 42
    assert value(text, "simpletuner_approval_requests_pending") == 3
    assert value(text, "simpletuner_approval_requests_by_status", status="approved") == 25
    assert value(text, "simpletuner_audit_log_entries_total") == 1500
    assert value(text, "simpletuner_audit_log_entries_24h") == 120
    assert value(text, "simpletuner_health_database_latency_ms") == 0.75
    assert value(text, "simpletuner_circuit_breaker_state", provider="replicate") == 2
    assert value(text, "simpletuner_circuit_breaker_failures_total", provider="replicate") == 5
    assert value(text, "simpletuner_cost_limit_percent_used", provider="replicate") == 45.5
    assert value(text, "simpletuner_credit_balance_usd", provider="replicate") == 150.0


def test_text_format_by_default_and_openmetrics_when_asked():
    metrics = populated()
    body, content_type = metrics.render(CATEGORIES)
    assert content_type == "text/plain; version=0.0.4; charset=utf-8"
    assert b"# EOF" not in body
    body, content_type = metrics.render(CATEGORIES, accept=f"{OPENMETRICS},text/plain;q=0.5")
    assert content_type.startswith("application/openmetrics-text")
    families = {f.name: f for f in parse_openmetrics(body.decode())}  # strict parser
    assert families["simpletuner_jobs"].type == "counter"
    assert families["simpletuner_jobs"].samples[0].value == 4
    assert families["simpletuner_circuit_breaker_state"].samples[0].labels == {"provider": "replicate"}
    assert {f.name for f in families.values()} >= {"simpletuner_http_requests", "simpletuner_uptime_seconds",
                                                    "simpletuner_cost_usd", "simpletuner_audit_log_entries"}


def test_promtool_accepts_the_output():
    problems = promtool_problems(populated().render(CATEGORIES)[0])
    assert set(problems) <= GUIDE_NAME_LINTS
    # Categories without those two names pass without a single finding.
    clean = [c for c in CATEGORIES if c not in ("http", "health")]
    assert promtool_problems(populated().render(clean)[0]) == []


def test_promtool_is_a_real_check():
    problems = promtool_problems(b"# TYPE x counter\nx_total 1\n# TYPE y_total gauge\ny_total 2\n")
    assert any("y_total" in p for p in problems)


def test_job_changed_from_rows_before_and_after():
    metrics = Metrics(Clock())
    job = {"job_id": "j1", "provider": "replicate", "status": "pending", "cost_usd": 0.0,
           "created_at": 10.0, "started_at": None, "completed_at": None}
    metrics.job_changed(None, job)
    queued = dict(job, status="queued")
    metrics.job_changed(job, queued)
    running = dict(queued, status="running", started_at=100.0, cost_usd=1.0)
    metrics.job_changed(queued, running)
    again = dict(running, cost_usd=3.0)  # a repeated "processing" with new metrics
    metrics.job_changed(running, again)
    done = dict(again, status="completed", completed_at=400.0, cost_usd=4.0)
    metrics.job_changed(again, done)
    metrics.job_changed(done, done)  # ignored update: nothing moves
    figures = metrics.jobs_figures()
    assert figures["jobs_total"] == 1
    assert figures["by_status"]["completed"] == 1 and sum(figures["by_status"].values()) == 1
    assert figures["cost_usd_total"] == 4.0
    assert figures["job_duration_seconds_avg"] == 300.0
    metrics.job_deleted("completed", job=done)
    figures = metrics.jobs_figures()
    assert figures["by_status"]["completed"] == 0 and figures["job_duration_seconds_avg"] == 0.0
    assert figures["jobs_total"] == 1 and figures["cost_usd_total"] == 4.0  # counters keep it


def test_jobs_source_replaces_the_internal_figures():
    metrics = Metrics(Clock())
    metrics.job_created("pending")
    metrics.register_jobs_source(lambda: {"jobs_total": 7, "by_status": {"running": 7}, "active": 7,
                                          "cost_usd_total": 1.5, "job_duration_seconds_avg": 2.0})
    text = metrics.render(["jobs"])[0].decode()
    assert value(text, "simpletuner_jobs_total") == 7
    assert value(text, "simpletuner_jobs_by_status", status="running") == 7
    assert value(text, "simpletuner_jobs_by_status", status="pending") == 0


def _insert(conn, i, status, cost, started=None, completed=None, provider="replicate", created=1000.0):
    jobs_store.insert_job(conn, {"job_id": f"job{i}", "provider": provider, "status": status,
                                 "created_at": created, "cost_usd": cost, "started_at": started,
                                 "completed_at": completed})


def test_job_figures_from_one_aggregate_query(tmp_path):
    conn = connect(str(tmp_path / "jobs.db"))
    migrate(conn)
    for i in range(10):
        _insert(conn, i, "completed", 1.25, started=100.0, completed=100.0 + 60 * (i + 1))
    for i in range(10, 13):
        _insert(conn, i, "failed", 0.5, started=100.0, completed=160.0)
    for i in range(13, 15):
        _insert(conn, i, "running", 0.0, started=100.0)
    _insert(conn, 15, "pending_approval", 0.0)
    conn.commit()
    statements = []
    conn.set_trace_callback(statements.append)
    aggregates = metrics_store.job_aggregates(conn)
    conn.set_trace_callback(None)
    assert len(statements) == 1 and "GROUP BY status" in statements[0]
    metrics = Metrics(Clock())
    metrics.load_job_aggregates(aggregates)
    text = metrics.render(["jobs"])[0].decode()
    assert value(text, "simpletuner_jobs_total") == 16
    assert value(text, "simpletuner_jobs_by_status", status="completed") == 10
    assert value(text, "simpletuner_jobs_by_status", status="failed") == 3
    assert value(text, "simpletuner_jobs_by_status", status="pending_approval") == 1
    assert value(text, "simpletuner_jobs_active") == 2
    assert value(text, "simpletuner_cost_usd_total") == 14.0
    # durations: 60..600 for the completed (sum 3300) and 60 for each failed
    assert value(text, "simpletuner_job_duration_seconds_avg") == pytest.approx((3300 + 180) / 13)
    conn.close()


def test_scrape_reads_no_database(tmp_path):
    """Collectors render from memory: with 2 000 jobs loaded, the scrape's
    output is built without any query (the database is closed)."""
    conn = connect(str(tmp_path / "jobs.db"))
    migrate(conn)
    conn.executemany(
        "INSERT INTO jobs (job_id, provider, status, created_at, cost_usd) VALUES (?, 'replicate', ?, 0, 0.5)",
        [(f"j{i}", "completed" if i % 2 else "running") for i in range(2_000)])
    conn.commit()
    metrics = Metrics(Clock())
    metrics.load_job_aggregates(metrics_store.job_aggregates(conn))
    conn.close()
    text = metrics.render(CATEGORIES)[0].decode()
    assert value(text, "simpletuner_jobs_total") == 2_000
    assert value(text, "simpletuner_jobs_active") == 1_000
    assert value(text, "simpletuner_cost_usd_total") == 1_000.0


def test_audit_fallback_counts_the_last_24_hours():
    clock = Clock()
    clock.advance(T0)
    metrics = Metrics(clock)
    metrics.audit_recorded()
    clock.advance(12 * 3600)
    metrics.audit_recorded()
    metrics.audit_recorded()
    assert metrics.audit_figures() == (3, 3)
    clock.advance(13 * 3600)
    assert metrics.audit_figures() == (3, 2)


def test_approval_fallback_counts_transitions():
    metrics = Metrics(Clock())
    metrics.approval_changed(None, "pending")
    metrics.approval_changed(None, "pending")
    metrics.approval_changed("pending", "approved")
    text = metrics.render(["approvals"])[0].decode()
    assert value(text, "simpletuner_approval_requests_pending") == 1
    assert value(text, "simpletuner_approval_requests_by_status", status="approved") == 1


def test_spend_tracker_follows_costs_and_periods():
    clock = Clock()
    clock.advance(1_767_225_600.0 + 10 * 86400)  # 2026-01-11 00:00 UTC
    tracker = SpendTracker(clock)
    settings = {"cost_limit_enabled": True, "cost_limit_amount": 200.0, "cost_limit_period": "monthly"}
    tracker.providers = ("replicate",)
    tracker.settings = lambda provider: settings
    refreshes = []
    tracker.refresh_needed = lambda: refreshes.append(1)
    month_start = 1_767_225_600.0
    tracker.set("replicate", "monthly", month_start, 80.0)
    assert tracker.figures() == [("replicate", 40.0, None)]
    tracker.add("replicate", 10.0, created_at=month_start + 5)
    tracker.add("replicate", 99.0, created_at=month_start - 5)  # a job of last month
    assert tracker.figures() == [("replicate", 45.0, None)]
    assert refreshes == []
    settings["cost_limit_period"] = "daily"  # a new period: re-read, only new costs until then
    assert tracker.figures() == [("replicate", 0.0, None)] and refreshes == [1]
    settings["cost_limit_enabled"] = False
    assert tracker.figures() == []


@pytest_twisted.ensureDeferred
async def test_spend_refresh_reads_the_period(tmp_path):
    conn = connect(str(tmp_path / "jobs.db"))
    migrate(conn)
    _insert(conn, 1, "completed", 30.0, created=T0 - 40 * 86400)  # an earlier month
    _insert(conn, 2, "completed", 20.0, created=T0 - 60)
    _insert(conn, 3, "running", 5.0, created=T0 - 30)
    conn.commit()

    class Db:
        async def run_read(self, fn, *args):
            return fn(conn, *args)

    clock = Clock()
    clock.advance(T0)
    tracker = SpendTracker(clock)
    tracker.providers = ("replicate",)
    tracker.settings = lambda p: {"cost_limit_enabled": True, "cost_limit_amount": 50.0,
                                  "cost_limit_period": "monthly"}
    await tracker.refresh(Db())
    assert tracker.figures() == [("replicate", 50.0, None)]
    conn.close()


def test_settings_layering_and_validation():
    class Config:
        prometheus_enabled = False
        prometheus_categories = ("jobs", "http", "health")
        bearer_token = "tok"

    metrics = Metrics(Clock(), Config())
    assert metrics.settings() == {"prometheus_enabled": False, "prometheus_categories": ["jobs", "http", "health"]}
    assert metrics.bearer_token == "tok"
    metrics.apply_saved({"prometheus_enabled": True, "prometheus_categories": ["audit", "bogus"]})
    assert metrics.settings() == {"prometheus_enabled": True, "prometheus_categories": ["jobs", "http", "health"]}
    assert metrics.sources() == {"prometheus_enabled": "api", "prometheus_categories": "config"}
    assert m.validate_update({"prometheus_categories": ["jobs", "jobs", "audit"]}) == \
        {"prometheus_categories": ["jobs", "audit"]}
    assert m.validate_update({"prometheus_enabled": None}) == {"prometheus_enabled": None}
    for body, field in (({"prometheus_enabled": "yes"}, "prometheus_enabled"),
                        ({"prometheus_categories": ["jobs", "cpu"]}, "prometheus_categories"),
                        ({"prometheus_categories": 3}, "prometheus_categories"),
                        ({"bearer_token": "x"}, "bearer_token")):
        with pytest.raises(InvalidValue) as info:
            m.validate_update(body)
        assert info.value.field == field
    assert TEMPLATES["full"] == CATEGORIES
    assert set(TEMPLATES) == {"minimal", "standard", "security", "full"}


def test_a_failing_source_drops_only_its_category():
    metrics = populated()

    def broken():
        raise RuntimeError("source down")

    metrics.register_jobs_source(broken)
    text = metrics.render(CATEGORIES)[0].decode()
    assert "simpletuner_jobs_total" not in text
    assert value(text, "simpletuner_uptime_seconds") == 3600.5


def test_registries_are_per_object():
    one, two = Metrics(Clock()), Metrics(Clock())
    one.rate_limited()
    assert one.registry is not two.registry
    assert value(one.render(["rate_limits"])[0].decode(), "simpletuner_rate_limit_violations_total") == 1
    assert value(two.render(["rate_limits"])[0].decode(), "simpletuner_rate_limit_violations_total") == 0
    from prometheus_client import REGISTRY, generate_latest

    assert b"simpletuner_" not in generate_latest(REGISTRY)
    assert b"simpletuner_rate_limit_violations_total 1.0" in generate_latest(one.registry)


def test_job_hooks_forward_to_a_registered_owner():
    """When the jobs service owns the figures, every ``ctx.metrics.job_*`` call
    (webhooks, approvals) reaches it, so there is one set of job figures."""
    seen = []
    metrics = Metrics(Clock())
    metrics.register_jobs_source(lambda: {"jobs_total": len(seen), "by_status": {}, "active": 0,
                                          "cost_usd_total": 0.0, "job_duration_seconds_avg": 0.0},
                                 track=lambda before, after: seen.append((before, after)))
    row = {"job_id": "j", "status": "running", "cost_usd": 1.0, "provider": "replicate"}
    done = dict(row, status="completed", cost_usd=2.0)
    metrics.job_changed(row, done)
    metrics.job_changed(done, dict(done))  # nothing changed: not forwarded
    metrics.job_deleted("completed", job=done)
    metrics.job_created("pending")
    assert seen[0] == (row, done)
    assert seen[1] == (done, None)
    assert seen[2][0] is None and seen[2][1]["status"] == "pending"
    assert len(seen) == 3
    assert metrics.jobs_total == 0  # the internal figures stay unused


def test_prometheus_scrapers_accept_headers():
    metrics = populated()
    modern = ("application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
              "text/plain;version=0.0.4;q=0.5,*/*;q=0.1")
    body, content_type = metrics.render(["jobs"], accept=modern)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith(b"# EOF\n")
    assert [f.name for f in parse_openmetrics(body.decode())][0] == "simpletuner_jobs"
    for accept in ("text/plain;version=0.0.4", "*/*", "", "application/json",
                   "application/openmetrics-text;version=0.0.1"):
        body, content_type = metrics.render(["jobs"], accept=accept)
        assert content_type == "text/plain; version=0.0.4; charset=utf-8", accept
        assert value(body.decode(), "simpletuner_jobs_total") == 4
