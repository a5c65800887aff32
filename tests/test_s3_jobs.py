"""Upload credentials from a real job submission (fake Replicate records the s3_* inputs), upload
progress in GET /api/cloud/jobs/{id}, revocation at terminal status, multipart clean-up timer."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import uuid
from datetime import datetime, timezone

import boto3
import pytest
import pytest_twisted
import treq
from botocore.exceptions import ClientError
from standardwebhooks import Webhook
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread

from tests.s3_backing import backing, moto_s3, storage_backend  # noqa: F401 (fixtures)
from tests.s3_helpers import sign


async def _submitted(env):
    response, body = await env.submit()
    assert response.code == 200, body
    inputs = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]
    client = boto3.client(
        "s3", endpoint_url=env.daemon.url + "/api/cloud/storage", region_name=inputs["s3_region"],
        aws_access_key_id=inputs["s3_access_key"], aws_secret_access_key=inputs["s3_secret_key"],
    )
    return body["job_id"], inputs, client


@pytest_twisted.ensureDeferred
async def test_job_credentials_upload_progress_and_revocation_on_completion(env):
    job_id, inputs, client = await _submitted(env)
    bucket, base = inputs["s3_bucket"], inputs["s3_base_path"]
    assert inputs["s3_endpoint_url"].endswith("/api/cloud/storage")
    data = os.urandom(123_456)
    await deferToThread(client.put_object, Bucket=bucket, Key=base + "checkpoint-10/model.bin", Body=data)
    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200
    progress = body["upload_progress"]
    assert progress["objects_completed"] == 1 and progress["bytes_received"] == len(data)
    assert progress["in_flight"] == []

    # another job's prefix is out of reach
    with pytest.raises(ClientError) as err:
        await deferToThread(client.put_object, Bucket=bucket, Key="someone-else/x.bin", Body=b"x")
    assert err.value.response["Error"]["Code"] == "AccessDenied"

    # the job completes through a signed Replicate webhook: the credentials stop working at once
    row = await env.ctx.db.run_read(lambda conn: conn.execute(
        "SELECT external_id FROM jobs WHERE job_id = ?", (job_id,)).fetchone())
    prediction = env.fake.state.set_status(row[0], "succeeded", predict_time=10.0)
    payload = json.dumps(prediction)
    msg_id = f"msg_{uuid.uuid4().hex}"
    now = datetime.now(tz=timezone.utc)
    headers = {"webhook-id": msg_id, "webhook-timestamp": str(int(now.timestamp())),
               "webhook-signature": Webhook(env.fake.state.webhook_secret).sign(msg_id, now, payload),
               "Content-Type": "application/json"}
    response = await treq.post(env.url("/api/webhooks/replicate"), data=payload.encode(), headers=headers)
    assert response.code in (200, 202), await response.text()
    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert body["job"]["status"] == "completed"
    with pytest.raises(ClientError) as err:
        await deferToThread(client.put_object, Bucket=bucket, Key=base + "late.bin", Body=b"late")
    assert err.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")
    # the operator still reads the output with the admin API key
    response = await deferToThread(_get, env.daemon.port, f"/api/cloud/storage/{bucket}/{base}checkpoint-10/model.bin",
                                   {"X-API-Key": env.daemon.admin_key})
    assert hashlib.sha256(response).hexdigest() == hashlib.sha256(data).hexdigest()


@pytest_twisted.ensureDeferred
async def test_cancelled_job_credentials_are_refused(env):
    job_id, inputs, client = await _submitted(env)
    response, _ = await env.call("POST", f"/api/cloud/jobs/{job_id}/cancel")
    assert response.code == 200
    with pytest.raises(ClientError) as err:
        await deferToThread(client.put_object, Bucket=inputs["s3_bucket"], Key=inputs["s3_base_path"] + "x",
                            Body=b"x")
    assert err.value.response["Error"]["Code"] in ("InvalidAccessKeyId", "AccessDenied")


def _get(port, path, headers):
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    with sock:
        head = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        sock.sendall((head + "\r\n").encode())
        data = b""
        while True:
            block = sock.recv(65536)
            if not block:
                break
            data += block
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


@pytest_twisted.ensureDeferred
async def test_in_flight_progress_while_bytes_arrive(make_daemon):
    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-9")
    data = os.urandom(2 * 1024 * 1024)
    path = "/api/cloud/storage/outputs/job-9/slow.bin"
    headers = sign(daemon.url + path, "PUT", access_key, secret, hashlib.sha256(data).hexdigest())
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=20)
    try:
        head = f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nContent-Length: {len(data)}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items() if k.lower() not in ("host", "content-length"))
        await deferToThread(sock.sendall, (head + "\r\n").encode() + data[:1024 * 1024])
        snapshot = None
        for _ in range(100):
            snapshot = daemon.ctx.upload_progress("job-9")
            if snapshot["in_flight"] and snapshot["in_flight"][0]["bytes_received"] >= 1024 * 1024:
                break
            await deferLater(reactor, 0.02, lambda: None)
        assert snapshot["in_flight"][0]["key"] == "job-9/slow.bin"
        assert snapshot["in_flight"][0]["bytes_received"] == 1024 * 1024
        assert not os.path.exists(os.path.join(daemon.ctx.outputs_dir(), "job-9", "slow.bin"))
        await deferToThread(sock.sendall, data[1024 * 1024:])
        answer = await deferToThread(sock.recv, 65536)
        assert answer.startswith(b"HTTP/1.1 200")
    finally:
        sock.close()
    snapshot = daemon.ctx.upload_progress("job-9")
    assert snapshot == {"objects_completed": 1, "bytes_received": len(data), "in_flight": []}


@pytest_twisted.ensureDeferred
async def test_stale_multipart_uploads_are_removed_by_the_timer(make_daemon, storage_backend):
    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = await make_daemon(clock=clock, settings=storage_backend)
    s3 = daemon.ctx.s3
    engine = s3.engine
    upload_id = await s3.run(engine.create_multipart, "outputs", "job-1/partial.bin", clock.seconds())
    pending = await s3.run(engine.begin_part, "outputs", "job-1/partial.bin", upload_id, 1)
    await s3.run(pending.write, b"x" * 1000)
    await s3.run(engine.commit_part, "outputs", "job-1/partial.bin", upload_id, 1, pending, clock.seconds())
    clock.advance(3600)  # a timer run: the upload is young, it stays
    await deferLater(reactor, 0.2, lambda: None)
    assert [u for u, _ in await s3.run(engine.list_uploads, "outputs")] == [upload_id]
    clock.advance(s3.multipart_max_age)
    for _ in range(100):
        if not await s3.run(engine.list_uploads, "outputs"):
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert await s3.run(engine.list_uploads, "outputs") == []
    assert (await s3.run(engine.list_objects, "outputs"))["contents"] == []
    if storage_backend:
        # any instance's clean-up aborts the store's upload too
        assert (await s3.run(engine.store.call, "list_multipart_uploads")).get("Uploads", []) == []
    else:
        assert await s3.run(engine.iter_keys, "outputs") == []


@pytest_twisted.ensureDeferred
async def test_objects_land_under_the_configured_s3_output_path(make_daemon, tmp_path):
    target = tmp_path / "elsewhere"
    daemon = await make_daemon(settings={"providers": {"replicate": {"s3_output_path": str(target)}}})
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-5")
    client = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                          aws_secret_access_key=secret, region_name="us-east-1")
    await deferToThread(client.put_object, Bucket="outputs", Key="job-5/out.txt", Body=b"here")
    assert (target / "job-5" / "out.txt").read_bytes() == b"here"
    assert not os.path.exists(os.path.join(daemon.ctx.outputs_dir(), "job-5"))
