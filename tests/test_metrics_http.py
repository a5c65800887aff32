"""The metrics surface through a real daemon on a loopback port: off by default,
settings persisted and audited, templates, preview without side effects, the
bearer token, and the scrape of a daemon that handled jobs, webhooks,
rate-limited requests and a breaker trip — checked by promtool and by
prometheus_client's strict OpenMetrics parser against what happened."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest_twisted
import treq
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from standardwebhooks.webhooks import Webhook

from stdaemon.jobs import costs
from stdaemon.jobs import store as jobs_store
from tests.authhelpers import call, create_user, user_key
from tests.replicate_env import audit_events, start_env
from tests.test_metrics import FAMILIES, GUIDE_NAME_LINTS, OPENMETRICS, family_names, promtool_problems, value

SCRAPE = "/api/cloud/metrics/prometheus"
CONFIG = "/api/cloud/metrics/config"


async def scrape(daemon, headers=None):
    response = await treq.get(daemon.url + SCRAPE, headers=headers or {})
    return response, await response.content()


def settings_rows(daemon):
    from stdaemon.store.database import connect

    conn = connect(daemon.ctx.database_path)
    try:
        return conn.execute("SELECT key, value_json FROM settings WHERE namespace = 'metrics' "
                            "ORDER BY key").fetchall()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_disabled_by_default_with_a_hint(daemon):
    response, body = await scrape(daemon)
    assert response.code == 404
    error = json.loads(body)
    assert error["error"] == "metrics_disabled"
    assert "PUT /api/cloud/metrics/config" in error["detail"] and "prometheus_enabled" in error["detail"]
    response, body = await call(daemon, "GET", CONFIG)
    assert response.code == 401  # the config endpoints are authenticated
    response, body = await call(daemon, "GET", CONFIG, key=daemon.admin_key)
    assert response.code == 200
    assert body["prometheus_enabled"] is False
    assert body["prometheus_categories"] == ["jobs", "http", "health"]
    assert body["sources"] == {"prometheus_enabled": "config", "prometheus_categories": "config"}


@pytest_twisted.ensureDeferred
async def test_enable_persist_audit_and_roles(make_daemon):
    daemon = await make_daemon(subdir="one")
    viewer = await create_user(daemon, "vera", "viewer")
    operator = await create_user(daemon, "otto", "operator")
    viewer_key = await user_key(daemon, viewer["id"], "viewer")
    operator_key = await user_key(daemon, operator["id"], "operator")

    response, body = await call(daemon, "GET", CONFIG, key=viewer_key)
    assert response.code == 403
    response, body = await call(daemon, "GET", CONFIG, key=operator_key)
    assert response.code == 200
    response, body = await call(daemon, "PUT", CONFIG, {"prometheus_enabled": True}, key=operator_key)
    assert response.code == 403

    for bad, field in (({"prometheus_categories": ["jobs", "gpu"]}, "prometheus_categories"),
                       ({"prometheus_enabled": "yes"}, "prometheus_enabled"),
                       ({"bearer_token": "x"}, "bearer_token")):
        response, body = await call(daemon, "PUT", CONFIG, bad, key=daemon.admin_key)
        assert response.code == 400 and body["field"] == field, body
    response, body = await call(daemon, "PUT", CONFIG, b"{not json", key=daemon.admin_key)
    assert response.code == 400 and body["error"] == "invalid_json"
    assert settings_rows(daemon) == []

    response, body = await call(daemon, "PUT", CONFIG,
                                {"prometheus_enabled": True, "prometheus_categories": ["jobs", "audit"]},
                                key=daemon.admin_key)
    assert response.code == 200, body
    assert body["prometheus_enabled"] is True and body["prometheus_categories"] == ["jobs", "audit"]
    response, text = await scrape(daemon)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type") == ["text/plain; version=0.0.4; charset=utf-8"]
    assert family_names(text.decode()) == FAMILIES["jobs"] | FAMILIES["audit"]
    entries = audit_events(_AuditView(daemon), "metrics.configured")
    assert entries[-1]["details"] == {"old": {"prometheus_enabled": False,
                                              "prometheus_categories": ["jobs", "http", "health"]},
                                      "new": {"prometheus_enabled": True,
                                              "prometheus_categories": ["jobs", "audit"]}}
    assert entries[-1]["actor"] and entries[-1]["action"] == "update"

    await daemon.service.stopService()
    again = await make_daemon(subdir="one")  # same state directory: the settings survive
    response, body = await call(again, "GET", CONFIG, key=again.admin_key)
    assert body["prometheus_enabled"] is True and body["prometheus_categories"] == ["jobs", "audit"]
    assert body["sources"] == {"prometheus_enabled": "api", "prometheus_categories": "api"}
    response, _ = await scrape(again)
    assert response.code == 200
    response, body = await call(again, "PUT", CONFIG, {"prometheus_enabled": None}, key=again.admin_key)
    assert body["prometheus_enabled"] is False and body["sources"]["prometheus_enabled"] == "config"
    response, _ = await scrape(again)
    assert response.code == 404


class _AuditView:
    """``audit_events`` reads the real audit table when the writer is installed."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.ctx = daemon.ctx
        self.audit = None if daemon.ctx.audit is not None else _NoAudit()


class _NoAudit:
    def of(self, event_type):
        raise AssertionError("the audit writer is not installed")


@pytest_twisted.ensureDeferred
async def test_templates_switch_categories(make_daemon):
    daemon = await make_daemon()  # disabled: a template turns the export on
    expected = {
        "minimal": ["jobs"],
        "standard": ["jobs", "http", "health"],
        "security": ["jobs", "http", "rate_limits", "audit", "approvals"],
        "full": list(FAMILIES),
    }
    for name, categories in expected.items():
        response, body = await call(daemon, "POST", f"{CONFIG}/templates/{name}", key=daemon.admin_key)
        assert response.code == 200, body
        assert body["template"] == name and body["prometheus_categories"] == categories
        assert body["prometheus_enabled"] is True
        response, text = await scrape(daemon)
        assert family_names(text.decode()) == set().union(*(FAMILIES[c] for c in categories)), name
    response, body = await call(daemon, "POST", f"{CONFIG}/templates/everything", key=daemon.admin_key)
    assert response.code == 404 and "minimal" in body["detail"]
    response, body = await call(daemon, "GET", CONFIG, key=daemon.admin_key)
    assert body["prometheus_categories"] == expected["full"]
    templates = [e for e in audit_events(_AuditView(daemon), "metrics.configured") if e["action"] == "template"]
    assert [e["details"]["template"] for e in templates] == list(expected)


@pytest_twisted.ensureDeferred
async def test_preview_changes_nothing(make_daemon):
    daemon = await make_daemon()  # disabled: the preview still answers
    before_rows = settings_rows(daemon)
    before_config = (await call(daemon, "GET", CONFIG, key=daemon.admin_key))[1]
    audit_before = len(audit_events(_AuditView(daemon), "metrics.configured"))
    response, body = await call(daemon, "GET", f"{CONFIG}/preview?categories=jobs&categories=health",
                                key=daemon.admin_key)
    assert response.code == 200, body
    assert body["categories"] == ["jobs", "health"] and body["enabled"] is False
    assert family_names(body["metrics"]) == FAMILIES["jobs"] | FAMILIES["health"]
    assert value(body["metrics"], "simpletuner_jobs_total") == 0
    response, body = await call(daemon, "GET", f"{CONFIG}/preview?categories=circuit_breakers,provider",
                                key=daemon.admin_key)
    assert body["categories"] == ["circuit_breakers", "provider"]
    assert value(body["metrics"], "simpletuner_circuit_breaker_state", provider="replicate") == 0
    response, body = await call(daemon, "GET", f"{CONFIG}/preview?categories=jobs&categories=gpu",
                                key=daemon.admin_key)
    assert response.code == 400 and body["field"] == "categories"
    response, body = await call(daemon, "GET", f"{CONFIG}/preview", key=daemon.admin_key)
    assert body["categories"] == ["jobs", "http", "health"]
    assert settings_rows(daemon) == before_rows
    assert (await call(daemon, "GET", CONFIG, key=daemon.admin_key))[1] == before_config
    assert len(audit_events(_AuditView(daemon), "metrics.configured")) == audit_before
    response, _ = await scrape(daemon)
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_bearer_token(make_daemon):
    daemon = await make_daemon({"metrics": {"prometheus_enabled": True, "bearer_token": "scrape-secret-1"}})
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic scrape-secret-1"},
                    {"Authorization": "Bearer scrape-secret-12"}, {"X-API-Key": daemon.admin_key}):
        response, body = await scrape(daemon, headers)
        assert response.code == 401, headers
        assert json.loads(body)["error"] == "unauthorized"
        assert b"scrape-secret-1" not in body
    response, body = await scrape(daemon, {"Authorization": "Bearer scrape-secret-1"})
    assert response.code == 200 and b"simpletuner_jobs_total" in body
    response, body = await call(daemon, "GET", CONFIG, key=daemon.admin_key)
    assert body["bearer_token_required"] is True and "scrape-secret-1" not in json.dumps(body)


# -- a daemon that has done things --------------------------------------------------------


def signed(secret, payload):
    data = json.dumps(payload)
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(tz=timezone.utc)
    signature = Webhook(secret).sign(msg_id, now, data)
    return data.encode(), {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": signature, "Content-Type": "application/json"}


@pytest_twisted.async_yield_fixture
async def busy(make_daemon, tmp_path):
    env = await start_env(make_daemon, tmp_path, settings={
        "metrics": {"prometheus_enabled": True, "prometheus_categories": list(FAMILIES)},
        "rate_limit": {"exempt_loopback": False}})
    yield env
    await env.fake.stop()


@pytest_twisted.ensureDeferred
async def test_scrape_of_a_busy_daemon_matches_what_happened(busy, make_daemon, tmp_path):
    env = busy
    statuses = {}
    job_ids = []
    for _ in range(4):
        response, body = await env.submit(hardware_profile="h100")
        assert response.code == 200, body
        job_ids.append(body["job_id"])
    rows = [await env.ctx.db.run_read(jobs_store.get_job, job_id) for job_id in job_ids]
    external = [row["external_id"] for row in rows]

    # Two jobs finish through signed webhooks, as Replicate sends them.
    secret = env.fake.state.webhook_secret
    for pid, predict_time in ((external[0], 100.0), (external[1], 250.0)):
        prediction = env.fake.state.set_status(pid, "succeeded", predict_time=predict_time,
                                               output=["https://example.test/out.safetensors"])
        data, headers = signed(secret, prediction)
        response = await treq.post(env.url("/api/webhooks/replicate"), data=data, headers=headers)
        assert response.code in (200, 202), await response.text()
    # One fails and one runs, found by the poller.
    env.fake.state.set_status(external[2], "failed", error="out of memory")
    env.fake.state.set_status(external[3], "processing")
    await env.ctx.jobs.poll_once()
    statuses.update({job_ids[0]: "completed", job_ids[1]: "completed", job_ids[2]: "failed",
                     job_ids[3]: "running"})

    # The provider fails: five failures open the breaker, the sixth is refused at once.
    env.fake.state.mode = "fail"
    codes = []
    for _ in range(6):
        response, body = await env.submit(hardware_profile="h100")
        codes.append(response.code)
        if response.code == 502:
            statuses[body["job_id"]] = "failed"
    assert codes == [502] * 5 + [503]  # the refused submission creates no job

    # Six logins in a minute from one address: the sixth is rate limited.
    login_codes = []
    for _ in range(6):
        response = await treq.post(env.url("/api/auth/login"), data=b"{}",
                                   headers={"Content-Type": "application/json"})
        login_codes.append(response.code)
    assert login_codes[-1] == 429 and 429 not in login_codes[:-1]

    # What the database says happened (the truth the figures must match).
    for job_id, status in statuses.items():
        assert (await env.ctx.db.run_read(jobs_store.get_job, job_id))["status"] == status
    expected_cost = costs.job_cost(100.0, "h100") + costs.job_cost(250.0, "h100")
    assert expected_cost > 0

    def truth(conn):
        durations = conn.execute("SELECT AVG(completed_at - started_at) FROM jobs WHERE completed_at IS NOT NULL "
                                 "AND started_at IS NOT NULL").fetchone()[0]
        audit = conn.execute("SELECT COUNT(*) FROM audit_log").fetchone()[0]
        return durations, audit

    avg_duration, audit_total = await env.ctx.db.run_read(truth)

    # The 0.0.4 text format, checked by promtool.
    response, text = await scrape(env.daemon)
    assert response.code == 200
    assert set(promtool_problems(text)) <= GUIDE_NAME_LINTS
    text = text.decode()
    assert len(statuses) == 9
    assert value(text, "simpletuner_jobs_total") == 9
    assert value(text, "simpletuner_jobs_by_status", status="completed") == 2
    assert value(text, "simpletuner_jobs_by_status", status="failed") == 6
    assert value(text, "simpletuner_jobs_by_status", status="running") == 1
    assert value(text, "simpletuner_jobs_by_status", status="queued") == 0
    assert value(text, "simpletuner_jobs_active") == 1
    assert abs(value(text, "simpletuner_cost_usd_total") - expected_cost) < 1e-6
    assert abs(value(text, "simpletuner_job_duration_seconds_avg") - avg_duration) < 1e-6
    assert value(text, "simpletuner_http_requests_total", endpoint="POST_/api/cloud/jobs/submit") == 10
    assert value(text, "simpletuner_http_errors_total", endpoint_status="POST_/api/cloud/jobs/submit_502") == 5
    assert value(text, "simpletuner_http_errors_total", endpoint_status="POST_/api/cloud/jobs/submit_503") == 1
    assert value(text, "simpletuner_http_requests_total", endpoint="POST_/api/webhooks/<provider>") == 2
    assert value(text, "simpletuner_http_errors_total", endpoint_status="POST_/api/auth/login_429") == 1
    assert value(text, "simpletuner_rate_limit_violations_total") == 1
    assert value(text, "simpletuner_rate_limit_tracked_clients") >= 1
    assert value(text, "simpletuner_circuit_breaker_state", provider="replicate") == 2
    assert value(text, "simpletuner_circuit_breaker_failures_total", provider="replicate") == 5
    assert value(text, "simpletuner_approval_requests_pending") == 0
    # Entries written after the truth query (the 429's sampled entry is already in).
    assert value(text, "simpletuner_audit_log_entries_total") >= audit_total > 0
    assert value(text, "simpletuner_uptime_seconds") > 0
    assert value(text, "simpletuner_health_database_latency_ms") >= 0

    # OpenMetrics when asked, through the strict parser.
    response, body = await scrape(env.daemon, {"Accept": OPENMETRICS})
    assert response.headers.getRawHeaders("content-type")[0].startswith("application/openmetrics-text")
    families = {family.name: family for family in parse_openmetrics(body.decode())}
    assert families["simpletuner_jobs"].samples[0].value == 9
    assert families["simpletuner_circuit_breaker_state"].samples[0].value == 2
    assert {s.labels["status"]: s.value for s in families["simpletuner_jobs_by_status"].samples}["failed"] == 6

    # A restart loads the same job figures from the database.
    await env.daemon.service.stopService()
    again = await make_daemon(settings={"metrics": {"prometheus_enabled": True,
                                                    "prometheus_categories": ["jobs"]}})
    response, text = await scrape(again)
    text = text.decode()
    assert value(text, "simpletuner_jobs_total") == 9
    assert value(text, "simpletuner_jobs_by_status", status="failed") == 6
    assert abs(value(text, "simpletuner_cost_usd_total") - expected_cost) < 1e-6
    assert abs(value(text, "simpletuner_job_duration_seconds_avg") - avg_duration) < 1e-6


@pytest_twisted.ensureDeferred
async def test_deletion_keeps_counters_and_restore_reloads_the_figures(make_daemon, tmp_path):
    from pathlib import Path

    env = await start_env(make_daemon, tmp_path, settings={
        "metrics": {"prometheus_enabled": True, "prometheus_categories": ["jobs"]}})
    try:
        first = [(await env.submit(hardware_profile="h100"))[1]["job_id"] for _ in range(2)]
        row = await env.ctx.db.run_read(jobs_store.get_job, first[0])
        env.fake.state.set_status(row["external_id"], "succeeded", predict_time=60.0)
        await env.ctx.jobs.poll_once()
        backup = await env.ctx.backups.create()
        await env.submit(hardware_profile="h100")
        response, body = await env.call("DELETE", f"/api/cloud/jobs/{first[0]}")
        assert response.code == 200, body
        text = (await scrape(env.daemon))[1].decode()
        assert value(text, "simpletuner_jobs_total") == 3  # a counter: deletion does not lower it
        assert value(text, "simpletuner_cost_usd_total") == costs.job_cost(60.0, "h100")
        assert value(text, "simpletuner_jobs_by_status", status="completed") == 0
        assert value(text, "simpletuner_jobs_by_status", status="queued") == 2
        assert value(text, "simpletuner_job_duration_seconds_avg") == 0

        await env.ctx.backups.restore(Path(backup["path"]))
        text = (await scrape(env.daemon))[1].decode()
        assert value(text, "simpletuner_jobs_total") == 2  # recounted from the restored database
        assert value(text, "simpletuner_jobs_by_status", status="completed") == 1
        assert value(text, "simpletuner_jobs_by_status", status="queued") == 1
        assert value(text, "simpletuner_cost_usd_total") == costs.job_cost(60.0, "h100")
    finally:
        await env.fake.stop()


@pytest_twisted.ensureDeferred
async def test_cost_limit_percent_follows_costs(make_daemon, tmp_path):
    env = await start_env(make_daemon, tmp_path, provider_settings={
        "cost_limit_enabled": True, "cost_limit_amount": 10.0, "cost_limit_period": "monthly"},
        settings={"metrics": {"prometheus_enabled": True, "prometheus_categories": ["provider"]}})
    try:
        text = (await scrape(env.daemon))[1].decode()
        assert value(text, "simpletuner_cost_limit_percent_used", provider="replicate") == 0
        assert "simpletuner_credit_balance_usd{" not in text  # Replicate reports no balance
        job_id = (await env.submit(hardware_profile="h100"))[1]["job_id"]
        row = await env.ctx.db.run_read(jobs_store.get_job, job_id)
        prediction = env.fake.state.set_status(row["external_id"], "succeeded", predict_time=1000.0)
        data, headers = signed(env.fake.state.webhook_secret, prediction)
        response = await treq.post(env.url("/api/webhooks/replicate"), data=data, headers=headers)
        assert response.code in (200, 202)
        expected = round(costs.job_cost(1000.0, "h100") / 10.0 * 100.0, 4)
        text = (await scrape(env.daemon))[1].decode()
        assert value(text, "simpletuner_cost_limit_percent_used", provider="replicate") == expected
        await env.ctx.metrics.spend.refresh(env.ctx.db)  # the periodic re-read agrees
        text = (await scrape(env.daemon))[1].decode()
        assert value(text, "simpletuner_cost_limit_percent_used", provider="replicate") == expected
        response, body = await env.call("PUT", "/api/cloud/providers/replicate", {"cost_limit_enabled": False})
        assert response.code == 200, body
        text = (await scrape(env.daemon))[1].decode()
        assert "simpletuner_cost_limit_percent_used{" not in text
    finally:
        await env.fake.stop()


@pytest_twisted.ensureDeferred
async def test_bad_input_is_a_clear_4xx(daemon):
    key = daemon.admin_key
    cases = [
        ("GET", f"{CONFIG}/preview?categories=%ff", None, 400),
        ("GET", f"{CONFIG}/preview?categories=" + "x" * 5000, None, 400),
        ("PUT", CONFIG, {"prometheus_categories": [{"name": "jobs"}]}, 400),
        ("PUT", CONFIG, {"prometheus_categories": "jobs,cpu"}, 400),
        ("PUT", CONFIG, [1, 2], 400),
        ("PUT", CONFIG, {}, 400),
        ("POST", f"{CONFIG}/templates/%00", None, 404),
        ("POST", f"{CONFIG}/templates/" + "y" * 3000, None, 404),
    ]
    for method, path, body, status in cases:
        response, answer = await call(daemon, method, path, body, key=key)
        assert response.code == status, (method, path[:80], answer)
        assert answer["error"] and answer["detail"]
    # An empty selection is allowed: the scrape is then empty (and still valid).
    response, body = await call(daemon, "PUT", CONFIG, {"prometheus_enabled": True, "prometheus_categories": []},
                                key=key)
    assert response.code == 200 and body["prometheus_categories"] == []
    response, text = await scrape(daemon, {"Accept": "\x01garbage;;q=x"})
    assert response.code == 200 and text == b""
    assert promtool_problems(text) == []
