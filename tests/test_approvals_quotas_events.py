"""Approval rules, quotas and the SSE event stream (S4), end to end against the TLS fake."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor, task
from twisted.internet.task import Clock

from stdaemon.approvals import rules as core
from stdaemon.events.service import EventBus, can_see_job
from stdaemon.jobs import store as jobs_store
from stdaemon.users.api_keys import Principal
from stdaemon.invalid import InvalidValue
from tests.authhelpers import create_user, user_key
from tests.postgres_fixture import engine_settings
from tests.replicate_env import start_env


@pytest_twisted.async_yield_fixture(params=["sqlite", "postgresql"])
async def env(request, make_daemon, tmp_path):
    """The daemon wired to the fake Replicate, on each engine in turn."""
    environment = await start_env(make_daemon, tmp_path, settings=engine_settings(request, request.param))
    yield environment
    await environment.fake.stop()


# -- pure ----------------------------------------------------------------------------

def test_rule_validation_and_matching():
    assert core.validate_rule({"name": "big", "condition": "cost_exceeds", "value": 5}) == \
        ("big", "cost_exceeds", 5.0)
    assert core.validate_rule({"name": "x8", "condition": "hardware_profile", "value": ["h100-x8"]})[2] == \
        ["h100-x8"]
    for bad, field in (({"name": "", "condition": "cost_exceeds", "value": 1}, "name"),
                       ({"name": "a", "condition": "always", "value": 1}, "condition"),
                       ({"name": "a", "condition": "cost_exceeds", "value": -1}, "value"),
                       ({"name": "a", "condition": "cost_exceeds", "value": True}, "value"),
                       ({"name": "a", "condition": "hardware_profile", "value": "a100"}, "value"),
                       ({"name": "a", "condition": "cost_exceeds", "value": 1, "x": 1}, "x")):
        with pytest.raises(InvalidValue) as info:
            core.validate_rule(bad)
        assert info.value.field == field
    rules = [core.Rule(2, "x8", "hardware_profile", ["h100-x8"]), core.Rule(1, "cost", "cost_exceeds", 50.0)]
    assert core.first_match(rules, "h100", 10.0) is None
    assert core.first_match(rules, "h100-x8", 100.0).name == "cost"  # lowest id first
    assert core.first_match(rules, "h100-x8", 1.0).name == "x8"


def test_estimate_uses_runtime_price_and_gpus():
    # 120 minutes default × 0.001525 $/s × 2 GPUs
    assert core.estimate_usd({}, "h100-x2") == pytest.approx(120 * 60 * 0.001525 * 2)
    assert core.estimate_usd({"max_runtime_minutes": 10}, "l40s") == pytest.approx(600 * 0.000975)
    with pytest.raises(InvalidValue):
        core.estimate_usd({"max_runtime_minutes": -5}, "h100")
    with pytest.raises(InvalidValue):
        core.estimate_usd({}, "tpu")


def test_quota_evaluation_block_warn_and_scope():
    quotas = [core.Quota(1, "concurrent_jobs", 2, "block", role="operator"),
              core.Quota(2, "daily_cost_usd", 10, "warn"),
              core.Quota(3, "monthly_cost_usd", 1, "block", user_id=99)]
    usage = core.Usage(concurrent_jobs=1, daily_cost_usd=9.5, monthly_cost_usd=50)
    result = core.evaluate_quotas(quotas, 7, "operator", usage, estimate=1.0)
    assert result.allowed and any("daily_cost_usd" in w for w in result.warnings)
    assert any("nearly reached" in w for w in result.warnings)  # 2 of 2 active is ≥ 80 %
    result = core.evaluate_quotas(quotas, 7, "operator", core.Usage(concurrent_jobs=2), 0.0)
    assert not result.allowed and "concurrent_jobs" in result.detail
    assert core.evaluate_quotas(quotas, 7, "viewer", core.Usage(concurrent_jobs=5), 0.0).allowed
    assert not core.evaluate_quotas(quotas, 99, "viewer", core.Usage(monthly_cost_usd=1), 0.5).allowed
    with pytest.raises(InvalidValue):
        core.validate_quota({"quota_type": "concurrent_jobs", "limit": 1.5, "action": "block"})
    with pytest.raises(InvalidValue):
        core.validate_quota({"quota_type": "daily_cost_usd", "limit": 1, "user_id": 1, "role": "admin"})


def test_event_bus_resume_and_visibility():
    bus = EventBus(Clock(), backlog=3)
    ids = [bus.publish({"job_id": f"j{i}", "status": "queued", "user_id": 1, "metadata": {"x": 1}})
           for i in range(5)]
    assert [e.data["job_id"] for e in bus.since(ids[2])] == ["j3", "j4"]
    assert [e.data["job_id"] for e in bus.since("otherboot-1")] == ["j2", "j3", "j4"]
    assert bus.since(None) == []
    assert "metadata" not in bus.backlog[-1].data
    viewer = Principal(user_id=2, username="v", role="viewer")
    assert can_see_job(viewer, 1) and can_see_job(viewer, 2)   # as in GET /api/cloud/jobs
    assert not can_see_job(None, 1)
    assert can_see_job(Principal(user_id=3, username="o", role="operator"), 1)


# -- end to end ---------------------------------------------------------------------------

async def operator_key(env, name="oscar"):
    user = await create_user(env.daemon, name, "operator")
    return user, await user_key(env.daemon, user["id"], "operator")


@pytest_twisted.ensureDeferred
async def test_cost_rule_holds_submission_until_approved(env):
    response, rule = await env.call("POST", "/api/approvals/rules",
                                    {"name": "expensive", "condition": "cost_exceeds", "value": 1})
    assert response.code == 201, rule
    user, key = await operator_key(env)
    predictions_before = len(env.fake.state.requests_to("POST", "/v1/predictions"))
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 1}, "hardware_profile": "h100"}, key=key)
    assert response.code == 200, body
    assert body["status"] == "pending_approval"
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == predictions_before
    response, listed = await env.call("GET", "/api/approvals?status=pending")
    assert listed["total"] == 1
    request = listed["approvals"][0]
    assert request["job_id"] == body["job_id"] and request["rule_name"] == "expensive"
    assert request["estimate_usd"] == pytest.approx(120 * 60 * 0.001525)
    assert env.ctx.approvals.metrics()["pending"] == 1
    response, _ = await env.call("PUT", "/api/cloud/metrics/config",
                                 {"prometheus_enabled": True, "prometheus_categories": ["approvals"]})
    assert response.code == 200
    response = await treq.get(env.url("/api/cloud/metrics/prometheus"))
    scrape = (await response.content()).decode()
    assert "simpletuner_approval_requests_pending 1.0" in scrape, scrape
    # The submitter (an operator) may approve; a viewer may not.
    viewer = await create_user(env.daemon, "vera", "viewer")
    viewer_key = await user_key(env.daemon, viewer["id"], "viewer")
    response, _ = await env.call("POST", f"/api/approvals/{request['id']}/approve", {}, key=viewer_key)
    assert response.code == 403
    response, decided = await env.call("POST", f"/api/approvals/{request['id']}/approve",
                                       {"reason": "budgeted"}, key=key)
    assert response.code == 200, decided
    assert decided["approval"]["status"] == "approved" and decided["approval"]["job_status"] == "queued"
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == predictions_before + 1
    job = await env.ctx.db.run_read(jobs_store.get_job, body["job_id"])
    assert job["status"] == "queued" and job["external_id"]
    # Decided once only.
    response, again = await env.call("POST", f"/api/approvals/{request['id']}/reject", {}, key=key)
    assert response.code == 409
    assert env.ctx.approvals.metrics()["by_status"]["approved"] == 1
    # Deleting the rule lets the next submission through.
    response, _ = await env.call("DELETE", f"/api/approvals/rules/{rule['id']}")
    assert response.code == 200
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 1}}, key=key)
    assert body["status"] == "queued"


@pytest_twisted.ensureDeferred
async def test_hardware_rule_and_rejection_cancels(env):
    await env.call("POST", "/api/approvals/rules",
                   {"name": "eight gpus", "condition": "hardware_profile", "value": "h100-x8"})
    user, key = await operator_key(env)
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 1}, "hardware_profile": "h100-x8"}, key=key)
    assert body["status"] == "pending_approval"
    response, listed = await env.call("GET", "/api/approvals", key=key)
    request_id = listed["approvals"][0]["id"]
    response, decided = await env.call("POST", f"/api/approvals/{request_id}/reject",
                                       {"reason": "too big"}, key=key)
    assert response.code == 200 and decided["approval"]["status"] == "rejected"
    job = await env.ctx.db.run_read(jobs_store.get_job, body["job_id"])
    assert job["status"] == "cancelled" and "too big" in job["error_message"]
    # A held job cancelled while waiting cannot be approved afterwards.
    response, held = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 2}, "hardware_profile": "h100-x8"}, key=key)
    assert held["status"] == "pending_approval"
    response, _ = await env.call("POST", f"/api/cloud/jobs/{held['job_id']}/cancel", {}, key=key)
    assert response.code == 200
    response, listed = await env.call("GET", "/api/approvals?status=pending", key=key)
    stale = next(a for a in listed["approvals"] if a["job_id"] == held["job_id"])
    predictions = len(env.fake.state.requests_to("POST", "/v1/predictions"))
    response, error = await env.call("POST", f"/api/approvals/{stale['id']}/approve", {}, key=key)
    assert response.code == 409 and error["error"] == "job_not_pending"
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == predictions
    # Bad input.
    response, error = await env.call("POST", "/api/approvals/9999/approve", {})
    assert response.code == 404
    response, error = await env.call("POST", f"/api/approvals/{request_id}/approve", {"reason": 5})
    assert response.code == 400 and error["field"] == "reason"
    response, error = await env.call("GET", "/api/approvals?status=bogus")
    assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_pending_approval_expires_by_the_timer(make_daemon, tmp_path):
    clock = Clock()
    clock.advance(1_700_000_000)
    env = await start_env(make_daemon, tmp_path, clock=clock)
    try:
        await env.call("POST", "/api/approvals/rules",
                       {"name": "all", "condition": "cost_exceeds", "value": 0})
        response, body = await env.submit()
        assert body["status"] == "pending_approval"
        clock.advance(env.ctx.approvals.ttl + 1)
        for _ in range(50):
            clock.advance(60)
            job = await env.ctx.db.run_read(jobs_store.get_job, body["job_id"])
            if job["status"] == "cancelled":
                break
            await task.deferLater(reactor, 0.02, lambda: None)
        assert job["status"] == "cancelled"
        response, listed = await env.call("GET", "/api/approvals?status=expired")
        assert listed["total"] == 1
    finally:
        await env.fake.stop()


@pytest_twisted.ensureDeferred
async def test_quotas_block_and_warn(env):
    user, key = await operator_key(env)
    response, quota = await env.call("POST", "/api/quotas",
                                     {"quota_type": "concurrent_jobs", "limit": 1, "action": "block",
                                      "user_id": user["id"]})
    assert response.code == 201, quota
    response, warn = await env.call("POST", "/api/quotas",
                                    {"quota_type": "daily_cost_usd", "limit": 0, "action": "warn",
                                     "role": "operator"})
    assert response.code == 201
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 1}}, key=key)
    assert response.code == 200 and body["status"] == "queued"
    assert any("daily_cost_usd" in w for w in body["quota_warnings"])
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 1}}, key=key)
    assert response.code == 403 and body["error"] == "quota_exceeded"
    assert "concurrent_jobs" in body["detail"]
    # The admin is not under the user's quota.
    response, body = await env.submit()
    assert response.code == 200
    response, mine = await env.call("GET", "/api/quotas/me", key=key)
    assert mine["usage"]["concurrent_jobs"] == 1 and len(mine["quotas"]) == 2
    # Operators read quotas, only admins change them.
    response, listed = await env.call("GET", "/api/quotas", key=key)
    assert response.code == 200 and listed["total"] == 2
    response, _ = await env.call("DELETE", f"/api/quotas/{quota['id']}", key=key)
    assert response.code == 403
    response, _ = await env.call("DELETE", f"/api/quotas/{quota['id']}")
    assert response.code == 200
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config": {"a": 1}}, key=key)
    assert response.code == 200
    for bad in ({"quota_type": "gpus", "limit": 1}, {"quota_type": "concurrent_jobs", "limit": -1},
                {"quota_type": "concurrent_jobs", "limit": 1, "user_id": 424242}):
        response, error = await env.call("POST", "/api/quotas", bad)
        assert response.code == 400 and "field" in error, bad


# -- SSE ------------------------------------------------------------------------------------

class SSEReader:
    def __init__(self):
        self.buffer = b""
        self.events: list[dict] = []
        self.comments: list[str] = []

    def feed(self, data: bytes) -> None:
        self.buffer += data
        while b"\n\n" in self.buffer:
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            event: dict = {}
            for line in block.decode().splitlines():
                if line.startswith(":"):
                    self.comments.append(line[1:].strip())
                    continue
                name, _, value = line.partition(": ")
                event[name] = value
            if "data" in event:
                event["data"] = json.loads(event["data"])
                self.events.append(event)


async def open_stream(daemon, key, headers=None):
    reader = SSEReader()
    hdrs = {"X-API-Key": key}
    hdrs.update(headers or {})
    response = await treq.get(daemon.url + "/api/events/stream", headers=hdrs, unbuffered=True)
    done = None
    if response.code == 200:
        done = treq.collect(response, reader.feed)
    return response, reader, done


async def until(predicate, rounds=200):
    for _ in range(rounds):
        if predicate():
            return True
        await task.deferLater(reactor, 0.02, lambda: None)
    return predicate()


@pytest_twisted.ensureDeferred
async def test_event_stream_filters_resumes_and_is_bounded(env):
    daemon = env.daemon
    viewer = await create_user(daemon, "vic", "viewer")
    viewer_key = await user_key(daemon, viewer["id"], "viewer")
    response, admin_reader, admin_done = await open_stream(daemon, daemon.admin_key)
    assert response.code == 200
    assert response.headers.getRawHeaders("content-type")[0].startswith("text/event-stream")
    response, viewer_reader, viewer_done = await open_stream(daemon, viewer_key)
    response, body = await env.submit()
    job_id = body["job_id"]
    assert await until(lambda: any(e["data"]["job_id"] == job_id and e["data"]["status"] == "queued"
                                   for e in admin_reader.events))
    assert all("metadata" not in e["data"] for e in admin_reader.events)
    # A viewer sees every job, the admin's included, as GET /api/cloud/jobs does.
    env.ctx.events.publish({"job_id": "own", "status": "running", "user_id": viewer["id"]})
    assert await until(lambda: any(e["data"]["job_id"] == "own" for e in viewer_reader.events))
    assert any(e["data"]["job_id"] == job_id for e in viewer_reader.events)
    # Resume after the first event: only later ones are replayed.
    first_id = admin_reader.events[0]["id"]
    response, resumed, resumed_done = await open_stream(daemon, daemon.admin_key,
                                                        {"Last-Event-ID": first_id})
    expected = [e["id"] for e in admin_reader.events[1:]]
    assert await until(lambda: [e["id"] for e in resumed.events][:len(expected)] == expected)
    # Bounded per user: the admin has 2 open, the limit is 2: the third is refused.
    env.ctx.events.max_per_user = 2
    response, _, _ = await open_stream(daemon, daemon.admin_key)
    assert response.code == 429
    await response.content()
    # Draining closes every stream (the daemon can stop at once).
    env.ctx.events.close_all()
    await admin_done
    await viewer_done
    await resumed_done
    assert env.ctx.events.streams == set()
    # Unauthenticated callers get nothing.
    response = await treq.get(daemon.url + "/api/events/stream")
    assert response.code == 401
    await response.content()


@pytest_twisted.ensureDeferred
async def test_event_stream_heartbeats_on_the_clock(make_daemon):
    clock = Clock()
    daemon = await make_daemon(clock=clock)
    response, reader, done = await open_stream(daemon, daemon.admin_key)
    assert response.code == 200
    assert await until(lambda: "connected" in reader.comments)
    clock.advance(daemon.ctx.events.heartbeat + 0.1)
    assert await until(lambda: "heartbeat" in reader.comments)
    daemon.ctx.events.close_all()
    await done


@pytest_twisted.ensureDeferred
async def test_stopping_the_daemon_ends_open_streams(make_daemon):
    # A stop must not wait for SSE clients: with an hour of shutdown grace,
    # the stop still completes because draining closes the streams.
    daemon = await make_daemon(settings={"server": {"shutdown_timeout": 3600}})
    response, reader, done = await open_stream(daemon, daemon.admin_key)
    assert response.code == 200
    assert await until(lambda: "connected" in reader.comments)
    stopping = daemon.service.stopService()
    stopping.addTimeout(60, reactor)
    await stopping
    await done
    assert daemon.ctx.events.streams == set()
