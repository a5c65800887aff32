"""An S3 request's head is decoded once and shared by SigV4, the upload sink, metadata and checksums."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from twisted.web.http_headers import Headers

from stdaemon.s3 import sigv4
from stdaemon.s3.auth import S3Authenticator, header_pairs, parsed_headers
from stdaemon.s3.credentials import UploadCredential
from stdaemon.s3.parsing import stored_metadata
from stdaemon.s3.uploads import UploadSink

ENDPOINT = "http://127.0.0.1:8080/api/cloud/storage"


class CountingHeaders(Headers):
    reads = 0

    def getAllRawHeaders(self):
        self.reads += 1
        return super().getAllRawHeaders()


class Credentials_:
    def __init__(self, cred):
        self.cred = cred

    async def lookup(self, access_key):
        return self.cred if access_key == self.cred.access_key_id else None

    async def lookup_token(self, token):
        return None

    async def check_job_active(self, cred):
        return True

    async def read_prefixes(self, cred):
        return ()


def _signed_request(now: float):
    body = b"x" * 100
    aws = AWSRequest(method="PUT", url=ENDPOINT + "/outputs/job-1/a.bin", data=body,
                     headers={"Content-Type": "text/plain", "x-amz-meta-note": "caf\u00e9".encode().decode("latin-1"),
                              "x-amz-checksum-crc32": "AAAAAA=="})
    aws.context["payload_signing_enabled"] = True
    S3SigV4Auth(Credentials("STUPKEY", "s3cr3t"), "s3", "us-east-1").add_auth(aws)
    headers = CountingHeaders()
    for name, value in aws.prepare().headers.items():
        headers.addRawHeader(name.encode("latin-1"), value if isinstance(value, bytes) else value.encode("latin-1"))
    headers.addRawHeader(b"host", b"127.0.0.1:8080")
    for value in (b"Root=1", b"Root=\xe9"):  # a repeated header that is not signed, one value not ASCII
        headers.addRawHeader(b"x-amzn-trace-id", value)
    request = SimpleNamespace(requestHeaders=headers, channel=None, method=b"PUT")
    return request, len(body)


def _run(coro):
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    return done.value.value


def test_a_put_head_is_decoded_once_for_signature_sink_metadata_and_checksums():
    now = time.time()
    request, length = _signed_request(now)
    cred = UploadCredential("STUPKEY", "job-1", "outputs", "job-1/", "s3cr3t", now + 3600)
    auth = S3Authenticator(Credentials_(cred), principal_auth=None, clock=SimpleNamespace(seconds=lambda: now),
                           path_prefix="/api/cloud/storage", denied=lambda *a, **k: None)
    caller = _run(auth.authenticate(request, "PUT", "/api/cloud/storage/outputs/job-1/a.bin", ""))
    assert caller.kind == "job" and caller.claim.kind == "v4-header"
    storage = SimpleNamespace(job_for=lambda target: "job-1", progress=SimpleNamespace(start=lambda *a: None))
    target = SimpleNamespace(bucket="outputs", key="job-1/a.bin", upload_id=None)
    sink = UploadSink(storage, request, length, target, 1 << 20, caller)
    assert sink.checksum_algorithms == ["crc32"] and sink.signed_payload and not sink.streaming
    content_type, system, user = stored_metadata(request)
    assert content_type == "text/plain" and user == {"note": "caf\u00e9".encode().decode("latin-1")}
    assert request.requestHeaders.reads == 1

    # the shared form is exactly what the pairs of the raw headers say
    expected: dict = {}
    for name, value in header_pairs(request.requestHeaders):
        expected.setdefault(name, []).append(value)
    assert parsed_headers(request) == expected == sigv4.headers_from_pairs(header_pairs(request.requestHeaders))
    assert expected["x-amzn-trace-id"] == ["Root=1", "Root=\xe9"]


def test_replaced_headers_are_decoded_again():
    request, _ = _signed_request(time.time())
    first = parsed_headers(request)
    request.requestHeaders = Headers({b"x-amz-meta-a": [b"1"]})
    assert parsed_headers(request) == {"x-amz-meta-a": ["1"]} and first != parsed_headers(request)
