"""Two stdaemon processes behind a round-robin proxy, sharing one PostgreSQL (jobs, users, audit,
settings), one Redis (events, run-once timers, rate limits) and one S3-compatible store (moto_server,
the job outputs): submissions, webhooks, S3 multipart parts and SSE spread over both; what either
acknowledged is seen from both; ``kill -9`` of one in the middle of an upload loses no acknowledged
part; the audit chain both wrote verifies.

Real services, all on 127.0.0.1 with random ports: Debian's postgresql (tests/postgres_fixture.py),
redis-server (tests/redis_fixture.py), moto_server, and ``twistd stdaemon`` twice.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.parse

import boto3
import pytest_twisted
import treq
from botocore.config import Config as BotoConfig
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.client import Agent, HTTPConnectionPool

from tests.fake_replicate import FakeReplicate
from tests.test_journey import _signed  # the journey's Standard Webhooks signer
from tests.redis_fixture import redis_server  # noqa: F401 (fixture)
from tests.round_robin_proxy import RoundRobinProxy
from tests.secret_stores import MotoServer
from tests.several_instances import BUCKET, Cluster
from tests.test_metrics import value

MIB = 1024 * 1024
STORAGE = "/api/cloud/storage"


class Api:
    """JSON calls with the admin key; a fresh connection per call, so the proxy alternates."""

    def __init__(self, key):
        self.headers = {"X-API-Key": key}
        self.agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    async def call(self, method, url, body=None, headers=None):
        hdrs = dict(self.headers, **(headers or {}))
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        response = await treq.request(method, url, data=data, headers=hdrs, agent=self.agent)
        content = await response.content()
        try:
            return response.code, json.loads(content) if content else None
        except ValueError:
            return response.code, content


class EventReader(threading.Thread):
    """Reads ``GET /api/events/stream`` of one instance in a thread, collecting the job events."""

    def __init__(self, port, key):
        super().__init__(daemon=True)
        self.port, self.key = port, key
        self.events: list[dict] = []
        self.ready = threading.Event()
        self.stop = False

    def run(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request("GET", "/api/events/stream", headers={"X-API-Key": self.key})
        response = conn.getresponse()
        assert response.status == 200
        self.ready.set()
        kind = None
        while not self.stop:
            line = response.fp.readline()
            if not line:
                return
            line = line.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind == "job":
                self.events.append(json.loads(line[6:]))

    def statuses(self, job_id):
        return [e["status"] for e in self.events if e.get("job_id") == job_id]


def s3_client(url, inputs):
    return boto3.client("s3", endpoint_url=url + STORAGE, region_name=inputs["s3_region"],
                        aws_access_key_id=inputs["s3_access_key"],
                        aws_secret_access_key=inputs["s3_secret_key"],
                        config=BotoConfig(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def partial_put(port, path, query, total, sent_bytes, signer_headers):
    """Send the head and ``sent_bytes`` of a ``total``-byte part, then leave it hanging."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"PUT {path}?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: {total}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in signer_headers.items())
    sock.sendall(head.encode() + b"\r\n" + os.urandom(sent_bytes))
    return sock


async def wait_for(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await deferToThread(time.sleep, 0.1)
    return predicate()


@pytest_twisted.ensureDeferred
async def test_two_instances_share_jobs_outputs_events_and_the_audit_chain(
        tmp_path, postgres_url, redis_server):  # noqa: F811
    moto = MotoServer().start()
    fake = await FakeReplicate(reactor).start()
    proxy = await RoundRobinProxy(reactor, []).start()
    cluster = Cluster(tmp_path, postgres_url, redis_server.url, moto, fake)
    readers: list[EventReader] = []
    try:
        await deferToThread(lambda: boto3.client(
            "s3", endpoint_url=moto.url, region_name=moto.region, aws_access_key_id="testing",
            aws_secret_access_key="testing").create_bucket(Bucket=BUCKET))
        config_path = cluster.write_shared_files(proxy.url)
        a = cluster.start_instance("a", config_path)
        await deferToThread(a.wait_ready, 60)
        b = cluster.start_instance("b", config_path)
        await deferToThread(b.wait_ready, 60)
        proxy.factory.backends[:] = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
        key = cluster.admin_key()
        api = Api(key)

        # Live events from each instance, directly (not through the proxy).
        readers = [EventReader(a.port, key), EventReader(b.port, key)]
        for reader in readers:
            reader.start()
            assert await deferToThread(reader.ready.wait, 10)

        # 1. Submissions through the proxy land on both instances; each job is seen from both.
        jobs = []
        for n in range(4):
            code, body = await api.call("POST", proxy.url + "/api/cloud/jobs/submit?provider=replicate", {
                "config": {"model_family": "flux", "max_train_steps": 100},
                "dataloader_config": [{"id": "ds", "type": "local"}], "config_name": f"several-{n}"})
            assert code == 200, body
            jobs.append(body["job_id"])
        for job_id in jobs:
            for instance in (a, b):
                code, body = await api.call("GET", f"{instance.url}/api/cloud/jobs/{job_id}")
                assert code == 200 and body["job"]["status"] == "queued", (instance.name, body)
        # The proxy alternated: each instance took half of the submissions.
        for instance in (a, b):
            code, text = await api.call("GET", f"{instance.url}/api/cloud/metrics/prometheus")
            assert code == 200
            assert value(text.decode(), "simpletuner_http_requests_total",
                         endpoint="POST_/api/cloud/jobs/submit") == 2, instance.name
        sent = fake.state.requests_to("POST", "/v1/predictions")
        assert len(sent) == 4
        inputs = {s.body["input"]["job_id"]: s.body["input"] for s in sent}

        # 2. One multipart upload whose steps alternate between the instances.
        first = inputs[jobs[0]]
        assert first["s3_endpoint_url"] == proxy.url + STORAGE
        s3a, s3b = s3_client(a.url, first), s3_client(b.url, first)
        parts = [os.urandom(5 * MIB), os.urandom(5 * MIB), os.urandom(123_457)]
        object_key = first["s3_base_path"] + "checkpoint/model.safetensors"
        upload = await deferToThread(s3a.create_multipart_upload, Bucket=first["s3_bucket"], Key=object_key)
        etags = []
        for number, (data, client) in enumerate(zip(parts, (s3b, s3a, s3b)), start=1):
            answer = await deferToThread(client.upload_part, Bucket=first["s3_bucket"], Key=object_key,
                                         UploadId=upload["UploadId"], PartNumber=number, Body=data)
            etags.append({"PartNumber": number, "ETag": answer["ETag"]})
        await deferToThread(s3a.complete_multipart_upload, Bucket=first["s3_bucket"], Key=object_key,
                            UploadId=upload["UploadId"], MultipartUpload={"Parts": etags})
        whole = b"".join(parts)
        for client in (s3a, s3b):
            got = await deferToThread(client.get_object, Bucket=first["s3_bucket"], Key=object_key)
            body = await deferToThread(got["Body"].read)
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(whole).hexdigest()

        # 3. Replicate's webhooks for that job go to alternating instances.
        prediction_id = (await api.call("GET", f"{a.url}/api/cloud/jobs/{jobs[0]}"))[1]["job"]["external_id"]
        reasons = []
        for instance, status, extra in ((a, "starting", {}), (b, "processing", {}),
                                        (a, "succeeded", {"predict_time": 600.0})):
            data, headers = _signed(cluster.webhook_secret, fake.state.set_status(prediction_id, status, **extra))
            code, answer = await api.call("POST", f"{instance.url}/api/webhooks/replicate", data, headers)
            assert code == 200, answer
            reasons.append((answer["reason"], answer["job_status"]))
        assert reasons == [("unchanged", "queued"), ("changed", "running"), ("changed", "completed")]
        for instance in (a, b):
            code, body = await api.call("GET", f"{instance.url}/api/cloud/jobs/{jobs[0]}")
            assert body["job"]["status"] == "completed" and body["job"]["cost_usd"] > 0, body
        # ... and the job's credentials stop working on both.
        for client in (s3a, s3b):
            try:
                await deferToThread(client.put_object, Bucket=first["s3_bucket"],
                                    Key=first["s3_base_path"] + "late.bin", Body=b"late")
            except Exception as exc:  # botocore ClientError: AccessDenied / InvalidAccessKeyId
                assert "Denied" in str(exc) or "InvalidAccessKeyId" in str(exc), exc
            else:
                raise AssertionError("a completed job's credentials still upload")

        # 4. SSE clients on both instances saw both instances' changes.
        for reader in readers:
            assert await wait_for(lambda r=reader: r.statuses(jobs[0])[-2:] == ["running", "completed"]), \
                reader.events

        # 5. kill -9 of one instance in the middle of a part: the acknowledged parts survive.
        second = inputs[jobs[1]]
        s3a, s3b = s3_client(a.url, second), s3_client(b.url, second)
        key2 = second["s3_base_path"] + "model-2.bin"
        upload = await deferToThread(s3a.create_multipart_upload, Bucket=second["s3_bucket"], Key=key2)
        part1 = os.urandom(5 * MIB)
        answer = await deferToThread(s3a.upload_part, Bucket=second["s3_bucket"], Key=key2,
                                     UploadId=upload["UploadId"], PartNumber=1, Body=part1)
        etag1 = answer["ETag"]
        hanging = partial_put(a.port, f"{STORAGE}/{second['s3_bucket']}/{urllib.parse.quote(key2)}",
                              f"partNumber=2&uploadId={upload['UploadId']}", 5 * MIB, 2 * MIB,
                              {"X-SimpleTuner-Secret": second["s3_secret_key"]})
        a.proc.send_signal(signal.SIGKILL)
        await deferToThread(a.proc.wait, 30)
        hanging.close()
        # The trainer's retry goes through the proxy, which now only reaches b.
        s3p = s3_client(proxy.url, second)
        listed = await deferToThread(s3p.list_parts, Bucket=second["s3_bucket"], Key=key2,
                                     UploadId=upload["UploadId"])
        assert [(p["PartNumber"], p["ETag"]) for p in listed["Parts"]] == [(1, etag1)]
        part2 = os.urandom(1 * MIB)
        answer = await deferToThread(s3p.upload_part, Bucket=second["s3_bucket"], Key=key2,
                                     UploadId=upload["UploadId"], PartNumber=2, Body=part2)
        await deferToThread(s3p.complete_multipart_upload, Bucket=second["s3_bucket"], Key=key2,
                            UploadId=upload["UploadId"],
                            MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag1},
                                                       {"PartNumber": 2, "ETag": answer["ETag"]}]})
        got = await deferToThread(s3b.get_object, Bucket=second["s3_bucket"], Key=key2)
        assert await deferToThread(got["Body"].read) == part1 + part2

        # 6. The killed instance restarts cleanly on the shared state and sees everything.
        a2 = cluster.start_instance("a-again", config_path)
        await deferToThread(a2.wait_ready, 60)
        proxy.factory.backends[:] = [("127.0.0.1", a2.port), ("127.0.0.1", b.port)]
        for job_id in jobs:
            code, body = await api.call("GET", f"{a2.url}/api/cloud/jobs/{job_id}")
            assert code == 200, body

        # 7. One audit chain, written by three processes, verifies; the job figures are shared.
        code, verdict = await api.call("GET", f"{b.url}/api/audit/verify")
        assert code == 200 and verdict["valid"] is True, verdict
        for instance in (a2, b):
            code, text = await api.call("GET", f"{instance.url}/api/cloud/metrics/prometheus")
            assert code == 200
            text = text.decode()
            assert value(text, "simpletuner_jobs_by_status", status="completed") == 1, instance.name
            assert value(text, "simpletuner_jobs_by_status", status="queued") == 3, instance.name
    finally:
        for reader in readers:
            reader.stop = True
        cluster.stop()
        await proxy.stop()
        await fake.stop()
        moto.stop()
