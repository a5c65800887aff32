"""S3 as SimpleTuner's own server configures it (S8, S18).

* SimpleTuner's publisher signs with boto3 under the placeholder access key ``local`` *and* sends
  the job's secret in ``X-SimpleTuner-Secret`` (or ``X-Upload-Token``): the secret authenticates,
  the signature by a key that was never issued is ignored; a signature by another issued key is
  refused.
* A job submitted with ``resume_from_job: <id>`` may read (GET, HEAD, List) that job's prefix with
  its own upload credentials, never write or delete there.

Jobs are submitted for real against the fake Replicate, which records the s3_* inputs.
"""

from __future__ import annotations

import os

import boto3
import pytest
import pytest_twisted
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread



async def _submit(env, **fields):
    response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate", {
        "config": {"model_family": "flux", "max_train_steps": 10},
        "dataloader_config": [{"id": "ds", "type": "local"}], **fields})
    assert response.code == 200, body
    inputs = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]
    return body["job_id"], inputs


def _client(env, access_key, secret, extra_headers=None):
    client = boto3.client("s3", endpoint_url=env.daemon.url + "/api/cloud/storage", region_name="us-east-1",
                          aws_access_key_id=access_key, aws_secret_access_key=secret)
    if extra_headers:
        def add(request, **_):
            for name, value in extra_headers.items():
                request.headers[name] = value
        client.meta.events.register("before-sign.s3.*", add)
    return client


def _code(err):
    return err.value.response["Error"]["Code"]


@pytest_twisted.ensureDeferred
async def test_placeholder_key_local_with_the_secret_header_is_accepted(env):
    job_id, inputs = await _submit(env)
    secret, base = inputs["s3_secret_key"], inputs["s3_base_path"]
    data = os.urandom(6 * 1024 * 1024 + 5)
    for header in ("X-SimpleTuner-Secret", "X-Upload-Token"):
        publisher = _client(env, "local", "local", {header: secret})
        await deferToThread(publisher.put_object, Bucket="outputs", Key=f"{base}{header}.bin", Body=b"small")
        # a checkpoint: multipart, as boto3's upload_fileobj does above its threshold
        import io
        await deferToThread(publisher.upload_fileobj, io.BytesIO(data), "outputs", f"{base}{header}-ckpt.bin",
                            Config=TransferConfig(multipart_threshold=5 * 1024 * 1024,
                                                  multipart_chunksize=5 * 1024 * 1024))
        got = await deferToThread(publisher.get_object, Bucket="outputs", Key=f"{base}{header}-ckpt.bin")
        assert await deferToThread(got["Body"].read) == data
        listing = await deferToThread(publisher.list_objects_v2, Bucket="outputs", Prefix=base)
        assert {o["Key"] for o in listing["Contents"]} >= {f"{base}{header}.bin", f"{base}{header}-ckpt.bin"}
    progress = env.ctx.upload_progress(job_id)
    assert progress["objects_completed"] == 4 and progress["in_flight"] == []

    # the header is what authenticates: a wrong one, or none, is refused
    for headers in ({"X-SimpleTuner-Secret": "not-the-secret"}, None):
        with pytest.raises(ClientError) as err:
            await deferToThread(_client(env, "local", "local", headers).put_object, Bucket="outputs",
                                Key=f"{base}x.bin", Body=b"x")
        assert _code(err) in ("AccessDenied", "InvalidAccessKeyId")
    # signed by another job's issued key: refused even with this job's secret
    other_id, other = await _submit(env)
    with pytest.raises(ClientError) as err:
        await deferToThread(_client(env, other["s3_access_key"], other["s3_secret_key"],
                                    {"X-SimpleTuner-Secret": secret}).put_object,
                            Bucket="outputs", Key=f"{base}y.bin", Body=b"y")
    assert _code(err) == "AccessDenied"
    # and the secret header never opens another job's prefix
    with pytest.raises(ClientError) as err:
        await deferToThread(_client(env, "local", "local", {"X-SimpleTuner-Secret": secret}).put_object,
                            Bucket="outputs", Key=f"{other_id}/z.bin", Body=b"z")
    assert _code(err) == "AccessDenied"


@pytest_twisted.ensureDeferred
async def test_resume_from_job_reads_but_never_writes_the_previous_jobs_prefix(env):
    first_id, first = await _submit(env)
    writer = _client(env, first["s3_access_key"], first["s3_secret_key"])
    base = first["s3_base_path"]
    await deferToThread(writer.put_object, Bucket="outputs", Key=f"{base}checkpoint-100/model.bin", Body=b"weights")

    second_id, second = await _submit(env, resume_from_job=first_id)
    response, body = await env.call("GET", f"/api/cloud/jobs/{second_id}")
    assert body["job"]["metadata"]["resume_from_job"] == first_id
    reader = _client(env, second["s3_access_key"], second["s3_secret_key"])
    got = await deferToThread(reader.get_object, Bucket="outputs", Key=f"{base}checkpoint-100/model.bin")
    assert await deferToThread(got["Body"].read) == b"weights"
    head = await deferToThread(reader.head_object, Bucket="outputs", Key=f"{base}checkpoint-100/model.bin")
    assert head["ContentLength"] == len(b"weights")
    listing = await deferToThread(reader.list_objects_v2, Bucket="outputs", Prefix=base)
    assert [o["Key"] for o in listing["Contents"]] == [f"{base}checkpoint-100/model.bin"]
    listing = await deferToThread(reader.list_objects_v2, Bucket="outputs", Prefix=first_id)
    assert [o["Key"] for o in listing["Contents"]] == [f"{base}checkpoint-100/model.bin"]
    # its own prefix stays writable
    await deferToThread(reader.put_object, Bucket="outputs", Key=f"{second['s3_base_path']}resumed.bin", Body=b"r")

    denied = [
        (reader.put_object, dict(Bucket="outputs", Key=f"{base}overwrite.bin", Body=b"no")),
        (reader.delete_object, dict(Bucket="outputs", Key=f"{base}checkpoint-100/model.bin")),
        (reader.delete_objects, dict(Bucket="outputs", Delete={"Objects": [{"Key": f"{base}checkpoint-100/model.bin"}],
                                                               "Quiet": False})),
        (reader.create_multipart_upload, dict(Bucket="outputs", Key=f"{base}mp.bin")),
    ]
    for call, kwargs in denied:
        try:
            result = await deferToThread(call, **kwargs)
        except ClientError as err:
            assert err.response["Error"]["Code"] == "AccessDenied", (call, err.response)
        else:  # DeleteObjects answers 200 with a per-key error
            assert [e["Code"] for e in result.get("Errors", [])] == ["AccessDenied"], result
    got = await deferToThread(writer.get_object, Bucket="outputs", Key=f"{base}checkpoint-100/model.bin")
    assert await deferToThread(got["Body"].read) == b"weights"
    # a third job, not resuming, reads nothing of the first
    _, third = await _submit(env)
    with pytest.raises(ClientError) as err:
        await deferToThread(_client(env, third["s3_access_key"], third["s3_secret_key"]).get_object,
                            Bucket="outputs", Key=f"{base}checkpoint-100/model.bin")
    assert _code(err) == "AccessDenied"


@pytest_twisted.ensureDeferred
async def test_resume_from_an_unknown_or_malformed_job_is_refused_and_creates_nothing(env):
    before = len(env.fake.state.requests_to("POST", "/v1/predictions"))
    response, body = await env.submit(resume_from_job="0" * 32)
    assert response.code == 404 and body["field"] == "resume_from_job", body
    for bad in ("../x", "", 42, "a" * 65):
        response, body = await env.submit(resume_from_job=bad)
        assert response.code == 400 and body["field"] == "resume_from_job", (bad, body)
    assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == before
