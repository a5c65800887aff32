"""Small truths of issue 13 point 8 on a real daemon: the disk component measures the
configured output path, server.max_body_bytes bounds every JSON body (submissions have
their own key), and start-up 503s are not logged as errors."""

from __future__ import annotations

import json
import os

import pytest_twisted
import treq
from twisted.logger import globalLogPublisher

from tests.authhelpers import call


@pytest_twisted.ensureDeferred
async def test_disk_component_measures_the_configured_output_path(make_daemon, tmp_path):
    outputs = tmp_path / "elsewhere" / "outputs"
    daemon = await make_daemon(settings={"providers": {"replicate": {"s3_output_path": str(outputs)}}})
    response, body = await call(daemon, "GET", "/api/cloud/health")
    disk = [c for c in body["components"] if c["name"] == "disk"][0]
    assert str(outputs) in disk["message"], disk
    assert daemon.ctx.outputs_dir() not in disk["message"]
    # Changed through the API: the next check follows it.
    other = tmp_path / "third"
    other.mkdir()
    response, _ = await call(daemon, "PUT", "/api/cloud/providers/replicate",
                             {"s3_output_path": str(other)}, key=daemon.admin_key)
    assert response.code == 200
    _, body = await call(daemon, "GET", "/api/cloud/health")
    disk = [c for c in body["components"] if c["name"] == "disk"][0]
    stats = os.statvfs(other)
    assert f"{stats.f_bavail * stats.f_frsize / 1024 ** 3:.1f} GiB free for outputs at {other}" == disk["message"]


async def post_raw(daemon, path, size, key=None, extra=None):
    body = dict(extra or {})
    body["pad"] = "x" * size
    raw = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key:
        headers["X-API-Key"] = key
    response = await treq.request("PUT" if path.startswith("/api/configs") else "POST",
                                  daemon.url + path, data=raw, headers=headers)
    await response.content()
    return response.code


@pytest_twisted.ensureDeferred
async def test_max_body_bytes_bounds_every_json_body_and_submissions_have_their_own_key(make_daemon):
    daemon = await make_daemon(settings={"server": {"max_body_bytes": 4096},
                                         "jobs": {"max_submit_bytes": 20000}})
    key = daemon.admin_key
    # Routes with a larger cap of their own (webhooks: 1 MiB) are lowered to the server's.
    assert await post_raw(daemon, "/api/webhooks/replicate", 6000) == 413
    assert await post_raw(daemon, "/api/configs/x", 6000, key) == 413
    assert await post_raw(daemon, "/api/users", 6000, key) == 413
    assert await post_raw(daemon, "/api/configs/x", 1000, key) == 400  # read, then refused as invalid
    # Submissions: jobs.max_submit_bytes, above and below the server cap.
    assert await post_raw(daemon, "/api/cloud/jobs/submit", 15000, key) != 413
    assert await post_raw(daemon, "/api/cloud/jobs", 15000, key) != 413
    assert await post_raw(daemon, "/api/cloud/jobs/submit", 25000, key) == 413


@pytest_twisted.ensureDeferred
async def test_readiness_503_during_start_up_is_not_an_error_line(daemon):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        daemon.ctx.health.phase = "starting"
        response, body = await call(daemon, "GET", "/api/cloud/health/ready")
        assert response.code == 503 and body["reason"] == "starting"
        daemon.ctx.health.phase = "ready"
        response, _ = await call(daemon, "GET", "/api/cloud/health/ready")
        assert response.code == 200
    finally:
        daemon.ctx.health.phase = "ready"
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_namespace") == "stdaemon.http"
             and "/api/cloud/health/ready" in str(e.get("path", ""))]
    assert lines, "the request line is still logged"
    assert {e["log_level"].name for e in lines} <= {"debug", "info"}
