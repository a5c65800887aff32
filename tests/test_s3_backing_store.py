"""The ``s3`` storage backend against a real moto_server: stdaemon stays the S3 endpoint (its
credentials, answers, checksums, ETags) while the objects, parts and upload state live in the
backing bucket, so another instance sharing it serves the same objects and uploads."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import signal
import socket
import time
import zlib

import boto3
import pytest
import pytest_twisted
import yaml
from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread

from stdaemon.config import load_config
from stdaemon.invalid import InvalidValue
from tests.s3_backing import STORE_SECRETS, backing, moto_s3, storage_settings, stored_keys  # noqa: F401
from tests.test_process import Daemon, spawn  # noqa: F401 (fixture)

MIB = 1024 * 1024
BASE = "/api/cloud/storage/outputs"


def _client(daemon, access_key, secret):
    return boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                        aws_secret_access_key=secret, region_name="us-east-1")


async def _start(make_daemon, settings, subdir=None):
    daemon = await make_daemon(settings=settings, subdir=subdir)
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
    return daemon, _client(daemon, access_key, secret)


def _local_objects(daemon):
    found = []
    for root, dirs, names in os.walk(daemon.ctx.outputs_dir()):
        if ".stdaemon" in dirs:
            dirs.remove(".stdaemon")
        found += names
    return found


def _crc32(data: bytes) -> str:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()


@pytest_twisted.ensureDeferred
async def test_put_get_head_list_delete_through_the_backing_store(make_daemon, backing):
    settings, store, bucket = backing
    daemon, client = await _start(make_daemon, settings)
    data = os.urandom(300_000)
    put = await deferToThread(client.put_object, Bucket="outputs", Key="job-1/dir/a b+c.bin", Body=data,
                              ContentType="application/x-test", Metadata={"step": "100"},
                              CacheControl="max-age=60", ChecksumAlgorithm="CRC32")
    assert put["ETag"] == '"%s"' % hashlib.md5(data).hexdigest()
    assert put["ChecksumCRC32"] == _crc32(data)
    # the object is in the backing bucket under the prefix, not on local disk
    stored = await deferToThread(store.get_object, Bucket=bucket, Key="team-a/outputs/job-1/dir/a b+c.bin")
    assert stored["Body"].read() == data and stored["ContentType"] == "application/x-test"
    assert _local_objects(daemon) == []
    assert os.listdir(daemon.ctx.path("spool")) == []

    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/dir/a b+c.bin", ChecksumMode="ENABLED")
    assert await deferToThread(got["Body"].read) == data
    assert got["ContentType"] == "application/x-test" and got["Metadata"] == {"step": "100"}
    assert got["CacheControl"] == "max-age=60" and got["ChecksumCRC32"] == _crc32(data)
    assert got["ETag"] == put["ETag"]
    ranged = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/dir/a b+c.bin",
                                 Range="bytes=1000-1999")
    assert await deferToThread(ranged["Body"].read) == data[1000:2000]
    assert ranged["ContentRange"] == f"bytes 1000-1999/{len(data)}"
    tail = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/dir/a b+c.bin", Range="bytes=-10")
    assert await deferToThread(tail["Body"].read) == data[-10:]
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/dir/a b+c.bin")
    assert head["ContentLength"] == len(data) and head["ETag"] == put["ETag"]

    for index in range(5):
        await deferToThread(client.put_object, Bucket="outputs", Key=f"job-1/many/{index:02d}.txt",
                            Body=str(index).encode())
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/empty", Body=b"")
    paginator = client.get_paginator("list_objects_v2")

    def list_all(**kw):
        keys, prefixes, etags = [], [], {}
        for page in paginator.paginate(Bucket="outputs", PaginationConfig={"PageSize": 2}, **kw):
            keys += [o["Key"] for o in page.get("Contents", [])]
            etags.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        return keys, prefixes, etags

    keys, _, etags = await deferToThread(list_all, Prefix="job-1/")
    assert keys == ["job-1/dir/a b+c.bin", "job-1/empty"] + [f"job-1/many/{i:02d}.txt" for i in range(5)]
    assert etags["job-1/dir/a b+c.bin"] == put["ETag"]
    _, prefixes, _ = await deferToThread(list_all, Prefix="job-1/", Delimiter="/")
    assert prefixes == ["job-1/dir/", "job-1/many/"]
    empty = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/empty")
    assert await deferToThread(empty["Body"].read) == b""

    await deferToThread(client.delete_object, Bucket="outputs", Key="job-1/many/00.txt")
    with pytest.raises(ClientError) as err:
        await deferToThread(client.get_object, Bucket="outputs", Key="job-1/many/00.txt")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"
    assert "team-a/outputs/job-1/many/00.txt" not in await deferToThread(stored_keys, store, bucket)
    # a job's credentials still reach only its own prefix
    with pytest.raises(ClientError) as err:
        await deferToThread(client.put_object, Bucket="outputs", Key="job-2/x", Body=b"x")
    assert err.value.response["Error"]["Code"] == "AccessDenied"


@pytest_twisted.ensureDeferred
async def test_multipart_upload_file_passes_through_with_the_same_etag(make_daemon, backing, tmp_path):
    settings, store, bucket = backing
    daemon, client = await _start(make_daemon, settings)
    source = tmp_path / "big.bin"
    with open(source, "wb") as fh:
        for _ in range(17):
            fh.write(os.urandom(MIB))
    await deferToThread(client.upload_file, str(source), "outputs", "job-1/checkpoints/big.bin")
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/checkpoints/big.bin")
    assert head["ContentLength"] == 17 * MIB and head["ETag"].endswith('-3"')  # 8 MiB parts
    backing_head = await deferToThread(store.head_object, Bucket=bucket, Key="team-a/outputs/job-1/checkpoints/big.bin")
    assert backing_head["ETag"] == head["ETag"]
    part = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/checkpoints/big.bin", PartNumber=3)
    assert part["ContentLength"] == MIB and part["PartsCount"] == 3
    target = tmp_path / "back.bin"
    await deferToThread(client.download_file, "outputs", "job-1/checkpoints/big.bin", str(target))
    assert target.read_bytes() == source.read_bytes()
    assert daemon.ctx.upload_progress("job-1")["objects_completed"] == 1
    # nothing of the upload is left behind: no backing upload, no part records
    uploads = await deferToThread(store.list_multipart_uploads, Bucket=bucket)
    assert uploads.get("Uploads", []) == []
    assert [k for k in await deferToThread(stored_keys, store, bucket, "team-a/.stdaemon/outputs/uploads/")
            if k.count("/") > 4] == []


@pytest_twisted.ensureDeferred
async def test_large_put_object_goes_up_in_parts_and_keeps_its_md5_etag(make_daemon, backing):
    settings, store, bucket = backing
    settings["storage"]["multipart_threshold"] = 5 * MIB
    daemon, client = await _start(make_daemon, settings)
    data = os.urandom(11 * MIB + 7)
    put = await deferToThread(client.put_object, Bucket="outputs", Key="job-1/large.bin", Body=data)
    md5_etag = '"%s"' % hashlib.md5(data).hexdigest()
    assert put["ETag"] == md5_etag
    backing_head = await deferToThread(store.head_object, Bucket=bucket, Key="team-a/outputs/job-1/large.bin")
    assert "-" in backing_head["ETag"]  # the store got it as a multipart upload
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/large.bin")
    listed = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/")
    assert head["ETag"] == md5_etag and [o["ETag"] for o in listed["Contents"]] == [md5_etag]
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/large.bin", Range="bytes=6291456-")
    assert await deferToThread(got["Body"].read) == data[6291456:]


@pytest_twisted.ensureDeferred
async def test_a_multipart_upload_started_on_one_instance_is_finished_on_another(make_daemon, backing):
    settings, store, bucket = backing
    first, client_a = await _start(make_daemon, settings, subdir="a")
    second, client_b = await _start(make_daemon, settings, subdir="b")
    key = "job-1/shared/model.safetensors"
    created = await deferToThread(client_a.create_multipart_upload, Bucket="outputs", Key=key,
                                  ContentType="application/x-model", Metadata={"epoch": "3"},
                                  ChecksumAlgorithm="CRC32")
    upload_id = created["UploadId"]
    part1, part2, part3 = os.urandom(5 * MIB), os.urandom(5 * MIB + 11), os.urandom(1234)
    # parts go to either instance, as behind a round-robin proxy
    etag1 = (await deferToThread(client_b.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=1,
                                 Body=part1, ChecksumAlgorithm="CRC32"))["ETag"]
    etag2 = (await deferToThread(client_a.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=2,
                                 Body=part2, ChecksumAlgorithm="CRC32"))["ETag"]
    etag3 = (await deferToThread(client_b.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=3,
                                 Body=part3, ChecksumAlgorithm="CRC32"))["ETag"]
    listed = await deferToThread(client_a.list_parts, Bucket="outputs", Key=key, UploadId=upload_id)
    assert [(p["PartNumber"], p["ETag"], p["Size"], p["ChecksumCRC32"]) for p in listed["Parts"]] == [
        (1, etag1, len(part1), _crc32(part1)), (2, etag2, len(part2), _crc32(part2)),
        (3, etag3, len(part3), _crc32(part3))]
    parts = [{"PartNumber": n, "ETag": e, "ChecksumCRC32": _crc32(d)}
             for n, e, d in ((1, etag1, part1), (2, etag2, part2), (3, etag3, part3))]
    done = await deferToThread(client_b.complete_multipart_upload, Bucket="outputs", Key=key, UploadId=upload_id,
                               MultipartUpload={"Parts": parts})
    expected = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in (part1, part2, part3))).hexdigest()
    assert done["ETag"] == f'"{expected}-3"' and done["ChecksumCRC32"].endswith("-3")
    # a retried Complete on the other instance answers the same object
    again = await deferToThread(client_a.complete_multipart_upload, Bucket="outputs", Key=key, UploadId=upload_id,
                                MultipartUpload={"Parts": parts})
    assert again["ETag"] == done["ETag"]
    for client in (client_a, client_b):
        got = await deferToThread(client.get_object, Bucket="outputs", Key=key)
        assert await deferToThread(got["Body"].read) == part1 + part2 + part3
        assert got["ETag"] == done["ETag"] and got["Metadata"] == {"epoch": "3"}
        assert got["ContentType"] == "application/x-model"
        ranged = await deferToThread(client.get_object, Bucket="outputs", Key=key, Range="bytes=5242870-5242889")
        assert await deferToThread(ranged["Body"].read) == (part1 + part2)[5242870:5242890]
    assert first.ctx.upload_progress("job-1")["objects_completed"] \
        + second.ctx.upload_progress("job-1")["objects_completed"] == 1

    # an upload created on B and aborted on A is gone for B too
    other = (await deferToThread(client_b.create_multipart_upload, Bucket="outputs", Key="job-1/gone.bin"))["UploadId"]
    await deferToThread(client_b.upload_part, Bucket="outputs", Key="job-1/gone.bin", UploadId=other, PartNumber=1,
                        Body=b"x" * 100)
    await deferToThread(client_a.abort_multipart_upload, Bucket="outputs", Key="job-1/gone.bin", UploadId=other)
    with pytest.raises(ClientError) as err:
        await deferToThread(client_b.list_parts, Bucket="outputs", Key="job-1/gone.bin", UploadId=other)
    assert err.value.response["Error"]["Code"] == "NoSuchUpload"
    with pytest.raises(ClientError) as err:
        await deferToThread(client_b.upload_part, Bucket="outputs", Key="job-1/gone.bin", UploadId=other,
                            PartNumber=2, Body=b"y")
    assert err.value.response["Error"]["Code"] == "NoSuchUpload"
    uploads = await deferToThread(store.list_multipart_uploads, Bucket=bucket)
    assert uploads.get("Uploads", []) == []


@pytest_twisted.ensureDeferred
async def test_complete_refuses_wrong_parts_and_checksums_as_the_local_store_does(make_daemon, backing):
    settings, _, _ = backing
    _, client = await _start(make_daemon, settings)
    key = "job-1/checked.bin"
    upload_id = (await deferToThread(client.create_multipart_upload, Bucket="outputs", Key=key))["UploadId"]
    small = os.urandom(1000)
    etag1 = (await deferToThread(client.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=1,
                                 Body=small))["ETag"]
    etag2 = (await deferToThread(client.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=2,
                                 Body=small))["ETag"]

    async def complete(parts):
        with pytest.raises(ClientError) as err:
            await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key=key, UploadId=upload_id,
                                MultipartUpload={"Parts": parts})
        return err.value.response["Error"]["Code"]

    assert await complete([{"PartNumber": 1, "ETag": '"0123"'}]) == "InvalidPart"
    assert await complete([{"PartNumber": 2, "ETag": etag2}, {"PartNumber": 1, "ETag": etag1}]) == "InvalidPartOrder"
    assert await complete([{"PartNumber": 1, "ETag": etag1}, {"PartNumber": 2, "ETag": etag2}]) == "EntityTooSmall"
    assert await complete([{"PartNumber": 1, "ETag": etag1, "ChecksumCRC32": "AAAAAA=="}]) == "InvalidPart"
    done = await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key=key, UploadId=upload_id,
                               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag1}]})
    got = await deferToThread(client.get_object, Bucket="outputs", Key=key)
    assert await deferToThread(got["Body"].read) == small and got["ETag"] == done["ETag"]


@pytest_twisted.ensureDeferred
async def test_simpletuner_publisher_uploads_through_the_backing_store(make_daemon, backing, tmp_path):
    from tests.replicate_env import start_env

    settings, store, bucket = backing
    env = await start_env(make_daemon, tmp_path, settings=settings)
    try:
        response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate", {
            "config": {"model_family": "flux", "max_train_steps": 10},
            "dataloader_config": [{"id": "ds", "type": "local"}]})
        assert response.code == 200, body
        inputs = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]
        # the trainer gets its job's credentials for stdaemon's endpoint, never the store's
        assert inputs["s3_endpoint_url"].endswith("/api/cloud/storage") and "testing" not in inputs.values()
        publisher = boto3.client("s3", endpoint_url=env.daemon.url + "/api/cloud/storage", region_name="us-east-1",
                                 aws_access_key_id="local", aws_secret_access_key="local")

        def add(request, **_):
            request.headers["X-SimpleTuner-Secret"] = inputs["s3_secret_key"]

        publisher.meta.events.register("before-sign.s3.*", add)
        import io
        data = os.urandom(6 * MIB + 5)
        base = inputs["s3_base_path"]
        await deferToThread(publisher.put_object, Bucket="outputs", Key=f"{base}validation.png", Body=b"png")
        await deferToThread(publisher.upload_fileobj, io.BytesIO(data), "outputs", f"{base}ckpt/model.bin",
                            Config=boto3.s3.transfer.TransferConfig(multipart_threshold=5 * MIB,
                                                                    multipart_chunksize=5 * MIB))
        keys = await deferToThread(stored_keys, store, bucket, "team-a/outputs/")
        assert sorted(keys) == sorted([f"team-a/outputs/{base}validation.png", f"team-a/outputs/{base}ckpt/model.bin"])
        got = await deferToThread(publisher.get_object, Bucket="outputs", Key=f"{base}ckpt/model.bin")
        assert await deferToThread(got["Body"].read) == data
        response, job = await env.call("GET", f"/api/cloud/jobs/{body['job_id']}")
        assert job["upload_progress"]["objects_completed"] == 2
    finally:
        await env.fake.stop()


def _admin_key(daemon) -> str:
    with open(os.path.join(daemon.state, "config", "cloud", "admin.key")) as fh:
        return fh.read().strip()


def _call(port, key, method, path, body=b""):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"X-API-Key": key})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_upload_loses_no_acknowledged_part(make_daemon, spawn, backing, tmp_path):  # noqa: F811
    settings, store, bucket = backing
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(settings))
    killed = spawn(args=("--config", str(config)), env=STORE_SECRETS)
    await deferToThread(killed.wait_ready)
    key_a = _admin_key(killed)
    status, body = await deferToThread(_call, killed.port, key_a, "POST", f"{BASE}/job-1/model.bin?uploads")
    assert status == 200, body
    upload_id = re.search(rb"<UploadId>([0-9a-f]+)</UploadId>", body).group(1).decode()
    part1 = os.urandom(5 * MIB)
    status, body = await deferToThread(_call, killed.port, key_a, "PUT",
                                       f"{BASE}/job-1/model.bin?partNumber=1&uploadId={upload_id}", part1)
    assert status == 200, body
    # part 2 is being received when the instance dies
    sock = socket.create_connection(("127.0.0.1", killed.port), timeout=30)
    head = (f"PUT {BASE}/job-1/model.bin?partNumber=2&uploadId={upload_id} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"X-API-Key: {key_a}\r\nContent-Length: {8 * MIB}\r\n\r\n")
    sock.sendall(head.encode() + os.urandom(3 * MIB))
    spool = os.path.join(killed.state, "spool")
    deadline = time.monotonic() + 10
    while not (os.path.isdir(spool) and os.listdir(spool)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.listdir(spool), "part 2 was not being received"
    killed.proc.send_signal(signal.SIGKILL)
    killed.proc.wait(10)
    killed.stop()
    sock.close()

    # the surviving instance sees the acknowledged part, takes the rest and completes
    survivor = await make_daemon(settings=settings, subdir="survivor")
    port, key_b = survivor.port, survivor.admin_key
    status, body = await deferToThread(_call, port, key_b, "GET", f"{BASE}/job-1/model.bin?uploadId={upload_id}")
    assert status == 200, body
    etag1 = '"%s"' % hashlib.md5(part1).hexdigest()
    assert re.findall(rb"<PartNumber>(\d+)</PartNumber>", body) == [b"1"] and etag1.encode() in body
    part2 = os.urandom(2 * MIB)
    status, body = await deferToThread(_call, port, key_b, "PUT",
                                       f"{BASE}/job-1/model.bin?partNumber=2&uploadId={upload_id}", part2)
    assert status == 200, body
    etag2 = '"%s"' % hashlib.md5(part2).hexdigest()
    xml = (f"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag1}</ETag></Part>"
           f"<Part><PartNumber>2</PartNumber><ETag>{etag2}</ETag></Part></CompleteMultipartUpload>").encode()
    status, body = await deferToThread(_call, port, key_b, "POST", f"{BASE}/job-1/model.bin?uploadId={upload_id}",
                                       xml)
    assert status == 200, body
    status, body = await deferToThread(_call, port, key_b, "GET", f"{BASE}/job-1/model.bin")
    assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(part1 + part2).digest()


def _load(tmp_path, storage):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"storage": storage}))
    return load_config(str(path), environ={}).config.storage


def test_storage_settings_are_checked_at_load(tmp_path, moto_s3):
    assert _load(tmp_path, {}).backend == "local"
    loaded = _load(tmp_path, {**storage_settings(moto_s3, "bucket-1"), "prefix": "/a/b"})
    assert loaded.prefix == "a/b/" and loaded.backend == "s3"
    bad = [({"backend": "s3"}, "storage.bucket"),
           ({"backend": "nfs"}, "storage.backend"),
           ({"backend": "s3", "bucket": "b1", "access_key_id_secret": "X"}, "storage.secret_access_key_secret"),
           ({"backend": "s3", "bucket": "b1", "ssl_ca_bundle": str(tmp_path / "none.pem")}, "storage.ssl_ca_bundle"),
           ({"multipart_threshold": 1024}, "storage.multipart_threshold"),
           ({"prefix": "a/../b"}, "storage.prefix"),
           ({"endpoint_url": "minio:9000"}, "storage.endpoint_url"),
           ({"addressing_style": "sideways"}, "storage.addressing_style")]
    for storage, path in bad:
        with pytest.raises(InvalidValue) as err:
            _load(tmp_path, storage)
        assert err.value.path == path, storage


@pytest_twisted.ensureDeferred
async def test_an_unreachable_store_answers_503_keeps_nothing_and_degrades_health(make_daemon, backing,
                                                                                  monkeypatch):
    from botocore.config import Config as BotoConfig

    from stdaemon.s3 import backing_client
    from tests.services import free_port

    monkeypatch.setattr(backing_client, "MAX_ATTEMPTS", 1)  # refused connections are not retried for long
    local = await make_daemon(subdir="local")
    assert "object_store" not in local.ctx.health.names()  # the default's health report is unchanged
    settings, _, _ = backing
    healthy = await make_daemon(settings=settings, subdir="up")
    component = await healthy.ctx.s3.health()
    assert "object_store" in healthy.ctx.health.names() and component.status == "healthy", component
    settings["storage"]["endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    daemon = await make_daemon(settings=settings, subdir="down")
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
    client = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                          aws_secret_access_key=secret, region_name="us-east-1",
                          config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}))
    with pytest.raises(ClientError) as err:
        await deferToThread(client.put_object, Bucket="outputs", Key="job-1/x.bin", Body=b"data")
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
    assert err.value.response["Error"]["Code"] == "ServiceUnavailable"
    assert os.listdir(daemon.ctx.path("spool")) == []
    component = await daemon.ctx.s3.health()
    assert component.status == "degraded", component


@pytest_twisted.ensureDeferred
async def test_complete_after_an_instance_died_between_assembling_and_recording(make_daemon, backing):
    """The store assembled the object but the instance stopped before recording it: a retried
    Complete (on any instance) finishes the job with the object's own metadata."""
    import json

    settings, store, bucket = backing
    _, client = await _start(make_daemon, settings)
    key = "job-1/interrupted.bin"
    upload_id = (await deferToThread(client.create_multipart_upload, Bucket="outputs", Key=key,
                                     Metadata={"step": "7"}))["UploadId"]
    data = os.urandom(1000)
    etag = (await deferToThread(client.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=1,
                                Body=data))["ETag"]
    record = await deferToThread(store.get_object, Bucket=bucket,
                                 Key=f"team-a/.stdaemon/outputs/uploads/{upload_id}.json")
    backing_id = json.loads(record["Body"].read())["backing_upload_id"]
    await deferToThread(store.complete_multipart_upload, Bucket=bucket, Key=f"team-a/outputs/{key}",
                        UploadId=backing_id, MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    done = await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key=key, UploadId=upload_id,
                               MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]})
    got = await deferToThread(client.get_object, Bucket="outputs", Key=key)
    assert await deferToThread(got["Body"].read) == data
    assert got["ETag"] == done["ETag"] and got["Metadata"] == {"step": "7"}
    # and the upload is over: its parts' records are gone, a further part is refused
    assert [k for k in await deferToThread(stored_keys, store, bucket, "team-a/.stdaemon/outputs/uploads/")
            if k.count("/") > 4] == []
    with pytest.raises(ClientError) as err:
        await deferToThread(client.upload_part, Bucket="outputs", Key=key, UploadId=upload_id, PartNumber=2, Body=b"x")
    assert err.value.response["Error"]["Code"] == "NoSuchUpload"


@pytest_twisted.ensureDeferred
async def test_listings_read_a_multipart_shaped_objects_record_once(make_daemon, backing, monkeypatch):
    settings, _, _ = backing
    settings["storage"]["multipart_threshold"] = 5 * MIB
    _, writer = await _start(make_daemon, settings, subdir="writer")
    put = await deferToThread(writer.put_object, Bucket="outputs", Key="job-1/large.bin", Body=os.urandom(6 * MIB))
    other, reader = await _start(make_daemon, settings, subdir="reader")
    store = other.ctx.s3.engine.store
    reads = []
    original = store.get_json

    def counting(name):
        reads.append(name)
        return original(name)

    monkeypatch.setattr(store, "get_json", counting)
    for _ in range(3):
        listed = await deferToThread(reader.list_objects_v2, Bucket="outputs", Prefix="job-1/")
        assert [o["ETag"] for o in listed["Contents"]] == [put["ETag"]]
    assert len(reads) == 1
