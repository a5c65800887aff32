"""The operator's journey end to end, against a real daemon on 127.0.0.1 and the TLS fake Replicate:
submit → the trainer uploads with boto3 (default config, multipart and a small object) under its job
prefix → upload progress → signed Replicate webhooks (starting, processing, succeeded) → job completed
with the right cost → the job's S3 credentials are refused → the operator still lists and downloads
the outputs byte for byte → Prometheus figures → audit trail and its verification."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timezone

import boto3
import pytest
import pytest_twisted
import treq
from botocore.exceptions import ClientError
from standardwebhooks.webhooks import Webhook
from twisted.internet.threads import deferToThread

from stdaemon.core import costs
from tests.fake_replicate import FakeReplicateState
from tests.replicate_env import start_env
from tests.services import free_port
from tests.test_metrics import value

S3_NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"
BIG = 21 * 1024 * 1024 + 12_345          # above boto3's 8 MiB multipart threshold: three parts
PREDICT_TIME = 1834.25                    # seconds the trainer ran, as Replicate reports it
PROFILE = "h100-x2"


def _signed(secret: str, payload: dict) -> tuple[bytes, dict]:
    data = json.dumps(payload)
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(tz=timezone.utc)
    return data.encode(), {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
                           "webhook-signature": Webhook(secret).sign(msg_id, now, data),
                           "Content-Type": "application/json"}


@pytest_twisted.async_yield_fixture
async def journey_env(make_daemon, tmp_path, monkeypatch):
    port = free_port()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    # The secrets chain reads the process environment (stdaemon/clients/secrets.py), as under twistd;
    # it differs from the secret the fake Replicate would hand out, so only this one can verify.
    monkeypatch.setenv("REPLICATE_WEBHOOK_SECRET", secret)
    assert secret != FakeReplicateState.webhook_secret
    env = await start_env(make_daemon, tmp_path, settings={
        # The daemon's public URL is where it really listens, so the trainer's S3 endpoint works as sent.
        "server": {"listen": [f"tcp:{port}:interface=127.0.0.1"], "public_url": f"http://127.0.0.1:{port}"},
        "metrics": {"prometheus_enabled": True}})
    env.webhook_secret = secret
    yield env
    await env.fake.stop()


@pytest_twisted.ensureDeferred
async def test_operator_journey(journey_env, tmp_path):
    env = journey_env
    admin = {"X-API-Key": env.daemon.admin_key}

    # 1. The operator submits a job with the admin key.
    response, body = await env.submit(hardware_profile=PROFILE)
    assert response.code == 200, body
    job_id = body["job_id"]
    assert body["success"] is True and body["status"] == "queued"

    # 2. Replicate received the prediction with the trainer's S3 inputs.
    sent = env.fake.state.requests_to("POST", "/v1/predictions")
    assert len(sent) == 1
    inputs = sent[0].body["input"]
    assert inputs["job_id"] == job_id
    assert inputs["s3_endpoint_url"] == env.daemon.url + "/api/cloud/storage"
    assert inputs["s3_bucket"] == "outputs" and inputs["s3_base_path"] == f"{job_id}/"
    assert sent[0].body["webhook"] == env.daemon.url + "/api/webhooks/replicate"
    prediction_id = (await env.call("GET", f"/api/cloud/jobs/{job_id}"))[1]["job"]["external_id"]

    # 3. The trainer uploads with boto3's default configuration (blocking: in threads).
    s3 = boto3.client("s3", endpoint_url=inputs["s3_endpoint_url"], region_name=inputs["s3_region"],
                      aws_access_key_id=inputs["s3_access_key"], aws_secret_access_key=inputs["s3_secret_key"])
    bucket, prefix = inputs["s3_bucket"], inputs["s3_base_path"]
    big = tmp_path / "model.safetensors"
    big.write_bytes(os.urandom(BIG))
    small = json.dumps({"step": 1000, "loss": 0.0421}).encode()
    uploads = {prefix + "checkpoint-1000/model.safetensors": big.read_bytes(),
               prefix + "checkpoint-1000/state.json": small}
    await deferToThread(s3.upload_file, str(big), bucket, prefix + "checkpoint-1000/model.safetensors")
    await deferToThread(s3.put_object, Bucket=bucket, Key=prefix + "checkpoint-1000/state.json", Body=small)
    multipart = env.ctx.upload_progress.uploads_total

    # 4. The job shows what arrived.
    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200
    progress = body["upload_progress"]
    assert progress["objects_completed"] == 2, progress
    assert progress["bytes_received"] == BIG + len(small), progress
    assert progress["in_flight"] == []
    assert multipart >= 2

    # 5. Replicate reports the run through signed webhooks.
    reasons = []
    for status, extra in (("starting", {}), ("processing", {}),
                          ("succeeded", {"predict_time": PREDICT_TIME,
                                         "output": [f"{inputs['s3_public_base_url']}/{prefix}checkpoint-1000"]})):
        prediction = env.fake.state.set_status(prediction_id, status, **extra)
        data, headers = _signed(env.webhook_secret, prediction)
        response = await treq.post(env.url("/api/webhooks/replicate"), data=data, headers=headers)
        answer = json.loads(await response.text())
        assert response.code == 200, answer
        reasons.append((answer["reason"], answer["job_status"]))
    assert reasons == [("unchanged", "queued"), ("changed", "running"), ("changed", "completed")]

    # 6. The job completed with the cost of its run on two H100s.
    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    job = body["job"]
    expected_cost = round(PREDICT_TIME * costs.DEFAULT_GPU_PRICES["h100"] * 2, 6)
    assert job["status"] == "completed"
    assert job["cost_usd"] == expected_cost == costs.job_cost(PREDICT_TIME, PROFILE)
    assert job["started_at"] and job["completed_at"] and job["error_message"] is None
    assert job["output_url"].endswith("/checkpoint-1000")

    # 7. The same credentials no longer work.
    with pytest.raises(ClientError) as refused:
        await deferToThread(s3.put_object, Bucket=bucket, Key=prefix + "late.bin", Body=b"late")
    assert refused.value.response["Error"]["Code"] in ("AccessDenied", "InvalidAccessKeyId")

    # 8. The operator lists and downloads the outputs with the admin key, byte for byte.
    response = await treq.get(env.url(f"/api/cloud/storage/{bucket}?list-type=2&prefix={prefix}"), headers=admin)
    listing = await response.content()
    assert response.code == 200, listing
    root = ET.fromstring(listing)
    listed = {item.find(f"{S3_NS}Key").text: int(item.find(f"{S3_NS}Size").text)
              for item in root.iter(f"{S3_NS}Contents")}
    assert listed == {key: len(data) for key, data in uploads.items()}
    for key, data in uploads.items():
        response = await treq.get(env.url(f"/api/cloud/storage/{bucket}/{key}"), headers=admin)
        assert response.code == 200
        assert hashlib.sha256(await response.content()).hexdigest() == hashlib.sha256(data).hexdigest(), key

    # 9. Prometheus sees one completed job and its cost.
    response = await treq.get(env.url("/api/cloud/metrics/prometheus"))
    text = (await response.content()).decode()
    assert response.code == 200, text
    assert value(text, "simpletuner_jobs_total") == 1
    assert value(text, "simpletuner_jobs_by_status", status="completed") == 1
    assert value(text, "simpletuner_jobs_active") == 0
    assert abs(value(text, "simpletuner_cost_usd_total") - expected_cost) < 1e-9
    # upload_file really went multipart: create + complete (POST), three parts and the small object (PUT).
    object_route = "_/api/cloud/storage/<bucket>/<path:key>"
    assert value(text, "simpletuner_http_requests_total", endpoint="POST" + object_route) == 2
    assert value(text, "simpletuner_http_requests_total", endpoint="PUT" + object_route) >= 4

    # 10. The audit trail has the submission and the status changes, and its chain verifies.
    response = await treq.get(env.url("/api/audit?limit=500"), headers=admin)
    page = json.loads(await response.text())
    assert response.code == 200, page
    mine = [e for e in page["entries"] if e["target"] == job_id]
    assert [e["event_type"] for e in mine if e["event_type"] == "job.submitted"] == ["job.submitted"]
    changes = sorted((e["details"]["from"], e["details"]["to"]) for e in mine
                     if e["event_type"] == "job.status_changed")
    assert ("queued", "running") in changes and ("running", "completed") in changes
    completed = [e for e in mine if e["event_type"] == "job.status_changed" and e["action"] == "completed"]
    assert completed[0]["actor"] == "webhook:replicate" and completed[0]["details"]["cost_usd"] == expected_cost
    response = await treq.get(env.url("/api/audit/verify"), headers=admin)
    verdict = json.loads(await response.text())
    assert response.code == 200 and verdict["valid"] is True, verdict
    assert verdict["checked"] >= len(mine)
