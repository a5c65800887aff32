"""Bad input on the S3 surface: the right S3 error, no file written, nothing partial, never a 5xx.

Requests are signed with botocore's own signer and sent over a raw socket so bodies can be
framed exactly (aws-chunked inside HTTP chunked, truncated, oversize, Expect: 100-continue).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import xml.etree.ElementTree as ET

import boto3
import pytest
import pytest_twisted
from botocore.exceptions import ClientError
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from stdaemon.s3 import checksums as s3_checksums
from tests.s3_helpers import outputs_files, raw_request, s3, sign  # noqa: F401  (s3: fixture)


def error_code(body):
    return ET.fromstring(body).findtext("Code")


def aws_chunked(data, crc_name="x-amz-checksum-crc32", crc=None, chunk=65536):
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i:i + chunk]), data[i:i + chunk]) for i in range(0, len(data), chunk))
    crc = crc if crc is not None else s3_checksums.checksum_b64("crc32", data)
    return out + b"0\r\n%s:%s\r\n\r\n" % (crc_name.encode(), crc.encode())


def _files(daemon):
    return [f for f in outputs_files(daemon) if "/.stdaemon/meta/" not in f]


def _visible(daemon):
    return [f for f in _files(daemon) if "/.stdaemon/" not in f]


async def _no_temp_files(daemon):
    for _ in range(100):  # the abort runs in a worker thread: wait for it, bounded
        if not _files(daemon):
            return True
        await deferLater(reactor, 0.05, lambda: None)
    return not _files(daemon)


PATH = "/api/cloud/storage/outputs/job-1/obj.bin"


@pytest_twisted.ensureDeferred
async def test_wrong_secret_unknown_key_and_outside_prefix(s3):
    daemon, access_key, secret = s3
    url = daemon.url + PATH
    body = b"data"
    digest = hashlib.sha256(body).hexdigest()
    cases = [
        (sign(url, "PUT", access_key, "wrong-secret", digest), 403, "SignatureDoesNotMatch", PATH),
        (sign(url, "PUT", "STUPFFFFFFFFFFFFFFFF", secret, digest), 403, "InvalidAccessKeyId", PATH),
        (sign(daemon.url + "/api/cloud/storage/outputs/job-2/x", "PUT", access_key, secret, digest), 403,
         "AccessDenied", "/api/cloud/storage/outputs/job-2/x"),
        ({}, 403, "AccessDenied", PATH),
        ({"X-Upload-Token": "not-the-secret"}, 403, "AccessDenied", PATH),
    ]
    for headers, status, code, path in cases:
        result = await deferToThread(raw_request, daemon.port, "PUT", path, headers, body)
        assert (result[0], error_code(result[2])) == (status, code), result
    assert await _no_temp_files(daemon)
    if daemon.ctx.audit is not None and hasattr(daemon.ctx.audit, "query"):
        entries = []
        for _ in range(50):  # audit writes are fire-and-forget: wait for them, bounded
            entries = (await daemon.ctx.audit.query(event_type="upload.denied"))["entries"]
            if len(entries) >= 4:
                break
            await deferLater(reactor, 0.02, lambda: None)
        reasons = {e["details"]["reason"] for e in entries}
        assert {"signature: SignatureDoesNotMatch", "unknown access key",
                "key outside the credential's prefix", "bad upload token"} <= reasons
        assert secret not in repr(entries)


@pytest_twisted.ensureDeferred
async def test_upload_token_headers_work(s3):
    daemon, access_key, secret = s3
    for header in ("X-Upload-Token", "X-SimpleTuner-Secret"):
        status, headers, _ = await deferToThread(raw_request, daemon.port, "PUT", PATH, {header: secret}, b"tok")
        assert status == 200 and headers["etag"] == '"%s"' % hashlib.md5(b"tok").hexdigest()


@pytest_twisted.ensureDeferred
async def test_skewed_clock_is_refused(s3, monkeypatch):
    daemon, access_key, secret = s3
    import botocore.auth

    skewed = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) - datetime.timedelta(hours=1)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: skewed)
    headers = sign(daemon.url + PATH, "PUT", access_key, secret, hashlib.sha256(b"x").hexdigest())
    status, _, body = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, b"x")
    assert (status, error_code(body)) == (403, "RequestTimeTooSkewed")
    assert await _no_temp_files(daemon)


@pytest_twisted.ensureDeferred
async def test_bad_digests_and_payload_hash(s3):
    daemon, access_key, secret = s3
    url = daemon.url + PATH
    body = os.urandom(5000)
    good = hashlib.sha256(body).hexdigest()
    wrong_md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    cases = [
        (sign(url, "PUT", access_key, secret, good, {"Content-MD5": wrong_md5}), "BadDigest"),
        (sign(url, "PUT", access_key, secret, good, {"Content-MD5": "!!"}), "InvalidDigest"),
        (sign(url, "PUT", access_key, secret, good, {"x-amz-checksum-crc32": "AAAAAA=="}), "BadDigest"),
        (sign(url, "PUT", access_key, secret, hashlib.sha256(b"other").hexdigest()), "XAmzContentSHA256Mismatch"),
    ]
    for headers, code in cases:
        status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, body)
        assert (status, error_code(answer)) == (400, code)
    assert await _no_temp_files(daemon)
    ok = sign(url, "PUT", access_key, secret, good,
              {"x-amz-checksum-crc32": s3_checksums.checksum_b64("crc32", body),
               "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode()})
    status, headers, _ = await deferToThread(raw_request, daemon.port, "PUT", PATH, ok, body)
    assert status == 200 and headers["x-amz-checksum-crc32"] == s3_checksums.checksum_b64("crc32", body)


def _trailer_headers(url, access_key, secret, decoded_length):
    return sign(url, "PUT", access_key, secret, "STREAMING-UNSIGNED-PAYLOAD-TRAILER", {
        "Content-Encoding": "aws-chunked", "X-Amz-Trailer": "x-amz-checksum-crc32",
        "X-Amz-Decoded-Content-Length": str(decoded_length),
    })


@pytest_twisted.ensureDeferred
async def test_aws_chunked_inside_http_chunked_good_bad_checksum_and_truncated(s3):
    daemon, access_key, secret = s3
    url = daemon.url + PATH
    data = os.urandom(200_000)
    headers = _trailer_headers(url, access_key, secret, len(data))
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers,
                                            aws_chunked(data, crc="AAAAAA=="), True)
    assert (status, error_code(answer)) == (400, "BadDigest")
    truncated = aws_chunked(data)[:150_000]
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, truncated, True)
    assert (status, error_code(answer)) == (400, "IncompleteBody")
    assert await _no_temp_files(daemon)
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, aws_chunked(data), True)
    assert status == 200, answer
    with open(os.path.join(daemon.ctx.outputs_dir(), "job-1", "obj.bin"), "rb") as fh:
        assert fh.read() == data


@pytest_twisted.ensureDeferred
async def test_client_hanging_up_mid_body_leaves_nothing(s3):
    daemon, access_key, secret = s3
    data = os.urandom(3 * 1024 * 1024)
    headers = sign(daemon.url + PATH, "PUT", access_key, secret, hashlib.sha256(data).hexdigest())
    await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, data, False, False, 1024 * 1024)
    for _ in range(100):  # the daemon notices the hang-up asynchronously: wait for it, bounded
        if not daemon.ctx.upload_progress("job-1")["in_flight"]:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert daemon.ctx.upload_progress("job-1")["in_flight"] == []
    assert await _no_temp_files(daemon)
    assert not _visible(daemon)


@pytest_twisted.ensureDeferred
async def test_oversize_objects_and_parts_are_refused(s3):
    daemon, access_key, secret = s3
    surface = next(s for s in daemon.service.root.surfaces if type(s).__name__ == "StorageSurface")
    surface.max_put_bytes = 100_000
    data = os.urandom(150_000)
    headers = sign(daemon.url + PATH, "PUT", access_key, secret, hashlib.sha256(data).hexdigest())
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, data, True)
    assert (status, error_code(answer)) == (400, "EntityTooLarge")
    chunked_headers = _trailer_headers(daemon.url + PATH, access_key, secret, len(data))
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", PATH, chunked_headers,
                                            aws_chunked(data), True)
    assert (status, error_code(answer)) == (400, "EntityTooLarge")
    assert await _no_temp_files(daemon)


@pytest_twisted.ensureDeferred
async def test_traversal_and_invalid_keys(s3):
    daemon, access_key, secret = s3
    for key in ("job-1/%2e%2e/%2e%2e/escape", "job-1/..%2f..%2fescape", "job-1/a%5cb", "job-1/a%00b",
                "job-1/" + "x" * 1100, "job-1/" + "y" * 300 + "/z"):
        path = "/api/cloud/storage/outputs/" + key
        headers = sign(daemon.url + path, "PUT", access_key, secret, hashlib.sha256(b"x").hexdigest())
        status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", path, headers, b"x")
        assert 400 <= status < 500, (key, status, answer)
    assert await _no_temp_files(daemon)
    assert not os.path.exists(os.path.join(os.path.dirname(daemon.ctx.outputs_dir()), "escape"))


@pytest_twisted.ensureDeferred
async def test_expect_100_continue(s3):
    daemon, access_key, secret = s3
    data = os.urandom(10_000)
    headers = sign(daemon.url + PATH, "PUT", access_key, secret, hashlib.sha256(data).hexdigest())
    status, _, _ = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, data, False, True)
    assert status == 200


@pytest_twisted.ensureDeferred
async def test_revoked_and_expired_credentials(s3):
    daemon, access_key, secret = s3
    client = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                          aws_secret_access_key=secret, region_name="us-east-1")
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/ok", Body=b"1")
    await daemon.ctx.upload_credentials.revoke("job-1")
    with pytest.raises(ClientError) as err:
        await deferToThread(client.put_object, Bucket="outputs", Key="job-1/after", Body=b"2")
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"

    issued = await daemon.ctx.upload_credentials.issue_scoped("job-3", ttl=-1)
    expired = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage",
                           aws_access_key_id=issued["access_key_id"],
                           aws_secret_access_key=issued["secret_access_key"], region_name="us-east-1")
    with pytest.raises(ClientError) as err:
        await deferToThread(expired.put_object, Bucket="outputs", Key="job-3/x", Body=b"3")
    assert err.value.response["Error"]["Code"] == "InvalidAccessKeyId"
    assert await daemon.ctx.upload_credentials.sweep() == [issued["access_key_id"]]
    assert sorted(os.path.basename(f) for f in _visible(daemon)) == ["ok"]


@pytest_twisted.ensureDeferred
async def test_operator_api_key_reads_everything_and_bad_xml(s3):
    daemon, access_key, secret = s3
    status, _, _ = await deferToThread(raw_request, daemon.port, "PUT", PATH, {"X-Upload-Token": secret}, b"abc")
    assert status == 200
    admin = {"X-API-Key": daemon.admin_key}
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", PATH, admin)
    assert (status, body) == (200, b"abc")
    status, _, body = await deferToThread(raw_request, daemon.port, "GET",
                                          "/api/cloud/storage/outputs?list-type=2&encoding-type=url", admin)
    assert status == 200 and b"<Key>job-1/obj.bin</Key>" in body and b"<EncodingType>url" in body
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", "/api/cloud/storage", admin)
    assert status == 200 and b"<Name>outputs</Name>" in body
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", "/api/cloud/storage/nope?list-type=2",
                                          admin)
    assert (status, error_code(body)) == (404, "NoSuchBucket")
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", PATH + "-missing", admin)
    assert (status, error_code(body)) == (404, "NoSuchKey")
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", PATH, {**admin, "Range": "bytes=10-"})
    assert status == 416, body
    assert error_code(body) == "InvalidRange"
    status, headers, _ = await deferToThread(raw_request, daemon.port, "GET", PATH,
                                             {**admin, "If-None-Match": '"%s"' % hashlib.md5(b"abc").hexdigest()})
    assert status == 304
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", PATH, {**admin, "If-Match": '"nope"'})
    assert (status, error_code(body)) == (412, "PreconditionFailed")
    # multipart completion with garbage XML or unknown parts
    status, _, body = await deferToThread(raw_request, daemon.port, "POST", PATH + "?uploads", admin)
    upload_id = ET.fromstring(body).findtext("{http://s3.amazonaws.com/doc/2006-03-01/}UploadId")
    for xml, code in ((b"<not-xml", "MalformedXML"),
                      (b"<!DOCTYPE x [<!ENTITY a 'b'>]><CompleteMultipartUpload/>", "MalformedXML"),
                      (b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>\"00\"</ETag></Part>"
                       b"</CompleteMultipartUpload>", "InvalidPart")):
        status, _, body = await deferToThread(raw_request, daemon.port, "POST", f"{PATH}?uploadId={upload_id}",
                                              admin, xml)
        assert (status, error_code(body)) == (400, code)
    status, _, body = await deferToThread(raw_request, daemon.port, "POST", f"{PATH}?uploadId={'0' * 32}", admin,
                                          b"<CompleteMultipartUpload/>")
    assert (status, error_code(body)) == (404, "NoSuchUpload")


@pytest_twisted.ensureDeferred
async def test_odd_requests_never_get_a_5xx(s3):
    daemon, access_key, secret = s3
    admin = {"X-API-Key": daemon.admin_key}
    base = "/api/cloud/storage"
    odd = [
        ("GET", f"{base}/outputs?list-type=2&max-keys=abc", admin, b""),
        ("GET", f"{base}/outputs?list-type=2&max-keys=-1", admin, b""),
        ("GET", f"{base}/outputs?list-type=2&continuation-token=!!!", admin, b""),
        ("GET", f"{base}/outputs?list-type=2&encoding-type=base64", admin, b""),
        ("GET", f"{base}/outputs/%ff%fe", admin, b""),
        ("GET", f"{base}/outputs/job-1/x", {**admin, "Range": "bytes=99999999999999999999-"}, b""),
        ("GET", f"{base}/outputs/job-1/x", {**admin, "Range": "bytes=abc"}, b""),
        ("PUT", f"{base}/outputs/job-1/x?partNumber=abc&uploadId=zz", admin, b"x"),
        ("PUT", f"{base}/outputs/job-1/x?uploadId={'0' * 32}", admin, b"x"),
        ("PUT", f"{base}/outputs/job-1/x", {**admin, "x-amz-copy-source": "/outputs/job-1/y"}, b""),
        ("PUT", f"{base}/outputs/job-1/x", {**admin, "Content-Encoding": "aws-chunked"}, b"zz\r\n"),
        ("PUT", f"{base}/outputs/job-1/x", {**admin, "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
                                            "x-amz-trailer": "x-amz-checksum-md5"}, b"0\r\n\r\n"),
        ("POST", f"{base}/outputs/job-1/x", admin, b""),
        ("POST", f"{base}/outputs?delete", admin, b"<Delete><Object/></Delete>"),
        ("DELETE", f"{base}/outputs/job-1/x?uploadId=nothex", admin, b""),
        ("GET", f"{base}/outputs/job-1/x?uploadId=nothex", admin, b""),
        ("GET", f"{base}/outputs?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=a", {}, b""),
        ("GET", f"{base}/outputs?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=STUPX%2F20200101%2Fus-east-1"
                f"%2Fs3%2Faws4_request&X-Amz-Date=20200101T000000Z&X-Amz-Expires=99999999&X-Amz-SignedHeaders=host"
                f"&X-Amz-Signature={'0' * 64}", {}, b""),
        ("GET", f"{base}/outputs?AWSAccessKeyId=x&Signature=y&Expires=soon", {}, b""),
        ("GET", f"{base}/outputs", {"Authorization": "AWS4-HMAC-SHA256 garbage"}, b""),
        ("GET", f"{base}/outputs", {"Authorization": "AWS nocolon"}, b""),
        ("PUT", f"{base}/outputs/job-1/x", {"X-Upload-Token": "x" * 5000}, b"x"),
    ]
    for method, path, headers, body in odd:
        status, _, answer = await deferToThread(raw_request, daemon.port, method, path, headers, body)
        assert 400 <= status < 500, (method, path, status, answer)
    assert await _no_temp_files(daemon)


@pytest_twisted.ensureDeferred
async def test_expect_100_continue_refuses_bad_uploads_before_the_body(s3):
    """With Expect: 100-continue a certain refusal comes instead of 100 Continue: no body is sent."""
    daemon, access_key, secret = s3
    await daemon.ctx.upload_credentials.lookup(access_key)  # known to this process (cache)
    data = b"x" * 1000
    digest = hashlib.sha256(data).hexdigest()
    cases = [
        (PATH, sign(daemon.url + PATH, "PUT", access_key, "wrong-secret", digest), 403, "SignatureDoesNotMatch"),
        ("/api/cloud/storage/outputs/job-2/x",
         sign(daemon.url + "/api/cloud/storage/outputs/job-2/x", "PUT", access_key, secret, digest), 403,
         "AccessDenied"),
        (PATH, {}, 403, "AccessDenied"),
        ("/api/cloud/storage/outputs/job-1/%2e%2e/x", {"X-Upload-Token": secret}, 400, "InvalidArgument"),
    ]
    for path, headers, status, code in cases:
        result = await deferToThread(expect_refused, daemon.port, path, headers, len(data))
        assert result[0] == status and error_code(result[1]) == code, result
    assert await _no_temp_files(daemon)
    # unknown to the cache: the request goes on (100 Continue) and the handler decides
    result = await deferToThread(raw_request, daemon.port, "PUT", PATH,
                                 sign(daemon.url + PATH, "PUT", "STUPFFFFFFFFFFFFFFFF", secret, digest), data,
                                 False, True)
    assert (result[0], error_code(result[2])) == (403, "InvalidAccessKeyId")


def expect_refused(port, path, headers, length):
    """Send only the head with Expect: 100-continue; return (status, body) of the first answer."""
    import socket

    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        head = [f"PUT {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {length}",
                "Expect: 100-continue"]
        head += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        data = b""
        while True:
            block = sock.recv(65536)
            if not block:
                break
            data += block
    finally:
        sock.close()
    first, _, body = data.partition(b"\r\n\r\n")
    assert not first.startswith(b"HTTP/1.1 100"), "the daemon asked for the body"
    return int(first.split()[1]), body


@pytest_twisted.ensureDeferred
async def test_oversize_parts_are_refused(s3, monkeypatch):
    from stdaemon.s3 import http as storage
    from stdaemon.s3 import multipart

    daemon, access_key, secret = s3
    monkeypatch.setattr(storage, "MAX_PART_SIZE", 100_000)
    monkeypatch.setattr(multipart, "MAX_PART_SIZE", 100_000)
    admin = {"X-API-Key": daemon.admin_key}
    status, _, body = await deferToThread(raw_request, daemon.port, "POST", PATH + "?uploads", admin)
    upload_id = ET.fromstring(body).findtext("{http://s3.amazonaws.com/doc/2006-03-01/}UploadId")
    part_path = f"{PATH}?partNumber=1&uploadId={upload_id}"
    data = os.urandom(150_000)
    for chunked in (False, True):
        headers = sign(daemon.url + part_path, "PUT", access_key, secret, hashlib.sha256(data).hexdigest())
        status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", part_path, headers, data, chunked)
        assert (status, error_code(answer)) == (400, "EntityTooLarge")
    status, _, body = await deferToThread(raw_request, daemon.port, "GET", f"{PATH}?uploadId={upload_id}", admin)
    assert status == 200 and b"<Part>" not in body
    for _ in range(100):  # the refused part's temp file is removed by a worker thread: wait, bounded
        if [os.path.basename(f) for f in _files(daemon)] == ["upload.json"]:
            break
        await deferLater(reactor, 0.05, lambda: None)
    assert [os.path.basename(f) for f in _files(daemon)] == ["upload.json"]  # the upload, no part, no temp
