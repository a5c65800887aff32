"""Jobs on Replicate end to end: a real daemon port, the TLS fake, tinyproxy."""

from __future__ import annotations

import inspect
import json

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from stdaemon.jobs import store
from tests.replicate_env import PUBLIC_URL, audit_events, start_env
from tests.tinyproxy_fixture import tinyproxy  # noqa: F401 (fixture)


async def job_row(env, job_id):
    return await env.ctx.db.run_read(store.get_job, job_id)


async def credentials_live(env, access_key):
    """Whether the upload credential store still accepts ``access_key``."""
    cred = env.ctx.upload_credentials.lookup(access_key)
    if inspect.isawaitable(cred):
        cred = await cred
    if cred is None:
        return False
    if isinstance(cred, tuple):  # (job_id, secret) from the in-memory stand-in
        return True
    return cred.active(env.ctx.now())


@pytest_twisted.ensureDeferred
async def test_submit_creates_prediction_with_upload_target(env):
    response, body = await env.submit(hardware_profile="h100-x2",
                                      headers={"X-Correlation-ID": "submit-corr-0001"})
    assert response.code == 200, body
    assert body["success"] is True and body["status"] == "queued"
    assert body["idempotent_hit"] is False and body["error"] is None
    assert body["cost_limit_warning"] is None and body["quota_warnings"] == []
    job_id = body["job_id"]

    sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
    assert sent.headers["authorization"] == f"Bearer {env.fake.state.token}"
    assert sent.headers["user-agent"].startswith("stdaemon/")
    assert sent.headers["x-correlation-id"] == "submit-corr-0001"  # carried to the provider call
    assert sent.body["version"] == "ver-h100x2"
    assert sent.body["webhook"] == f"{PUBLIC_URL}/api/webhooks/replicate"
    assert set(sent.body["webhook_events_filter"]) >= {"start", "completed"}
    inputs = sent.body["input"]
    assert json.loads(inputs["config_json"]) == {"model_family": "flux", "max_train_steps": 10}
    assert json.loads(inputs["dataloader_json"]) == [{"id": "ds", "type": "local"}]
    assert inputs["s3_endpoint_url"] == f"{PUBLIC_URL}/api/cloud/storage"
    assert inputs["s3_bucket"] and inputs["s3_region"]
    assert job_id in inputs["s3_base_path"]
    assert inputs["s3_access_key"] and inputs["s3_secret_key"]
    assert await credentials_live(env, inputs["s3_access_key"])

    row = await job_row(env, job_id)
    assert row["status"] == "queued"
    assert row["external_id"] in env.fake.state.predictions
    assert row["hardware_type"] == "h100-x2" and row["config_name"] == "test-config"
    assert inputs["s3_secret_key"] not in json.dumps(row)

    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200
    assert body["job"]["status"] == "queued"
    assert body["upload_progress"]["bytes_received"] == 0
    assert inputs["s3_secret_key"] not in json.dumps(body)


@pytest_twisted.ensureDeferred
async def test_cli_paths_and_error_bodies(env):
    # SimpleTuner's CLI: POST /api/cloud/jobs/submit?provider=… with config_name_to_load.
    # A name that was never saved with PUT /api/configs/{name}: 404 naming it.
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                    {"config_name_to_load": "only-a-name"})
    assert response.code == 404
    assert body["error"] == "config_not_found" and "only-a-name" in body["detail"]
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate", {})
    assert response.code == 400
    assert body["error"] == "invalid_field" and body["detail"].startswith("config:")
    response, body = await env.call("POST", "/api/cloud/jobs", {"config": {}, "hardware_profile": "tpu"})
    assert response.code == 400 and body["field"] == "hardware_profile"
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=nope", {"config": {}})
    assert response.code == 404 and "detail" in body
    response, body = await env.call("POST", "/api/cloud/jobs", b"{not json")
    assert response.code == 400 and body["error"] == "invalid_json"
    response, body = await env.call("GET", "/api/cloud/jobs?limit=501")
    assert response.code == 400 and "detail" in body
    response, body = await env.call("GET", "/api/cloud/jobs?status=exploded")
    assert response.code == 400
    response, body = await env.call("GET", "/api/cloud/jobs?provider=runpod")
    assert response.code == 400 and "provider" in body["detail"]
    assert env.fake.state.requests_to("POST", "/v1/predictions") == []


@pytest_twisted.ensureDeferred
async def test_submission_without_configuration_is_a_clear_error(make_daemon, tmp_path):
    environment = await start_env(make_daemon, tmp_path, provider_settings={"model_versions": None},
                                  settings={"server": {"public_url": ""}})
    try:
        response, body = await environment.submit()
        assert response.code == 400
        assert body["error"] == "provider_not_configured"
        assert "public_url" in body["detail"]
        assert "model_versions" not in body["detail"]  # versions are resolved from Replicate
        _, listing = await environment.call("GET", "/api/cloud/jobs")
        assert listing["total"] == 0
    finally:
        await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_provider_error_is_502_with_its_message_and_nothing_half_created(env):
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate",
                                 {"model_versions": {"default": "forbidden-version"}})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code == 502
    assert body["error"] == "provider_error"
    assert "You do not have permission to use this model version" in body["detail"]
    assert body["success"] is False and body["job_status"] == "failed"
    row = await job_row(env, body["job_id"])
    assert row["status"] == "failed"
    assert "You do not have permission" in row["error_message"]
    sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
    assert not await credentials_live(env, sent.body["input"]["s3_access_key"])


@pytest_twisted.ensureDeferred
async def test_put_settings_apply_to_the_very_next_call(env, tinyproxy):
    port = env.fake.port.getHost().port
    # CA bundle removed through the API: the next submission fails with a TLS error.
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate", {"ssl_ca_bundle": ""})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code == 502 and body["error"] == "provider_unavailable"
    assert "certificate verify failed" in body["detail"]
    row = await job_row(env, body["job_id"])
    assert row["status"] == "failed" and "certificate verify failed" in row["error_message"]

    # Proxy and CA bundle set through the API: the next call tunnels through tinyproxy and works.
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate",
                                 {"ssl_ca_bundle": env.bundle, "proxy_url": tinyproxy.url})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code == 200, body
    assert f"CONNECT 127.0.0.1:{port} HTTP/1.1" in tinyproxy.log_text()

    # A short http_timeout set through the API bounds the next call.
    env.fake.state.mode = "stall"
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate", {"http_timeout": 0.5})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code == 502 and "http_timeout" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_through_tinyproxy_only_with_ca_bundle(make_daemon, tmp_path, tinyproxy):
    environment = await start_env(make_daemon, tmp_path,
                                  provider_settings={"proxy_url": tinyproxy.url, "ssl_ca_bundle": None})
    try:
        response, body = await environment.submit()
        assert response.code == 502
        assert "TLS handshake" in body["detail"] and "ssl_ca_bundle" in body["detail"]
        assert environment.fake.state.requests == []
        await environment.call("PUT", "/api/cloud/providers/replicate", {"ssl_ca_bundle": environment.bundle})
        response, body = await environment.submit()
        assert response.code == 200 and body["status"] == "queued"
        port = environment.fake.port.getHost().port
        assert tinyproxy.log_text().count(f"CONNECT 127.0.0.1:{port} HTTP/1.1") == 2
    finally:
        await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_five_concurrent_identical_submits_make_one_job(env):
    results = await defer.gatherResults([
        defer.ensureDeferred(env.submit(idempotency_key="same-key")) for _ in range(5)])
    job_ids = {body["job_id"] for _response, body in results}
    assert len(job_ids) == 1
    assert all(response.code == 200 for response, _ in results)
    assert sum(1 for _r, body in results if body["idempotent_hit"]) == 4
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == 1
    _, listing = await env.call("GET", "/api/cloud/jobs")
    assert listing["total"] == 1
    # Another key is another job.
    _, other = await env.submit(idempotency_key="other-key")
    assert other["job_id"] not in job_ids


@pytest_twisted.ensureDeferred
async def test_idempotency_key_expires_after_24_hours(env):
    _, first = await env.submit(idempotency_key="daily")
    await env.ctx.db.run_write(lambda conn: conn.execute(
        "UPDATE jobs SET created_at = ? WHERE job_id = ?", (env.ctx.now() - 25 * 3600, first["job_id"])))
    _, second = await env.submit(idempotency_key="daily")
    assert second["job_id"] != first["job_id"] and second["idempotent_hit"] is False


@pytest_twisted.ensureDeferred
async def test_cost_limits_warn_and_block(env):
    now = env.ctx.now()
    await env.ctx.db.run_write(store.insert_job, {
        "job_id": "old-expensive", "provider": "replicate", "status": "completed", "created_at": now - 60,
        "completed_at": now - 30, "cost_usd": 9.0, "hardware_type": "h100", "metadata": {}})
    await env.call("PUT", "/api/cloud/providers/replicate",
                   {"cost_limit_enabled": True, "cost_limit_amount": 10, "cost_limit_action": "warn",
                    "cost_limit_period": "daily", "max_runtime_minutes": 1})
    response, body = await env.submit()
    assert response.code == 200 and body["success"]
    assert "90%" in body["cost_limit_warning"]

    await env.call("PUT", "/api/cloud/providers/replicate", {"cost_limit_action": "block",
                                                             "cost_limit_amount": 9})
    before = len(env.fake.state.requests_to("POST", "/v1/predictions"))
    response, body = await env.submit()
    assert response.code == 403 and body["error"] == "cost_limit_exceeded"
    assert "reached" in body["detail"]
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == before


@pytest_twisted.ensureDeferred
async def test_breaker_opens_after_five_failures_and_answers_503_with_retry_after(env):
    env.fake.state.mode = "fail"
    for _ in range(5):
        response, body = await env.submit()
        assert response.code == 502, body
    assert len(env.fake.state.requests) == 5
    _, listing = await env.call("GET", "/api/cloud/jobs")
    jobs_before = listing["total"]
    response, body = await env.submit()
    assert response.code == 503 and body["error"] == "circuit_open"
    assert int(response.headers.getRawHeaders("Retry-After")[0]) > 0
    assert len(env.fake.state.requests) == 5  # failed fast
    _, listing = await env.call("GET", "/api/cloud/jobs")
    assert listing["total"] == jobs_before  # nothing created for the rejected submission
    _, health = await env.call("GET", "/api/cloud/health")
    breaker = [c for c in health["components"] if c["name"] == "circuit_breaker:replicate"][0]
    assert breaker["status"] == "degraded" and "open" in breaker["message"]


@pytest_twisted.ensureDeferred
async def test_cancel_delete_and_logs(env):
    _, body = await env.submit()
    job_id = body["job_id"]
    row = await job_row(env, job_id)
    access_key = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]["s3_access_key"]
    env.fake.state.set_status(row["external_id"], "processing", logs="epoch 1\nepoch 2\n")

    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}/logs")
    assert response.code == 200 and body["logs"] == "epoch 1\nepoch 2\n"

    response, body = await env.call("DELETE", f"/api/cloud/jobs/{job_id}")
    assert response.code == 409  # active jobs cannot be deleted

    response, body = await env.call("POST", f"/api/cloud/jobs/{job_id}/cancel")
    assert response.code == 200 and body["success"] is True
    assert env.fake.state.predictions[row["external_id"]]["status"] == "canceled"
    assert (await job_row(env, job_id))["status"] == "cancelled"
    assert not await credentials_live(env, access_key)

    response, body = await env.call("POST", f"/api/cloud/jobs/{job_id}/cancel")
    assert response.code == 409 and "detail" in body
    assert [e["target"] for e in audit_events(env, "job.submitted")] == [job_id]
    assert [e["target"] for e in audit_events(env, "job.cancelled")] == [job_id]

    assert env.ctx.jobs.metrics()["by_status"]["cancelled"] == 1
    response, body = await env.call("DELETE", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200 and body["success"] is True
    figures = env.ctx.jobs.metrics()
    assert figures["by_status"]["cancelled"] == 0 and figures["jobs_total"] == 1  # a counter never drops
    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 404 and body["error"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_cancel_when_replicate_says_404_counts_as_done(env):
    _, body = await env.submit()
    row = await job_row(env, body["job_id"])
    del env.fake.state.predictions[row["external_id"]]
    response, body = await env.call("POST", f"/api/cloud/jobs/{row['job_id']}/cancel")
    assert response.code == 200
    assert (await job_row(env, row["job_id"]))["status"] == "cancelled"


@pytest_twisted.ensureDeferred
async def test_list_filters_and_real_total(env):
    now = env.ctx.now()
    for i in range(7):
        await env.ctx.db.run_write(store.insert_job, {
            "job_id": f"seed{i}", "provider": "replicate", "status": "completed" if i % 2 else "failed",
            "created_at": now - i, "cost_usd": 0.0, "metadata": {}})
    response, body = await env.call("GET", "/api/cloud/jobs?status=completed&limit=2")
    assert response.code == 200
    assert body["total"] == 3 and len(body["jobs"]) == 2
    assert all(job["status"] == "completed" for job in body["jobs"])
    _, page = await env.call("GET", "/api/cloud/jobs?status=completed&limit=2&offset=2")
    assert len(page["jobs"]) == 1
    _, everything = await env.call("GET", "/api/cloud/jobs?provider=replicate&limit=500")
    assert everything["total"] == 7


@pytest_twisted.ensureDeferred
async def test_poller_on_the_injected_clock_refreshes_active_jobs(make_daemon, tmp_path):
    clock = Clock()
    clock.advance(1_800_000_000)
    environment = await start_env(make_daemon, tmp_path, clock=clock)
    try:
        _, body = await environment.submit(hardware_profile="h100-x2")
        job_id = body["job_id"]
        row = await job_row(environment, job_id)
        environment.fake.state.set_status(row["external_id"], "succeeded", predict_time=1000.0,
                                          output=["https://replicate.delivery/out/model.safetensors"])
        timer = environment.ctx.jobs.timer
        assert timer.interval == 30
        clock.advance(29)
        assert (await job_row(environment, job_id))["status"] == "queued"
        clock.advance(1)
        if timer._running_call is not None:
            await timer._running_call
        row = await job_row(environment, job_id)
        assert row["status"] == "completed"
        assert row["cost_usd"] == round(1000 * 0.001525 * 2, 6)
        access_key = environment.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]["s3_access_key"]
        assert not await credentials_live(environment, access_key)  # revoked at the terminal status
        assert row["output_url"] == "https://replicate.delivery/out/model.safetensors"
        # Running totals for metrics follow every change and match a fresh count.
        figures = environment.ctx.jobs.metrics()
        assert figures["by_status"]["completed"] == 1 and figures["active"] == 0
        assert figures["cost_usd_total"] == row["cost_usd"]
        await environment.ctx.jobs.load()
        assert environment.ctx.jobs.metrics()["by_status"] == figures["by_status"]
        assert environment.ctx.jobs.metrics()["cost_usd_total"] == figures["cost_usd_total"]
        # A late, out-of-order update from the provider does not reopen it.
        result = await environment.ctx.jobs.apply_prediction(
            {"id": row["external_id"], "status": "processing"}, source="webhook")
        assert not result.accepted and result.reason == "terminal"
        assert (await job_row(environment, job_id))["status"] == "completed"
    finally:
        await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_approval_rule_holds_the_job_until_approved(env):
    response, rule = await env.call("POST", "/api/approvals/rules",
                                    {"name": "big gpus", "condition": "hardware_profile", "value": "h100-x8"})
    assert response.code in (200, 201), rule
    response, body = await env.submit(hardware_profile="h100-x8")
    assert response.code == 200 and body["status"] == "pending_approval"
    assert env.fake.state.requests_to("POST", "/v1/predictions") == []
    _, pending = await env.call("GET", "/api/approvals?status=pending")
    items = pending.get("requests") or pending.get("approvals") or pending.get("items") or []
    request_id = [r for r in items if r["job_id"] == body["job_id"]][0]["id"]
    response, _ = await env.call("POST", f"/api/approvals/{request_id}/approve", {"reason": "ok"})
    assert response.code == 200
    row = await job_row(env, body["job_id"])
    assert row["status"] == "queued" and row["external_id"]
    sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
    assert sent.body["version"] == "ver-default"
    assert json.loads(sent.body["input"]["config_json"])["model_family"] == "flux"
    assert "request" not in row["metadata"], list(row["metadata"])


@pytest_twisted.ensureDeferred
async def test_breaker_thresholds_from_settings_and_real_cool_down(env):
    from twisted.internet import reactor, task

    response, _ = await env.call("PUT", "/api/cloud/providers/replicate",
                                 {"breaker_failure_threshold": 2, "breaker_recovery_timeout": 0.3})
    assert response.code == 200
    env.fake.state.mode = "fail"
    for _ in range(2):
        response, _ = await env.submit()
        assert response.code == 502
    response, body = await env.submit()
    assert response.code == 503 and response.headers.getRawHeaders("Retry-After") == ["1"]
    await task.deferLater(reactor, 0.4)
    assert env.ctx.breakers.get("replicate").state == "half_open"
    env.fake.state.mode = "ok"
    for _ in range(2):
        response, body = await env.submit()
        assert response.code == 200, body
    assert env.ctx.breakers.get("replicate").state == "closed"
    response, body = await env.call("PUT", "/api/cloud/providers/replicate",
                                    {"breaker_success_threshold": 3, "breaker_half_open_max_calls": 2})
    assert response.code == 400 and body["field"] == "breaker_success_threshold"


@pytest_twisted.ensureDeferred
async def test_upload_with_the_issued_credentials_shows_in_upload_progress(env):
    from twisted.internet import threads

    boto3 = pytest.importorskip("boto3")
    from botocore.config import Config as BotoConfig

    _, body = await env.submit()
    job_id = body["job_id"]
    inputs = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]
    endpoint = env.url("/api/cloud/storage")  # the trainer would use s3_endpoint_url (public URL)

    def upload():
        client = boto3.client("s3", endpoint_url=endpoint, region_name=inputs["s3_region"],
                              aws_access_key_id=inputs["s3_access_key"],
                              aws_secret_access_key=inputs["s3_secret_key"],
                              config=BotoConfig(s3={"addressing_style": "path"}))
        client.put_object(Bucket=inputs["s3_bucket"], Key=inputs["s3_base_path"] + "model.safetensors",
                          Body=b"x" * 4096)

    await threads.deferToThread(upload)
    response, job = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200
    assert job["upload_progress"]["objects_completed"] == 1
    assert job["upload_progress"]["bytes_received"] == 4096
