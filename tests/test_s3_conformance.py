"""S3 conformance with boto3: sub-resources the daemon does not implement change nothing (501),
every error on S3 paths is S3 XML, and the S3 behaviours clients rely on (idempotent Complete,
conditional writes, partNumber, metadata, folder markers, max-keys=0)."""

from __future__ import annotations

import hashlib
import os
import xml.etree.ElementTree as ET

import boto3
import pytest
import pytest_twisted
import treq
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread

from tests.s3_backing import backing, moto_s3, storage_backend, stored_bytes  # noqa: F401 (fixtures)
from tests.s3_helpers import raw_request, sign

MIB = 1024 * 1024


def _client(daemon, access_key, secret, **config):
    return boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=BotoConfig(retries={"max_attempts": 1, "mode": "standard"}, **config))


async def _start(make_daemon, job="job-1", settings=None):
    daemon = await make_daemon(settings=settings)
    access_key, secret = await daemon.ctx.upload_credentials.issue(job)
    return daemon, _client(daemon, access_key, secret)


def _on_disk(daemon, key):
    """What the daemon's store holds under ``key`` (local disk or the backing store)."""
    return stored_bytes(daemon, key)


async def _error(fn, **kwargs):
    """(HTTP status, S3 error code) of a call that must fail."""
    def call():
        try:
            fn(**kwargs)
        except ClientError as exc:
            return exc.response["ResponseMetadata"]["HTTPStatusCode"], exc.response["Error"]["Code"]
        raise AssertionError(f"{fn.__name__} succeeded")
    return await deferToThread(call)


def _xml_code(body: bytes) -> str:
    root = ET.fromstring(body)
    assert root.tag == "Error", body
    return root.findtext("Code")


# --------------------------------------------------------------------------- data loss


@pytest_twisted.ensureDeferred
async def test_object_acl_and_tagging_requests_never_touch_the_object(make_daemon):
    daemon, client = await _start(make_daemon)
    data = os.urandom(50_000)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/model.bin", Body=data)

    # PutObjectAcl with a grant the daemon cannot honour: 501, bytes unchanged
    assert await _error(client.put_object_acl, Bucket="outputs", Key="job-1/model.bin",
                        ACL="public-read") == (501, "NotImplemented")
    assert _on_disk(daemon, "job-1/model.bin") == data
    # the canned private ACL is what every object has: accepted, nothing changes
    await deferToThread(client.put_object_acl, Bucket="outputs", Key="job-1/model.bin", ACL="private")
    acl = await deferToThread(client.get_object_acl, Bucket="outputs", Key="job-1/model.bin")
    assert [g["Permission"] for g in acl["Grants"]] == ["FULL_CONTROL"]
    assert acl["Owner"]["ID"] == acl["Grants"][0]["Grantee"]["ID"]

    assert await _error(client.put_object_tagging, Bucket="outputs", Key="job-1/model.bin",
                        Tagging={"TagSet": [{"Key": "a", "Value": "b"}]}) == (501, "NotImplemented")
    assert _on_disk(daemon, "job-1/model.bin") == data
    tags = await deferToThread(client.get_object_tagging, Bucket="outputs", Key="job-1/model.bin")
    assert tags["TagSet"] == []
    assert await _error(client.delete_object_tagging, Bucket="outputs",
                        Key="job-1/model.bin") == (501, "NotImplemented")
    assert _on_disk(daemon, "job-1/model.bin") == data

    for call, kwargs in [
        (client.put_object_retention, {"Retention": {"Mode": "GOVERNANCE", "RetainUntilDate": "2030-01-01"}}),
        (client.put_object_legal_hold, {"LegalHold": {"Status": "ON"}}),
        (client.get_object_attributes, {"ObjectAttributes": ["ETag"]}),
        (client.restore_object, {"RestoreRequest": {"Days": 1}}),
        (client.get_object_retention, {}),
    ]:
        assert await _error(call, Bucket="outputs", Key="job-1/model.bin", **kwargs) == (501, "NotImplemented")
    assert _on_disk(daemon, "job-1/model.bin") == data
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/model.bin")
    assert head["ETag"] == '"%s"' % hashlib.md5(data).hexdigest()
    # ACL of a key that does not exist
    assert await _error(client.get_object_acl, Bucket="outputs", Key="job-1/nope") == (404, "NoSuchKey")


@pytest_twisted.ensureDeferred
async def test_bucket_subresources_answer_or_refuse_never_list(make_daemon):
    daemon, client = await _start(make_daemon)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/a", Body=b"a")
    versioning = await deferToThread(client.get_bucket_versioning, Bucket="outputs")
    assert "Status" not in versioning
    location = await deferToThread(client.get_bucket_location, Bucket="outputs")
    assert location["LocationConstraint"] is None
    acl = await deferToThread(client.get_bucket_acl, Bucket="outputs")
    assert [g["Permission"] for g in acl["Grants"]] == ["FULL_CONTROL"]
    for call, kwargs in [
        (client.list_object_versions, {}),
        (client.get_bucket_cors, {}),
        (client.get_bucket_policy, {}),
        (client.get_bucket_lifecycle_configuration, {}),
        (client.get_bucket_website, {}),
        (client.get_bucket_encryption, {}),
        (client.get_bucket_tagging, {}),
        (client.put_bucket_versioning, {"VersioningConfiguration": {"Status": "Enabled"}}),
        (client.delete_bucket_policy, {}),
        (client.delete_bucket, {}),
    ]:
        assert await _error(call, Bucket="outputs", **kwargs) == (501, "NotImplemented"), call
    assert _on_disk(daemon, "job-1/a") == b"a"


@pytest_twisted.ensureDeferred
async def test_raw_subresource_puts_and_deletes_leave_the_object(make_daemon):
    """Whatever sub-resource a client names, a PUT with a body or a DELETE changes nothing."""
    from stdaemon.s3 import subresources as s3_subresources

    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
    client = _client(daemon, access_key, secret)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/x", Body=b"keep me")
    port = int(daemon.url.rsplit(":", 1)[1])

    for name in sorted(s3_subresources.SUBRESOURCES - {"uploadId", "uploads", "delete", "acl", "tagging"}):
        for method in ("PUT", "DELETE"):
            path = f"/api/cloud/storage/outputs/job-1/x?{name}"
            headers = sign(daemon.url + path, method, access_key, secret, hashlib.sha256(b"junk").hexdigest())
            status, _, body = await deferToThread(raw_request, port, method, path, headers, b"junk")
            assert status == 501 and _xml_code(body) == "NotImplemented", (name, method, body)
            assert _on_disk(daemon, "job-1/x") == b"keep me", (name, method)


# --------------------------------------------------------------------------- XML errors


@pytest_twisted.ensureDeferred
async def test_create_bucket_of_the_configured_bucket_is_already_owned(make_daemon):
    daemon, client = await _start(make_daemon)
    assert await _error(client.create_bucket, Bucket="outputs") == (409, "BucketAlreadyOwnedByYou")
    assert await _error(client.create_bucket, Bucket="another") in ((403, "AccessDenied"),
                                                                    (404, "NoSuchBucket"))


@pytest_twisted.ensureDeferred
async def test_methods_s3_does_not_have_answer_xml_405(make_daemon):
    daemon = await make_daemon()
    for method, path in [("OPTIONS", "/api/cloud/storage/outputs/job-1/a"),
                         ("PATCH", "/api/cloud/storage/outputs/job-1/a"),
                         ("OPTIONS", "/api/cloud/storage/outputs"),
                         ("PROPFIND", "/api/cloud/storage"),
                         ("PUT", "/api/cloud/storage")]:
        response = await treq.request(method, daemon.url + path)
        body = await response.content()
        assert response.code == 405, (method, path, response.code, body)
        assert response.headers.getRawHeaders("content-type") == ["application/xml"], (method, path)
        assert _xml_code(body) == "MethodNotAllowed", body


@pytest_twisted.ensureDeferred
async def test_rate_limited_s3_requests_get_xml_slowdown_with_retry_after(make_daemon):
    daemon, client = await _start(make_daemon, settings={"rate_limit": {
        "exempt_loopback": False, "rules": [{"pattern": "^/api/cloud/storage", "calls": 2, "period": 60}]}})
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/a", Body=b"a")
    await deferToThread(client.head_object, Bucket="outputs", Key="job-1/a")

    def refused():
        try:
            client.get_object(Bucket="outputs", Key="job-1/a")
        except ClientError as exc:
            return exc.response
        raise AssertionError("not refused")

    response = await deferToThread(refused)
    assert response["Error"]["Code"] == "SlowDown"
    assert response["ResponseMetadata"]["HTTPStatusCode"] == 429
    assert int(response["ResponseMetadata"]["HTTPHeaders"]["retry-after"]) > 0


@pytest_twisted.ensureDeferred
async def test_downloads_closed_early_end_quietly(make_daemon):
    """A client that hangs up mid-download (or right after asking) leaves no error in the log."""
    import socket

    from twisted.internet import reactor
    from twisted.internet.task import deferLater
    from twisted.logger import LogLevel, formatEvent, globalLogPublisher

    daemon, client = await _start(make_daemon)
    data = os.urandom(12 * MIB)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/big.bin", Body=data)
    url = client.generate_presigned_url("get_object", Params={"Bucket": "outputs", "Key": "job-1/big.bin"})
    path = url.split(daemon.url, 1)[1]
    port = int(daemon.url.rsplit(":", 1)[1])
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        def hang_up(read_bytes):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
            got = 0
            while got < read_bytes:
                block = sock.recv(65536)
                if not block:
                    break
                got += len(block)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # RST: the server sees the connection drop mid-response

        for read_bytes in (0, 1, 100_000, 1 * MIB, 0, 300_000, 2 * MIB):
            await deferToThread(hang_up, read_bytes)
        await deferLater(reactor, 0.5, lambda: None)
        # the daemon still serves the whole object
        got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/big.bin")
        assert hashlib.sha256(await deferToThread(got["Body"].read)).digest() == hashlib.sha256(data).digest()
    finally:
        globalLogPublisher.removeObserver(events.append)
    bad = [formatEvent(e) + str(e.get("log_failure", "")) for e in events
           if e.get("log_level") in (LogLevel.error, LogLevel.critical) or e.get("log_failure") is not None]
    assert bad == []


# --------------------------------------------------------------------------- multipart


def _crc32_b64(data: bytes) -> str:
    from stdaemon.s3 import checksums as s3_checksums
    return s3_checksums.checksum_b64("crc32", data)


async def _multipart(client, key, chunks, checksum=True, **create):
    extra = {"ChecksumAlgorithm": "CRC32"} if checksum else {}
    upload = await deferToThread(client.create_multipart_upload, Bucket="outputs", Key=key, **extra, **create)
    parts = []
    for number, chunk in enumerate(chunks, 1):
        answer = await deferToThread(client.upload_part, Bucket="outputs", Key=key, UploadId=upload["UploadId"],
                                     PartNumber=number, Body=chunk, **extra)
        part = {"PartNumber": number, "ETag": answer["ETag"]}
        if checksum:
            assert answer["ChecksumCRC32"] == _crc32_b64(chunk)
            part["ChecksumCRC32"] = answer["ChecksumCRC32"]
        parts.append(part)
    return upload["UploadId"], parts


@pytest_twisted.ensureDeferred
async def test_complete_multipart_is_idempotent_with_composite_checksums(make_daemon, storage_backend):
    import base64

    daemon, client = await _start(make_daemon, settings=storage_backend)
    chunks = [os.urandom(5 * MIB), os.urandom(123_456)]
    upload_id, parts = await _multipart(client, "job-1/ckpt.bin", chunks)
    done = await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/ckpt.bin",
                               UploadId=upload_id, MultipartUpload={"Parts": parts})
    joined = b"".join(base64.b64decode(_crc32_b64(c)) for c in chunks)
    assert done["ChecksumCRC32"] == f"{_crc32_b64(joined)}-2"
    # an SDK retrying Complete after a timeout gets the same answer
    again = await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/ckpt.bin",
                                UploadId=upload_id, MultipartUpload={"Parts": parts})
    assert again["ETag"] == done["ETag"]
    assert _on_disk(daemon, "job-1/ckpt.bin") == b"".join(chunks)
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/ckpt.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == done["ChecksumCRC32"]
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/ckpt.bin", ChecksumMode="ENABLED")
    assert await deferToThread(got["Body"].read) == b"".join(chunks)
    # a part listed with a checksum it was not uploaded with
    upload_id, parts = await _multipart(client, "job-1/other.bin", chunks)
    parts[1]["ChecksumCRC32"] = _crc32_b64(b"something else")
    assert await _error(client.complete_multipart_upload, Bucket="outputs", Key="job-1/other.bin",
                        UploadId=upload_id, MultipartUpload={"Parts": parts}) == (400, "InvalidPart")
    # an upload that never existed is still unknown
    assert await _error(client.complete_multipart_upload, Bucket="outputs", Key="job-1/other.bin",
                        UploadId="0" * 32, MultipartUpload={"Parts": parts}) == (404, "NoSuchUpload")


@pytest_twisted.ensureDeferred
async def test_complete_with_a_whole_object_checksum_header(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    chunks = [os.urandom(5 * MIB), os.urandom(1000)]
    whole = b"".join(chunks)
    upload_id, parts = await _multipart(client, "job-1/full.bin", chunks, checksum=False)
    assert await _error(client.complete_multipart_upload, Bucket="outputs", Key="job-1/full.bin",
                        UploadId=upload_id, MultipartUpload={"Parts": parts},
                        ChecksumCRC32=_crc32_b64(b"not it")) == (400, "BadDigest")
    with pytest.raises(FileNotFoundError):
        _on_disk(daemon, "job-1/full.bin")
    done = await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/full.bin",
                               UploadId=upload_id, MultipartUpload={"Parts": parts},
                               ChecksumCRC32=_crc32_b64(whole))
    assert done["ChecksumCRC32"] == _crc32_b64(whole)
    assert _on_disk(daemon, "job-1/full.bin") == whole
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/full.bin", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32"] == _crc32_b64(whole)
    assert await deferToThread(got["Body"].read) == whole


@pytest_twisted.ensureDeferred
async def test_get_and_head_by_part_number(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    chunks = [os.urandom(5 * MIB), os.urandom(5 * MIB + 17), os.urandom(999)]
    upload_id, parts = await _multipart(client, "job-1/parts.bin", chunks)
    await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/parts.bin",
                        UploadId=upload_id, MultipartUpload={"Parts": parts})
    offset = 0
    for number, chunk in enumerate(chunks, 1):
        got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/parts.bin", PartNumber=number)
        assert got["PartsCount"] == 3 and got["ContentLength"] == len(chunk)
        assert got["ContentRange"] == f"bytes {offset}-{offset + len(chunk) - 1}/{sum(map(len, chunks))}"
        assert await deferToThread(got["Body"].read) == chunk
        head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/parts.bin", PartNumber=number)
        assert head["ContentLength"] == len(chunk) and head["PartsCount"] == 3
        offset += len(chunk)
    assert await _error(client.get_object, Bucket="outputs", Key="job-1/parts.bin",
                        PartNumber=4) == (416, "InvalidPartNumber")
    # a single upload is one part
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/single", Body=b"single")
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/single", PartNumber=1)
    assert await deferToThread(got["Body"].read) == b"single"
    assert await _error(client.get_object, Bucket="outputs", Key="job-1/single",
                        PartNumber=2) == (416, "InvalidPartNumber")


# --------------------------------------------------------------------------- conditional writes


@pytest_twisted.ensureDeferred
async def test_conditional_writes(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    first = await deferToThread(client.put_object, Bucket="outputs", Key="job-1/c", Body=b"one", IfNoneMatch="*")
    assert await _error(client.put_object, Bucket="outputs", Key="job-1/c", Body=b"two",
                        IfNoneMatch="*") == (412, "PreconditionFailed")
    assert _on_disk(daemon, "job-1/c") == b"one"
    assert await _error(client.put_object, Bucket="outputs", Key="job-1/c", Body=b"two",
                        IfMatch='"0123456789abcdef0123456789abcdef"') == (412, "PreconditionFailed")
    assert _on_disk(daemon, "job-1/c") == b"one"
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/c", Body=b"two", IfMatch=first["ETag"])
    assert _on_disk(daemon, "job-1/c") == b"two"
    assert await _error(client.put_object, Bucket="outputs", Key="job-1/absent", Body=b"x",
                        IfMatch=first["ETag"]) == (404, "NoSuchKey")
    # and on CompleteMultipartUpload
    upload_id, parts = await _multipart(client, "job-1/c", [b"three"])
    assert await _error(client.complete_multipart_upload, Bucket="outputs", Key="job-1/c", UploadId=upload_id,
                        MultipartUpload={"Parts": parts}, IfNoneMatch="*") == (412, "PreconditionFailed")
    assert _on_disk(daemon, "job-1/c") == b"two"
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/c")
    await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/c", UploadId=upload_id,
                        MultipartUpload={"Parts": parts}, IfMatch=head["ETag"])
    assert _on_disk(daemon, "job-1/c") == b"three"


# --------------------------------------------------------------------------- metadata, keys, listings


SYSTEM = {"CacheControl": "max-age=60", "ContentDisposition": 'attachment; filename="m.bin"',
          "ContentEncoding": "gzip", "ContentLanguage": "en-GB", "ContentType": "application/x-model"}


@pytest_twisted.ensureDeferred
async def test_system_and_user_metadata_round_trip(make_daemon, storage_backend):
    import datetime

    daemon, client = await _start(make_daemon, settings=storage_backend)
    expires = datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    meta = {"step": "1000", "note": "best so far"}
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/m.bin", Body=b"x" * 10, Expires=expires,
                        Metadata=meta, **SYSTEM)
    upload = await deferToThread(client.create_multipart_upload, Bucket="outputs", Key="job-1/mp.bin",
                                 Expires=expires, Metadata=meta, **SYSTEM)
    part = await deferToThread(client.upload_part, Bucket="outputs", Key="job-1/mp.bin",
                               UploadId=upload["UploadId"], PartNumber=1, Body=b"y" * 10)
    await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/mp.bin",
                        UploadId=upload["UploadId"],
                        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]})
    for key in ("job-1/m.bin", "job-1/mp.bin"):
        for answer in (await deferToThread(client.head_object, Bucket="outputs", Key=key),
                       await deferToThread(client.get_object, Bucket="outputs", Key=key)):
            for name, value in SYSTEM.items():
                assert answer[name] == value, (key, name)
            assert answer["Expires"] == expires
            assert answer["Metadata"] == meta


@pytest_twisted.ensureDeferred
async def test_utf8_header_values_sign_and_round_trip(make_daemon):
    """A client that sends (and signs) raw UTF-8 header bytes, as most SDKs other than botocore do."""
    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
    port = int(daemon.url.rsplit(":", 1)[1])
    value = "日本語 ✓ café"
    path = "/api/cloud/storage/outputs/job-1/utf8.txt"
    headers = sign(daemon.url + path, "PUT", access_key, secret, hashlib.sha256(b"body").hexdigest(),
                   {"x-amz-meta-title": value, "Content-Disposition": f"inline; filename*=UTF-8''{value}"})
    # on the wire: the UTF-8 bytes (raw_request writes each character as one byte)
    wire = {k: v.encode("utf-8").decode("latin-1") for k, v in headers.items()}
    status, _, body = await deferToThread(raw_request, port, "PUT", path, wire, b"body")
    assert status == 200, body
    head = sign(daemon.url + path, "HEAD", access_key, secret, hashlib.sha256(b"").hexdigest())
    status, answer, _ = await deferToThread(raw_request, port, "HEAD", path, head)
    assert status == 200
    assert answer["x-amz-meta-title"].encode("latin-1").decode("utf-8") == value


@pytest_twisted.ensureDeferred
async def test_folder_markers(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/folder/", Body=b"")
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/folder/inner/", Body=b"")
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/folder/a.txt", Body=b"a")
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/folder/")
    assert head["ContentLength"] == 0
    top = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["job-1/folder/"]
    inside = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/folder/", Delimiter="/")
    assert [o["Key"] for o in inside["Contents"]] == ["job-1/folder/", "job-1/folder/a.txt"]
    assert [p["Prefix"] for p in inside["CommonPrefixes"]] == ["job-1/folder/inner/"]
    everything = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/")
    assert [o["Key"] for o in everything["Contents"]] == ["job-1/folder/", "job-1/folder/a.txt",
                                                          "job-1/folder/inner/"]
    await deferToThread(client.delete_object, Bucket="outputs", Key="job-1/folder/")
    assert _on_disk(daemon, "job-1/folder/a.txt") == b"a"
    assert await _error(client.head_object, Bucket="outputs", Key="job-1/folder/") == (404, "404")
    # the marker's file name is not a key of its own
    assert (await _error(client.put_object, Bucket="outputs", Key="job-1/x/.stdaemon-folder",
                         Body=b"x"))[0] == 400


@pytest_twisted.ensureDeferred
async def test_max_keys_zero_is_an_empty_untruncated_page(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    for index in range(3):
        await deferToThread(client.put_object, Bucket="outputs", Key=f"job-1/{index}", Body=b"x")
    v2 = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/", MaxKeys=0)
    assert v2["IsTruncated"] is False and v2["KeyCount"] == 0 and "Contents" not in v2
    assert "NextContinuationToken" not in v2
    v1 = await deferToThread(client.list_objects, Bucket="outputs", Prefix="job-1/", MaxKeys=0)
    assert v1["IsTruncated"] is False and "Contents" not in v1


@pytest_twisted.ensureDeferred
async def test_version_ids_other_than_null_change_nothing(make_daemon, storage_backend):
    """Versioning is never enabled: deleting a named version must not delete the object."""
    daemon, client = await _start(make_daemon, settings=storage_backend)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/v", Body=b"kept")
    assert await _error(client.delete_object, Bucket="outputs", Key="job-1/v",
                        VersionId="3HL4kqtJlcpXroDTDmjVBH40Nrjfkd") == (400, "InvalidArgument")
    assert _on_disk(daemon, "job-1/v") == b"kept"
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/v", VersionId="null")
    assert await deferToThread(got["Body"].read) == b"kept"


@pytest_twisted.ensureDeferred
async def test_list_parts_reports_part_checksums(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    chunks = [os.urandom(5 * MIB), b"tail"]
    upload_id, parts = await _multipart(client, "job-1/lp.bin", chunks)
    listed = await deferToThread(client.list_parts, Bucket="outputs", Key="job-1/lp.bin", UploadId=upload_id)
    assert [(p["PartNumber"], p["ETag"], p["ChecksumCRC32"]) for p in listed["Parts"]] == [
        (p["PartNumber"], p["ETag"], p["ChecksumCRC32"]) for p in parts]


@pytest_twisted.ensureDeferred
async def test_full_object_checksum_type_asked_for_on_create(make_daemon, storage_backend):
    daemon, client = await _start(make_daemon, settings=storage_backend)
    chunks = [os.urandom(5 * MIB), b"end"]
    upload_id, parts = await _multipart(client, "job-1/fo.bin", chunks, ChecksumType="FULL_OBJECT")
    done = await deferToThread(client.complete_multipart_upload, Bucket="outputs", Key="job-1/fo.bin",
                               UploadId=upload_id, MultipartUpload={"Parts": parts})
    assert done["ChecksumCRC32"] == _crc32_b64(b"".join(chunks)) and done["ChecksumType"] == "FULL_OBJECT"
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/fo.bin", ChecksumMode="ENABLED")
    assert head["ChecksumCRC32"] == done["ChecksumCRC32"] and head["ChecksumType"] == "FULL_OBJECT"
