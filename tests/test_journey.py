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
from twisted.internet import reactor
from twisted.internet.ssl import Certificate
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, HTTPConnectionPool

from stdaemon.jobs import costs
from tests.fake_replicate import FakeReplicateState
from tests.replicate_env import start_env
from tests.s3_helpers import tls  # noqa: F401  (module-scoped fixture: test CA and a 127.0.0.1 certificate)
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


class Client:
    """treq against the daemon, trusting the test CA when it serves HTTPS."""

    def __init__(self, base, admin_key, ca_path=None):
        self.base = base
        self.admin = {"X-API-Key": admin_key}
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        policy = None
        if ca_path:
            with open(ca_path, "rb") as fh:
                policy = BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(fh.read()))
        self.agent = Agent(reactor, contextFactory=policy, pool=self.pool) if policy else Agent(reactor, pool=self.pool)

    async def request(self, method, path, body=None, headers=None, admin=True):
        hdrs = dict(self.admin) if admin else {}
        hdrs.update(headers or {})
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        response = await treq.request(method, self.base + path, data=data, headers=hdrs, agent=self.agent)
        return response, await response.content()

    async def json(self, method, path, body=None, headers=None, admin=True):
        response, content = await self.request(method, path, body, headers, admin)
        return response, json.loads(content) if content else None


@pytest_twisted.async_yield_fixture(params=["http", "https"])
async def journey_env(request, make_daemon, tmp_path, monkeypatch, tls):  # noqa: F811
    scheme = request.param
    port = free_port()
    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    # The secrets chain reads the process environment (stdaemon/secrets/service.py), as under twistd;
    # it differs from the secret the fake Replicate would hand out, so only this one can verify.
    monkeypatch.setenv("REPLICATE_WEBHOOK_SECRET", secret)
    assert secret != FakeReplicateState.webhook_secret
    server = {"listen": [f"tcp:{port}:interface=127.0.0.1"], "public_url": f"{scheme}://127.0.0.1:{port}"}
    if scheme == "https":  # boto3 then sends aws-chunked bodies with a trailing checksum
        server.update(ssl_cert=tls["cert"], ssl_key=tls["key"])
    # The daemon's public URL is where it really listens, so the trainer's S3 endpoint works as sent.
    env = await start_env(make_daemon, tmp_path, settings={"server": server, "metrics": {"prometheus_enabled": True}})
    env.webhook_secret = secret
    env.ca = tls["ca"] if scheme == "https" else None
    env.client = Client(env.daemon.url, env.daemon.admin_key, env.ca)
    assert env.daemon.url == server["public_url"]
    yield env
    await env.client.pool.closeCachedConnections()
    await env.fake.stop()


@pytest_twisted.ensureDeferred
async def test_operator_journey(journey_env, tmp_path):
    env = journey_env
    client = env.client

    # 1. The operator submits a job with the admin key.
    response, body = await client.json("POST", "/api/cloud/jobs/submit?provider=replicate", {
        "config": {"model_family": "flux", "max_train_steps": 1000},
        "dataloader_config": [{"id": "ds", "type": "local"}],
        "config_name": "journey", "hardware_profile": PROFILE})
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
    prediction_id = (await client.json("GET", f"/api/cloud/jobs/{job_id}"))[1]["job"]["external_id"]

    # 3. The trainer uploads with boto3's default configuration (blocking: in threads).
    s3 = boto3.client("s3", endpoint_url=inputs["s3_endpoint_url"], region_name=inputs["s3_region"],
                      aws_access_key_id=inputs["s3_access_key"], aws_secret_access_key=inputs["s3_secret_key"],
                      verify=env.ca)  # the test CA for HTTPS (no botocore Config: its defaults apply)
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
    response, body = await client.json("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200
    assert body["job"]["upload_progress"] == body["upload_progress"]
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
        response, answer = await client.json("POST", "/api/webhooks/replicate", data, headers, admin=False)
        assert response.code == 200, answer
        reasons.append((answer["reason"], answer["job_status"]))
    assert reasons == [("unchanged", "queued"), ("changed", "running"), ("changed", "completed")]

    # 6. The job completed with the cost of its run on two H100s.
    response, body = await client.json("GET", f"/api/cloud/jobs/{job_id}")
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
    response, listing = await client.request("GET", f"/api/cloud/storage/{bucket}?list-type=2&prefix={prefix}")
    assert response.code == 200, listing
    root = ET.fromstring(listing)
    listed = {item.find(f"{S3_NS}Key").text: int(item.find(f"{S3_NS}Size").text)
              for item in root.iter(f"{S3_NS}Contents")}
    assert listed == {key: len(data) for key, data in uploads.items()}
    for key, data in uploads.items():
        response, content = await client.request("GET", f"/api/cloud/storage/{bucket}/{key}")
        assert response.code == 200
        assert hashlib.sha256(content).hexdigest() == hashlib.sha256(data).hexdigest(), key

    # 9. Prometheus sees one completed job and its cost.
    response, text = await client.request("GET", "/api/cloud/metrics/prometheus", admin=False)
    text = text.decode()
    assert response.code == 200, text
    assert value(text, "simpletuner_jobs_total") == 1
    assert value(text, "simpletuner_jobs_by_status", status="completed") == 1
    assert value(text, "simpletuner_jobs_active") == 0
    assert abs(value(text, "simpletuner_cost_usd_total") - expected_cost) < 1e-9
    # upload_file really went multipart: create + complete (POST), three parts and the small object (PUT).
    object_route = "_/api/cloud/storage/<bucket>/<path:key>"
    assert value(text, "simpletuner_http_requests_total", endpoint="POST" + object_route) == 2
    assert value(text, "simpletuner_http_requests_total", endpoint="PUT" + object_route) >= 4
    # The S3 families count what was stored: the small object and the
    # multipart object (its parts and the completion), byte for byte.
    assert value(text, "simpletuner_s3_upload_bytes_total") >= sum(len(d) for d in uploads.values())
    assert value(text, "simpletuner_s3_uploads_total") >= len(uploads)
    assert value(text, "simpletuner_s3_upload_failures_total") >= 0

    # 10. The audit trail has the submission and the status changes, and its chain verifies.
    response, page = await client.json("GET", "/api/audit?limit=500")
    assert response.code == 200, page
    mine = [e for e in page["entries"] if e["target"] == job_id]
    assert [e["event_type"] for e in mine if e["event_type"] == "job.submitted"] == ["job.submitted"]
    changes = sorted((e["details"]["from"], e["details"]["to"]) for e in mine
                     if e["event_type"] == "job.status_changed")
    assert ("queued", "running") in changes and ("running", "completed") in changes
    completed = [e for e in mine if e["event_type"] == "job.status_changed" and e["action"] == "completed"]
    assert completed[0]["actor"] == "webhook:replicate" and completed[0]["details"]["cost_usd"] == expected_cost
    response, verdict = await client.json("GET", "/api/audit/verify")
    assert response.code == 200 and verdict["valid"] is True, verdict
    assert verdict["checked"] >= len(mine)
