"""Large uploads and the storage rate limit: parts of a multipart upload in
progress are not counted, so a checkpoint of many parts from a non-loopback
client is not cut off; plain requests still are."""

from __future__ import annotations

import hashlib
import os

import boto3
import pytest_twisted
from boto3.s3.transfer import TransferConfig
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread

MIB = 1024 * 1024


@pytest_twisted.ensureDeferred
async def test_multipart_parts_are_not_counted_but_other_requests_are(make_daemon, tmp_path):
    # A storage rule of 3 per minute; loopback is not exempt, so the test
    # client counts like a remote trainer would.
    daemon = await make_daemon(settings={"rate_limit": {
        "exempt_loopback": False,
        "rules": [{"pattern": "^/api/cloud/storage", "calls": 3, "period": 60}]}})
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-9")
    client = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage",
                          aws_access_key_id=access_key, aws_secret_access_key=secret,
                          region_name="us-east-1",
                          config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}))
    source = tmp_path / "checkpoint.bin"
    source.write_bytes(os.urandom(31 * MIB))          # 7 parts of 5 MiB
    transfer = TransferConfig(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB,
                              max_concurrency=4)
    # Create (1) + 7 parts + Complete (1): only Create and Complete count.
    await deferToThread(client.upload_file, str(source), "outputs", "job-9/checkpoint.bin",
                        Config=transfer)
    with open(os.path.join(daemon.ctx.outputs_dir(), "job-9", "checkpoint.bin"), "rb") as fh:
        assert hashlib.sha256(fh.read()).digest() == hashlib.sha256(source.read_bytes()).digest()
    # The third counted request is still allowed; the fourth is refused.
    await deferToThread(client.put_object, Bucket="outputs", Key="job-9/a", Body=b"a")

    def refused():
        try:
            client.put_object(Bucket="outputs", Key="job-9/b", Body=b"b")
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"]
        return 200

    assert await deferToThread(refused) == 429
    # A part for an upload that does not exist gets no free pass.

    def bogus_part():
        try:
            client.upload_part(Bucket="outputs", Key="job-9/c", UploadId="0" * 32, PartNumber=1,
                               Body=b"x")
        except ClientError as e:
            return e.response["ResponseMetadata"]["HTTPStatusCode"]
        return 200

    assert await deferToThread(bogus_part) == 429
