"""SimpleTuner's CLI contract, command group by command group (S18).

Each test sends exactly what a ``simpletuner …`` command of SimpleTuner 4.10.1
sends (path, query, JSON body, ``X-API-Key``; see tests/cli_client.py) to a
real daemon and checks every field that command reads, with the type it
needs.  The command each block stands for is named in a comment.
"""

from __future__ import annotations

import json

import pytest_twisted
import treq
from twisted.internet import defer, reactor, task
from twisted.internet.task import Clock

from stdaemon.webhooks import signature as ws
from stdaemon.jobs.http_logs import JobLogsSurface
from tests.cli_client import CliClient, expect, is_iso
from tests.replicate_env import start_env


def cli(daemon, key=None) -> CliClient:
    return CliClient(daemon.url, key or daemon.admin_key)


# -- simpletuner auth users … -------------------------------------------------------------

USER_FIELDS = dict(id="int", username="str", email="str", display_name="str?", is_admin="bool",
                   is_active="bool", email_verified="bool", auth_provider="str", created_at="iso",
                   last_login_at="str?")


@pytest_twisted.ensureDeferred
async def test_users_group(daemon):
    client = cli(daemon)

    # auth users list: "{user.get('email', '')[:29]}" — the first admin has no email.
    listing = await client.ok("GET", "/api/users?limit=100&offset=0")
    users = listing["users"]
    assert users and users[0]["username"] == "admin"
    for user in users:
        expect(user, **USER_FIELDS)
    assert users[0]["email"] == "" and users[0]["is_admin"] is True

    # auth users create --email … --username … [--password …] [--display-name …] [--admin]
    created = await client.ok("POST", "/api/users", {"email": "ada@example.test", "username": "ada",
                                                     "is_admin": False, "password": "a long passphrase",
                                                     "display_name": "Ada L."})
    expect(created, id="int", username="str", email="str")
    assert created["display_name"] == "Ada L." and created["role"] == "viewer"
    boss = await client.ok("POST", "/api/users", {"email": "boss@example.test", "username": "boss",
                                                  "is_admin": True})
    assert boss["role"] == "admin" and boss["is_admin"] is True and boss["has_password"] is False
    ops = await client.ok("POST", "/api/users", {"email": "ops@example.test", "username": "ops",
                                                 "is_admin": False, "level_names": ["viewer", "operator"]})
    assert ops["role"] == "operator"
    status, detail = await client.error("POST", "/api/users", {"email": "x@example.test", "username": "x",
                                                               "is_admin": False, "level_names": ["wizard"]})
    assert status == 400 and "level" in detail

    # auth users get <id> / auth users me
    fetched = await client.ok("GET", f"/api/users/{created['id']}")
    expect(fetched, **USER_FIELDS)
    assert fetched["username"] == "ada" and fetched["display_name"] == "Ada L."
    me = await client.ok("GET", "/api/users/me")
    expect(me, **USER_FIELDS)
    await client.error("GET", "/api/users/999999")

    # auth users update <id> --admin true / --active false / --display-name …
    await client.ok("PATCH", f"/api/users/{created['id']}", {"is_admin": True, "display_name": "Ada"})
    fetched = await client.ok("GET", f"/api/users/{created['id']}")
    assert fetched["is_admin"] is True and fetched["role"] == "admin" and fetched["display_name"] == "Ada"
    await client.ok("PATCH", f"/api/users/{created['id']}", {"is_admin": False, "is_active": False})
    fetched = await client.ok("GET", f"/api/users/{created['id']}")
    assert fetched["role"] == "operator" and fetched["is_active"] is False and fetched["disabled"] is True

    # auth users activate / deactivate <id>: the CLI checks "success".
    result = await client.ok("POST", f"/api/users/{created['id']}/activate")
    assert result["success"] is True and result["user"]["is_active"] is True
    result = await client.ok("POST", f"/api/users/{ops['id']}/deactivate")
    assert result["success"] is True and result["user"]["is_active"] is False
    # auth users list [--include-inactive]
    listed = {u["username"] for u in (await client.ok("GET", "/api/users?limit=100&offset=0"))["users"]}
    assert "ops" not in listed and "ada" in listed
    listed = (await client.ok("GET", "/api/users?limit=100&offset=0&include_inactive=true"))["users"]
    assert {"ops", "ada"} <= {u["username"] for u in listed}

    # auth users auth-status / auth status
    status_body = await client.ok("GET", "/api/users/meta/auth-status")
    assert status_body["in_use"] is True and status_body["user_count"] == 4
    assert status_body["has_external_providers"] is False

    # auth users delete <id> --force
    result = await client.ok("DELETE", f"/api/users/{boss['id']}")
    assert result["success"] is True

    # auth users levels list: stdaemon's levels are its roles
    levels = (await client.ok("GET", "/api/users/meta/levels"))["levels"]
    assert [level["name"] for level in levels] == ["viewer", "operator", "admin"]
    for level in levels:
        expect(level, id="int", name="str", priority="int", is_system="bool", permissions="list")

    # auth setup: never needed (the first admin exists from the start); the reason is the detail
    setup = await client.ok("GET", "/api/auth/setup/status")
    assert setup["needs_setup"] is False and setup["user_count"] == 3
    status, detail = await CliClient(daemon.url, None).error("POST", "/api/auth/setup/first-admin",
                                                     {"email": "a@example.test", "username": "a",
                                                      "password": "a long passphrase"})
    assert status == 409 and "setup link" in detail
    assert len((await client.ok("GET", "/api/users?limit=100&offset=0&include_inactive=true"))["users"]) == 3

    # A non-admin reads only itself.
    response = await client.ok("POST", "/api/auth/api-keys", {"name": "k", "role": "operator",
                                                              "user_id": created["id"],
                                                              "expires_days": 30})
    assert is_iso(response["expires_at"])
    for key in (await client.ok("GET", "/api/auth/api-keys"))["keys"]:   # S18: times as ISO
        expect(key, created_at="iso", expires_at="iso?", revoked_at="iso?")
    own = cli(daemon, response["key"])
    assert (await own.ok("GET", f"/api/users/{created['id']}"))["id"] == created["id"]
    status, _ = await own.error("GET", "/api/users/1")
    assert status == 403


# -- simpletuner auth audit … ----------------------------------------------------------------

ENTRY_FIELDS = dict(id="int", timestamp="iso", event_type="str", action="str", actor_username="str?",
                    actor_id="int?", actor_ip="str?", target_type="str?", target_id="str?")


@pytest_twisted.ensureDeferred
async def test_audit_group(daemon):
    client = cli(daemon)
    ada = await client.ok("POST", "/api/users", {"email": "ada@example.test", "username": "ada",
                                                 "is_admin": False, "password": "a long passphrase"})
    await client.ok("PATCH", f"/api/users/{ada['id']}", {"display_name": "Ada"})
    for i in range(3):
        await daemon.ctx.audit.record("job.submitted", actor="ada", target=f"job-{i}", action=None)

    # auth audit list --limit 2: entries sliced as strings, actor_username or user:<actor_id>.
    page = await client.ok("GET", "/api/audit?limit=2&offset=0")
    assert page["has_more"] is True and len(page["entries"]) == 2
    for entry in page["entries"]:
        expect(entry, **ENTRY_FIELDS)
    newest = page["entries"][0]
    assert newest["event_type"] == "job.submitted" and newest["actor_username"] == "ada"
    assert newest["actor_id"] == ada["id"] and newest["action"] == ""

    # --actor-id / --event-type / --target-type --target-id / --since
    page = await client.ok("GET", f"/api/audit?limit=50&offset=0&actor_id={ada['id']}&event_type=job.submitted")
    assert page["total"] == 3 and not page["has_more"]
    page = await client.ok("GET", f"/api/audit?limit=50&offset=0&target_type=user&target_id={ada['id']}")
    assert {e["event_type"] for e in page["entries"]} == {"user.created", "user.updated"}
    assert all(e["target_type"] == "user" and e["target_id"] == str(ada["id"]) for e in page["entries"])
    page = await client.ok("GET", "/api/audit?limit=50&offset=0&since=2000-01-01&until=2999-01-01")
    assert page["total"] >= 5
    page = await client.ok("GET", "/api/audit?limit=50&offset=0&actor_id=424242")
    assert page["entries"] == [] and page["total"] == 0

    # auth audit stats
    stats = await client.ok("GET", "/api/audit/stats")
    expect(stats, total_entries="int", last_24h="int", first_entry="iso", last_entry="iso", by_type="dict")
    assert stats["by_type"]["job.submitted"] == 3 and stats["total_entries"] == sum(stats["by_type"].values())

    # auth audit types
    types = (await client.ok("GET", "/api/audit/types"))["event_types"]
    values = {t["value"] for t in types}
    assert {"job.submitted", "user.created", "auth.login.failed"} <= values
    assert all(isinstance(t["name"], str) for t in types)

    # auth audit user <id>: by or about the user.
    page = await client.ok("GET", f"/api/audit/user/{ada['id']}?limit=50&offset=0")
    assert {e["event_type"] for e in page["entries"]} == {"job.submitted", "user.created", "user.updated"}
    for entry in page["entries"]:
        expect(entry, **ENTRY_FIELDS)
    await client.error("GET", "/api/audit/user/9999?limit=50&offset=0")

    # auth audit security
    await client.call("POST", "/api/auth/login", {"username": "ada", "password": "wrong password!"})
    page = await client.ok("GET", "/api/audit/security?limit=50&offset=0")
    kinds = {e["event_type"] for e in page["entries"]}
    assert "auth.login.failed" in kinds and "user.created" in kinds and "job.submitted" not in kinds

    # auth audit verify [--start-id N]
    report = await client.ok("GET", "/api/audit/verify?start_id=1")
    expect(report, valid="bool", entries_checked="int", first_id="int", last_id="int", broken_links="list")
    assert report["valid"] is True and report["entries_checked"] == report["last_id"] - report["first_id"] + 1
    assert is_iso(stats["first_entry"])


# -- simpletuner quota … ---------------------------------------------------------------------

QUOTA_FIELDS = dict(id="int", quota_type="str", limit_value="num", action="str")


@pytest_twisted.ensureDeferred
async def test_quota_group(daemon):
    client = cli(daemon)

    # quota create --type cost_daily --limit 25 --action warn [--user-id 1]: the CLI checks "quota".
    created = await client.ok("POST", "/api/quotas", {"quota_type": "cost_daily", "limit_value": 25.0,
                                                      "action": "warn"})
    expect(created["quota"], **QUOTA_FIELDS)
    assert created["quota"]["quota_type"] == "daily_cost_usd" and created["quota"]["limit_value"] == 25.0
    await client.ok("POST", "/api/quotas", {"quota_type": "cost_monthly", "limit_value": 500.0,
                                            "action": "require_approval", "user_id": 1})
    await client.ok("POST", "/api/quotas", {"quota_type": "concurrent_jobs", "limit_value": 3.0,
                                            "action": "block"})
    status, detail = await client.error("POST", "/api/quotas", {"quota_type": "concurrent_jobs",
                                                                "limit_value": 3.0, "action": "block",
                                                                "team_id": 4})
    assert status == 400 and "team" in detail
    status, detail = await client.error("POST", "/api/quotas", {"quota_type": "jobs_per_hour",
                                                                "limit_value": 3.0, "action": "block"})
    assert status == 400 and "quota_type" in detail

    # quota list: "{limit_value:<12}" and the scope from user_id/team_id/org_id.
    quotas = (await client.ok("GET", "/api/quotas"))["quotas"]
    assert len(quotas) == 3
    for quota in quotas:
        expect(quota, user_id="int?", created_at="iso", **QUOTA_FIELDS)
    assert {q["action"] for q in quotas} == {"warn", "require_approval", "block"}

    # quota status: "current / limit_value", "{current:.2f} / {limit_value:.2f}".
    body = await client.ok("GET", "/api/quotas/status")
    assert len(body["quotas"]) == 3  # the admin is user 1: the user quota applies too
    for quota in body["quotas"]:
        expect(quota, current_usage="num", percent_used="num", **QUOTA_FIELDS)
    assert body == await client.ok("GET", "/api/quotas/me")

    # quota types: name, description, unit for each.
    types = (await client.ok("GET", "/api/quotas/types"))["types"]
    assert {t["name"] for t in types} == {"concurrent_jobs", "daily_cost_usd", "monthly_cost_usd"}
    for quota_type in types:
        expect(quota_type, name="str", description="str", unit="str")

    # quota delete <id> --force
    result = await client.ok("DELETE", f"/api/quotas/{created['id']}")
    assert result["success"] is True


# -- simpletuner cloud jobs … / simpletuner jobs … / simpletuner jobs approval … ---------------

JOB_FIELDS = dict(job_id="str", status="str", config_name="str?", provider="str", job_type="str",
                  is_terminal="bool", is_active="bool", created_at="iso", started_at="iso?",
                  finished_at="iso?", duration_seconds="num?", cost_usd="num?", error_message="str?",
                  metadata="dict")


@pytest_twisted.ensureDeferred
async def test_jobs_and_approvals_groups(env):
    client = cli(env.daemon)
    response, first = await env.submit()
    assert response.code == 200, first
    external_id = (await client.ok("GET", f"/api/cloud/jobs/{first['job_id']}"))["job"]["external_id"]
    env.fake.state.set_status(external_id, "processing", logs="step 1\n")

    # cloud jobs list --limit 20 [--status running] [--sync]; jobs list (metadata.run_name, duration)
    jobs = (await client.ok("GET", "/api/cloud/jobs?limit=20"))["jobs"]
    assert [j["job_id"] for j in jobs] == [first["job_id"]]
    for job in jobs:
        expect(job, **JOB_FIELDS)
    assert jobs[0]["job_type"] == "cloud" and jobs[0]["is_active"] is True and jobs[0]["is_terminal"] is False
    synced = (await client.ok("GET", "/api/cloud/jobs?limit=20&status=running&sync_active=true"))["jobs"]
    assert [j["status"] for j in synced] == ["running"]

    # cloud jobs get <id> / jobs get <id>: result["job"]
    job = (await client.ok("GET", f"/api/cloud/jobs/{first['job_id']}"))["job"]
    expect(job, **JOB_FIELDS)
    assert job["started_at"] is not None and job["duration_seconds"] is not None

    # cloud jobs logs <id>
    logs = await client.ok("GET", f"/api/cloud/jobs/{first['job_id']}/logs")
    assert logs["logs"] == "step 1\n"

    # cloud jobs cancel <id> / delete <id> --force: "success"
    assert (await client.ok("POST", f"/api/cloud/jobs/{first['job_id']}/cancel"))["success"] is True
    job = (await client.ok("GET", f"/api/cloud/jobs/{first['job_id']}"))["job"]
    assert job["is_terminal"] is True and job["is_active"] is False and is_iso(job["finished_at"])
    assert (await client.ok("DELETE", f"/api/cloud/jobs/{first['job_id']}"))["success"] is True
    status, detail = await client.error("DELETE", f"/api/cloud/jobs/{first['job_id']}")
    assert status == 404

    # jobs approval rules: id, type, condition, enabled
    await client.ok("POST", "/api/approvals/rules", {"name": "big", "condition": "hardware_profile",
                                                     "value": "h100-x8"})
    rules = (await client.ok("GET", "/api/approvals/rules"))["rules"]
    expect(rules[0], id="int", type="str", enabled="bool", created_at="iso")

    # A held submission, then jobs approval list/pending/approve/reject.
    response, held = await env.submit(hardware_profile="h100-x8")
    assert held["status"] == "pending_approval"
    response, second = await env.submit(hardware_profile="h100-x8", config_name="other")
    listing = (await client.ok("GET", "/api/approvals?limit=50"))["approvals"]
    assert len(listing) == 2
    for item in listing:   # "(a.get('job_id') or '-')[:12]", "a.get('requested_at', '-')[:19]"
        expect(item, id="int", job_id="str", status="str", config_name="str?", reason="str?",
               requested_at="iso")
    pending = (await client.ok("GET", "/api/approvals?status=pending&limit=50"))["approvals"]
    assert {a["job_id"] for a in pending} == {held["job_id"], second["job_id"]}
    by_job = {a["job_id"]: a for a in pending}
    approved = await client.ok("POST", f"/api/approvals/{by_job[held['job_id']]['id']}/approve",
                               {"reason": "ok"})
    assert approved["success"] is True
    rejected = await client.ok("POST", f"/api/approvals/{by_job[second['job_id']]['id']}/reject")
    assert rejected["success"] is True
    job = (await client.ok("GET", f"/api/cloud/jobs/{held['job_id']}"))["job"]
    assert job["status"] == "queued"


# -- simpletuner cloud config … / cloud cost-limit … / cloud status ----------------------------

@pytest_twisted.ensureDeferred
async def test_provider_config_cost_limit_and_status_groups(env):
    client = cli(env.daemon)

    # cloud config show: result["config"], printed key by key; hardware_info for --dry-run.
    config = (await client.ok("GET", "/api/cloud/providers/replicate/config"))["config"]
    expect(config, cost_limit_enabled="bool", cost_limit_amount="num", cost_limit_period="str",
           cost_limit_action="str", webhook_url="str", hardware_info="dict")
    for hardware in config["hardware_info"].values():
        expect(hardware, name="str", cost_per_second="num")

    # cloud config set version_override <id> (and back to the newest version with null)
    result = await client.ok("PUT", "/api/cloud/providers/replicate/config",
                             {"version_override": "5c7d5dc6dd8bf75c1acaa8565735e7986bc5b66206b55cca93cb72c9bf15ccaa"})
    assert result["config"]["version_override"].startswith("5c7d5dc6")
    result = await client.ok("PUT", "/api/cloud/providers/replicate/config", {"version_override": None})
    assert result["config"]["version_override"] == ""

    # cloud jobs submit --dry-run: GET /api/cloud/replicate/validate
    validated = await client.ok("GET", "/api/cloud/replicate/validate")
    assert validated["valid"] is True and isinstance(validated["user_info"]["username"], str)

    # cloud config set webhook_url https://…: "config" not None
    result = await client.ok("PUT", "/api/cloud/providers/replicate/config",
                             {"webhook_url": "https://hooks.example.test/in"})
    assert result["config"]["webhook_url"] == "https://hooks.example.test/in"
    status, detail = await client.error("PUT", "/api/cloud/providers/replicate/config",
                                        {"webhook_url": "ftp://x"})
    assert status == 400 and "webhook_url" in detail
    response, job = await env.submit()
    sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
    assert sent.body["webhook"] == "https://hooks.example.test/in"

    # cloud cost-limit set --amount 0.01 --period daily --action require_approval
    result = await client.ok("PUT", "/api/cloud/providers/replicate/config",
                             {"cost_limit_enabled": True, "cost_limit_amount": 0.01,
                              "cost_limit_period": "daily", "cost_limit_action": "require_approval"})
    assert result["config"]["cost_limit_action"] == "require_approval"
    shown = (await client.ok("GET", "/api/cloud/providers/replicate/config"))["config"]
    assert shown["cost_limit_amount"] == 0.01 and shown["cost_limit_period"] == "daily"
    # Over the limit: held for approval, nothing sent to Replicate until approved.
    before = len(env.fake.state.requests_to("POST", "/v1/predictions"))
    response, held = await env.submit()
    assert response.code == 200 and held["success"] is True and held["status"] == "pending_approval"
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == before
    pending = (await client.ok("GET", "/api/approvals?status=pending&limit=50"))["approvals"]
    assert [a["job_id"] for a in pending] == [held["job_id"]]
    assert "cost limit" in pending[0]["reason"]
    approved = await client.ok("POST", f"/api/approvals/{pending[0]['id']}/approve")
    assert approved["success"] is True
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == before + 1
    # cloud cost-limit disable
    result = await client.ok("PUT", "/api/cloud/providers/replicate/config", {"cost_limit_enabled": False})
    assert result["config"]["cost_limit_enabled"] is False

    # cloud status --replicate: health with include_replicate, then /api/cloud/replicate/status.
    health = await client.ok("GET", "/api/cloud/health?include_replicate=true")
    expect(health, status="str", uptime_seconds="num", components="list", timestamp="iso")
    names = {c["name"] for c in health["components"]}
    assert "provider:replicate" in names
    for component in health["components"]:
        expect(component, name="str", status="str", message="str", latency_ms="num?")
    plain = await client.ok("GET", "/api/cloud/health?")
    assert "provider:replicate" not in {c["name"] for c in plain["components"]}
    replicate = await client.ok("GET", "/api/cloud/replicate/status")
    expect(replicate, operational="bool", ongoing_incidents="list", in_progress_maintenances="list",
           scheduled_maintenances="list")
    assert replicate["operational"] is True and "error" not in replicate
    env.fake.state.mode = "fail"   # Replicate answers 500
    replicate = await client.ok("GET", "/api/cloud/replicate/status")
    assert replicate["operational"] is False and len(replicate["ongoing_incidents"]) == 1


@pytest_twisted.ensureDeferred
async def test_a_require_approval_quota_holds_the_submission(env):
    client = cli(env.daemon)
    await client.ok("POST", "/api/quotas", {"quota_type": "concurrent_jobs", "limit_value": 1.0,
                                            "action": "require_approval"})
    response, first = await env.submit()
    assert first["status"] == "queued"
    response, second = await env.submit()
    assert response.code == 200 and second["status"] == "pending_approval"
    pending = (await client.ok("GET", "/api/approvals?status=pending&limit=50"))["approvals"]
    assert [a["job_id"] for a in pending] == [second["job_id"]]
    assert "concurrent_jobs quota" in pending[0]["reason"]


# -- simpletuner metrics … ---------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_metrics_group(make_daemon, tmp_path):
    clock = Clock()
    clock.advance(1_767_268_800)  # 2026-01-01T12:00:00Z
    env = await start_env(make_daemon, tmp_path, clock=clock)
    try:
        client = cli(env.daemon)
        response, job = await env.submit(hardware_profile="h100-x2")
        external_id = (await client.ok("GET", f"/api/cloud/jobs/{job['job_id']}"))["job"]["external_id"]
        env.fake.state.set_status(external_id, "processing")
        await client.ok("GET", "/api/cloud/jobs?limit=20&sync_active=true")
        clock.advance(1800)  # it runs for 30 minutes on two GPUs
        env.fake.state.set_status(external_id, "succeeded", predict_time=1800.0)
        await client.ok("GET", "/api/cloud/jobs?limit=20&sync_active=true")
        cost = (await client.ok("GET", f"/api/cloud/jobs/{job['job_id']}"))["job"]["cost_usd"]
        assert cost > 0

        # metrics status
        status = await client.ok("GET", "/api/metrics/status")
        expect(status, enabled="bool", prometheus_enabled="bool", collectors="list")
        assert status["enabled"] is False

        # metrics prometheus --raw while disabled: an error with a detail (the hint).
        code, detail = await client.error("GET", "/api/metrics/prometheus")
        assert code == 404 and "prometheus_enabled" in detail
        await client.ok("PUT", "/api/metrics/config", {"prometheus_enabled": True,
                                                       "prometheus_categories": ["jobs", "health"]})
        raw = await client.ok("GET", "/api/metrics/prometheus")
        assert "simpletuner_jobs_total 1.0" in raw["metrics"]
        # Prometheus itself (no JSON in Accept) gets the text exposition on the same path.
        scraped = await treq.get(env.daemon.url + "/api/metrics/prometheus")
        assert scraped.code == 200 and (await scraped.text()).startswith("# HELP")
        assert scraped.headers.getRawHeaders("content-type")[0].startswith("text/plain")

        # metrics prometheus (info)
        info = await client.ok("GET", "/api/metrics/prometheus/info")
        expect(info, endpoint="str", enabled="bool", metric_families="list")
        assert "simpletuner_jobs_total" in info["metric_families"] and info["enabled"] is True

        # metrics health: healthy + components {name: {healthy, detail}}
        health = await client.ok("GET", "/api/metrics/health")
        assert health["healthy"] is True and "database" in health["components"]
        for component in health["components"].values():
            expect(component, healthy="bool", detail="str")

        # metrics costs --period month / usage --period day
        costs = await client.ok("GET", "/api/metrics/costs?period=month")
        expect(costs["summary"], total_cost="num", currency="str")
        assert costs["summary"]["total_cost"] == cost and costs["by_provider"] == {"replicate": cost}
        assert costs["recent_jobs"] == [{"job_id": job["job_id"], "cost": cost, "status": "completed",
                                         "created_at": "2026-01-01T12:00:00.000Z"}]
        for value in list(costs["by_provider"].values()) + list(costs["by_job_type"].values()):
            assert isinstance(value, float)
        usage = await client.ok("GET", "/api/metrics/usage?period=day")
        expect(usage["gpu"], total_hours="num", by_type="dict")
        assert usage["gpu"]["by_type"] == {"h100": 1.0}   # 30 minutes on two GPUs
        assert usage["jobs"] == {"submitted": 1, "completed": 1, "failed": 0, "by_status": {"completed": 1}}
        job_view = (await client.ok("GET", f"/api/cloud/jobs/{job['job_id']}"))["job"]
        assert job_view["duration_seconds"] == 1800.0
        assert job_view["created_at"] == "2026-01-01T12:00:00.000Z"
        code, detail = await client.error("GET", "/api/metrics/costs?period=year")
        assert code == 400

        # The preview in SimpleTuner's shape (text in content), GET and POST, on both paths.
        preview = await client.ok("GET", "/api/cloud/metrics/config/preview?categories=jobs")
        expect(preview, content="str", metric_count="int", categories_used="list")
        assert preview["categories_used"] == ["jobs"] and "simpletuner_jobs_total" in preview["content"]
        assert preview["metric_count"] == sum(1 for line in preview["content"].splitlines()
                                              if line.startswith("simpletuner_"))
        posted = await client.ok("POST", "/api/metrics/config/preview", {"categories": ["jobs"]})
        assert posted["categories_used"] == ["jobs"] and posted["metric_count"] == preview["metric_count"]
    finally:
        await env.fake.stop()


# -- simpletuner backup … / simpletuner database … ---------------------------------------------

@pytest_twisted.ensureDeferred
async def test_backup_and_database_groups(daemon):
    client = cli(daemon)

    # backup create --name nightly --description "…": success, backup_id, path, size_bytes, components
    created = await client.ok("POST", "/api/backup", {"name": "nightly", "description": "before upgrade"})
    expect(created, success="bool", backup_id="str", path="str", size_bytes="int", components="list")
    assert created["backup_id"] == "jobs_backup_nightly.db" and created["size_bytes"] > 0
    status, detail = await client.error("POST", "/api/backup", {"name": "nightly"})
    assert status == 409
    status, detail = await client.error("POST", "/api/backup", {"name": "../escape"})
    assert status == 400
    second = await client.ok("POST", "/api/backup", {})

    # backup list --limit 50: id[:24], name[:19], size_bytes, components, created_at[:19]; totals
    listing = await client.ok("GET", "/api/backup?limit=50")
    for entry in listing["backups"]:
        expect(entry, id="str", name="str", size_bytes="int", components="list", created_at="iso")
    assert {e["id"] for e in listing["backups"]} == {created["backup_id"], second["backup_id"]}
    assert listing["total_size_bytes"] == sum(e["size_bytes"] for e in listing["backups"])
    assert isinstance(listing["backup_dir"], str) and listing["backup_dir"]
    # the same files as stdaemon's own listing
    own = await client.ok("GET", "/api/admin/backups")
    assert {e["name"] for e in own["backups"]} == {e["id"] for e in listing["backups"]}

    # backup get <id>
    fetched = await client.ok("GET", f"/api/backup/{created['backup_id']}")
    expect(fetched, id="str", name="str", created_at="iso", size_bytes="int", components="list")
    await client.error("GET", "/api/backup/jobs_backup_missing.db")

    # backup restore <id> --dry-run, then for real (--force)
    await client.ok("POST", "/api/users", {"email": "late@example.test", "username": "late", "is_admin": False})
    dry = await client.ok("POST", f"/api/backup/{created['backup_id']}/restore",
                          {"backup_id": created["backup_id"], "dry_run": True})
    assert dry["success"] is True and dry["dry_run"] is True and dry["restored_components"] == ["database"]
    names = [u["username"] for u in (await client.ok("GET", "/api/users?limit=100&offset=0"))["users"]]
    assert "late" in names   # nothing restored by the dry run
    done = await client.ok("POST", f"/api/backup/{created['backup_id']}/restore",
                           {"backup_id": created["backup_id"], "dry_run": False})
    assert done["success"] is True and done["dry_run"] is False and isinstance(done["warnings"], list)
    names = [u["username"] for u in (await client.ok("GET", "/api/users?limit=100&offset=0"))["users"]]
    assert "late" not in names

    # backup delete <id> --force
    assert (await client.ok("DELETE", f"/api/backup/{second['backup_id']}"))["success"] is True
    await client.error("DELETE", f"/api/backup/{second['backup_id']}")
    kinds = {e["event_type"] for e in (await client.ok("GET", "/api/audit?limit=200&offset=0"))["entries"]}
    assert {"backup.created", "backup.restored", "backup.deleted"} <= kinds

    # database health: healthy, total_size_bytes, databases[{exists, name, size_bytes, table_count}]
    health = await client.ok("GET", "/api/database/health")
    assert health["healthy"] is True and health["issues"] == []
    expect(health, total_size_bytes="int", databases="list")
    for database in health["databases"]:
        expect(database, name="str", exists="bool", size_bytes="int", table_count="int")

    # database verify jobs|auth|approvals; notifications and webui do not exist here
    verified = await client.ok("GET", "/api/database/verify/jobs")
    assert verified["valid"] is True and verified["integrity_check"] == "ok"
    assert verified["foreign_key_check"] == []
    status, detail = await client.error("GET", "/api/database/verify/notifications")
    assert status == 404 and "share one SQLite database" in detail

    # database migrations [--database auth] / migrate --dry-run / vacuum (refused, with the reason)
    migrations = await client.ok("GET", "/api/database/migrations?database=auth")
    assert migrations["pending_migrations"] == [] and migrations["applied_migrations"]
    for migration in migrations["applied_migrations"]:
        expect(migration, version="int", name="str", applied_at="iso")
    ran = await client.ok("POST", "/api/database/migrations/run?database=auth&dry_run=true")
    assert ran["success"] is True and ran["dry_run"] is True and ran["pending"] == []
    status, detail = await client.error("POST", "/api/database/vacuum/jobs")
    assert status == 409 and "VACUUM" in detail

    # database stats: {db: {exists, size_bytes, page_count, page_size, freelist_count, tables: {t: {row_count}}}}
    stats = await client.ok("GET", "/api/database/stats")
    for figures in stats.values():
        expect(figures, exists="bool", size_bytes="int", page_count="int", page_size="int",
               freelist_count="int", tables="dict")
    assert stats["jobs"]["tables"]["users"]["row_count"] == 1


# -- simpletuner jobs status (queue) / simpletuner webhooks … ----------------------------------

@pytest_twisted.ensureDeferred
async def test_queue_and_webhooks_groups(env):
    client = cli(env.daemon)
    await client.ok("POST", "/api/quotas", {"quota_type": "concurrent_jobs", "limit_value": 4.0,
                                            "action": "block"})
    await client.ok("POST", "/api/approvals/rules", {"name": "big", "condition": "hardware_profile",
                                                     "value": "h100-x8"})
    response, job = await env.submit()
    response, held = await env.submit(hardware_profile="h100-x8")

    # jobs status: queue_depth, running, by_status{pending, completed, failed}, limits
    status, detail = await client.error("POST", "/api/queue/submit",   # jobs submit (local queue)
                                        {"config_name": "x", "no_wait": False, "any_gpu": False,
                                         "for_approval": False, "target": "auto"})
    assert status == 409 and "cloud jobs submit" in detail
    stats = await client.ok("GET", "/api/queue/stats")
    expect(stats, queue_depth="int", running="int", by_status="dict")
    assert stats["queue_depth"] == 2 and stats["by_status"]["pending_approval"] == 1
    assert stats["max_concurrent"] == 4 and stats["user_max_concurrent"] == 4
    assert stats["local"] is None and stats["workers"] is None

    # webhooks list / get 1 / events / history
    hooks = (await client.ok("GET", "/api/webhooks"))["webhooks"]
    assert [h["name"] for h in hooks] == ["replicate"]
    for hook in hooks:
        expect(hook, id="int", name="str", url="str", events="list", enabled="bool")
    assert hooks[0]["url"] == "https://daemon.example.test/api/webhooks/replicate"
    one = await client.ok("GET", "/api/webhooks/1")
    assert one["name"] == "replicate" and isinstance(one["has_secret"], bool)
    await client.error("GET", "/api/webhooks/7")
    events = (await client.ok("GET", "/api/webhooks/events"))["events"]
    assert events and all(isinstance(e["name"], str) for e in events)
    assert (await client.ok("GET", "/api/webhooks/history?limit=20"))["deliveries"] == []

    # a signed delivery shows up in the history
    external_id = (await client.ok("GET", f"/api/cloud/jobs/{job['job_id']}"))["job"]["external_id"]
    body = json.dumps({"id": external_id, "status": "processing"}).encode()
    stamp = int(env.daemon.ctx.now())
    headers = {"webhook-id": "msg_1", "webhook-timestamp": str(stamp),
               "webhook-signature": ws.sign(ws.decode_secret(env.fake.state.webhook_secret), "msg_1",
                                            stamp, body),
               "content-type": "application/json"}
    delivered = await treq.post(env.daemon.url + "/api/webhooks/replicate", data=body, headers=headers)
    assert delivered.code == 200, await delivered.text()
    history = (await client.ok("GET", "/api/webhooks/history?limit=20"))["deliveries"]
    assert len(history) == 1
    expect(history[0], timestamp="iso", webhook_id="int", event_type="str", success="bool")
    assert history[0]["success"] is True and history[0]["job_id"] == job["job_id"]
    assert (await client.ok("GET", "/api/webhooks/1/history?limit=20"))["deliveries"] == history
    assert is_iso((await client.ok("GET", "/api/webhooks/1"))["last_triggered"])

    # webhooks create/update/delete/test: refused with a detail the CLI prints
    status, detail = await client.error("POST", "/api/webhooks", {"name": "x", "url": "https://x.test",
                                                                 "enabled": True})
    assert status == 409 and "does not send" in detail
    for method, path, data in (("PATCH", "/api/webhooks/1", {"name": "y"}),
                               ("DELETE", "/api/webhooks/1", None),
                               ("POST", "/api/webhooks/1/test", {"event_type": "test"})):
        status, detail = await client.error(method, path, data)
        assert status == 409


# -- simpletuner jobs logs <id> --follow (SSE) -------------------------------------------------

async def follow_running_job(env, logs):
    """A running job with ``logs`` and ``jobs logs --follow`` on it, once its stream is open
    and has sent the first poll: ``(client, surface, job, external_id, follower, following)``."""
    client = cli(env.daemon)
    surface = next(s for s in env.daemon.service.root.surfaces if isinstance(s, JobLogsSurface))
    surface.poll_interval = 0.05
    response, job = await env.submit()
    external_id = (await client.ok("GET", f"/api/cloud/jobs/{job['job_id']}"))["job"]["external_id"]
    env.fake.state.set_status(external_id, "processing", logs=logs)
    following = defer.ensureDeferred(client.follow(f"/api/cloud/jobs/{job['job_id']}/logs/stream"))
    for _ in range(200):
        followers = list(surface.followers)
        if followers and followers[0].sent_chars:
            return client, surface, job, external_id, followers[0], following
        await task.deferLater(reactor, 0.025, lambda: None)
    raise AssertionError("the log stream did not open")


@pytest_twisted.ensureDeferred
async def test_jobs_logs_follow(env):
    client, surface, job, external_id, follower, following = await follow_running_job(
        env, "step 1\nstep 2\nhalf a li")
    assert follower.sent_chars == len("step 1\nstep 2\nhalf a li") and follower.pending == "half a li"
    env.fake.state.set_status(external_id, "succeeded", logs="step 1\nstep 2\nhalf a line\nstep 3\n",
                              predict_time=10.0)
    await client.ok("GET", "/api/cloud/jobs?limit=20&sync_active=true")
    printed, final = await following
    assert printed == ["step 1", "step 2", "half a line", "step 3"]
    assert final == "completed"
    assert surface.followers == set()

    # A finished job: its logs at once, then done.
    printed, final = await client.follow(f"/api/cloud/jobs/{job['job_id']}/logs/stream")
    assert printed == ["step 1", "step 2", "half a line", "step 3"] and final == "completed"
    status, detail = await client.error("GET", "/api/cloud/jobs/nope/logs/stream")
    assert status == 404


# -- simpletuner cloud jobs submit / retry, simpletuner jobs retry (named configs) ---------------

SUBMIT_FIELDS = dict(success="bool", job_id="str", status="str", idempotent_hit="bool",
                     cost_limit_warning="str?", quota_warnings="list")


@pytest_twisted.ensureDeferred
async def test_submit_and_retry_from_a_named_config(env):
    client = cli(env.daemon)
    await client.ok("PUT", "/api/configs/my-config",
                    {"config": {"model_family": "flux", "max_train_steps": 100, "learning_rate": 1e-4},
                     "dataloader_config": [{"id": "ds", "type": "local"}]})

    # cloud jobs submit my-config --dry-run: the config's fields, the token check, the hardware
    config = (await client.ok("GET", "/api/configs/my-config"))["config"]
    assert config["max_train_steps"] == 100
    validated = await client.ok("GET", "/api/cloud/replicate/validate")
    assert validated["valid"] is True
    hardware = (await client.ok("GET", "/api/cloud/providers/replicate/config"))["config"]["hardware_info"]
    assert "h100-x2" in hardware

    # cloud jobs submit my-config --hardware-profile h100-x2 --idempotency-key k1
    body = {"config_name_to_load": "my-config", "idempotency_key": "k1", "hardware_profile": "h100-x2"}
    first = await client.ok("POST", "/api/cloud/jobs/submit?provider=replicate", body)
    expect(first, **SUBMIT_FIELDS)
    assert first["success"] is True and first["idempotent_hit"] is False
    again = await client.ok("POST", "/api/cloud/jobs/submit?provider=replicate", body)
    assert again["job_id"] == first["job_id"] and again["idempotent_hit"] is True
    assert (await client.ok("POST", f"/api/cloud/jobs/{first['job_id']}/cancel"))["success"] is True

    # cloud jobs retry <id>: GET the job (config_name, provider), submit config_name_to_load
    job = (await client.ok("GET", f"/api/cloud/jobs/{first['job_id']}"))["job"]
    assert job["config_name"] == "my-config" and job["status"] == "cancelled"
    retried = await client.ok("POST", f"/api/cloud/jobs/submit?provider={job['provider']}",
                              {"config_name_to_load": job["config_name"]})
    expect(retried, **SUBMIT_FIELDS)
    assert retried["job_id"] != first["job_id"]

    # jobs retry <id>: POST /api/cloud/jobs/{id}/retry (same profile, the config as stored now)
    again = await client.ok("POST", f"/api/cloud/jobs/{first['job_id']}/retry")
    expect(again, **SUBMIT_FIELDS)
    assert again["success"] is True and again["retried_from"] == first["job_id"]
    assert again["job"]["hardware_profile"] == "h100-x2" and again["job"]["config_name"] == "my-config"
    sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
    assert json.loads(sent.body["input"]["config_json"])["max_train_steps"] == 100
    status, detail = await client.error("POST", f"/api/cloud/jobs/{again['job_id']}/retry")
    assert status == 409 and "only failed or cancelled" in detail
    response, inline = await env.submit(config_name=None)
    await client.ok("POST", f"/api/cloud/jobs/{inline['job_id']}/cancel")
    status, detail = await client.error("POST", f"/api/cloud/jobs/{inline['job_id']}/retry")
    assert status == 409 and "inline config" in detail
    status, detail = await client.error("POST", "/api/cloud/jobs/nope/retry")
    assert status == 404


@pytest_twisted.ensureDeferred
async def test_an_open_log_stream_ends_when_the_daemon_stops(env):
    client, surface, job, external_id, follower, following = await follow_running_job(env, "step 1\n")
    started = reactor.seconds()
    await env.daemon.service.stopService()
    printed, final = await following
    assert printed == ["step 1"] and final is None   # ended without a done event
    assert surface.followers == set() and reactor.seconds() - started < 5
