"""S3 uploads are authenticated from the request head, before any body byte is stored (S8, S19).

Each refusal must come while the client is still sending (or, with ``Expect: 100-continue``, instead
of ``100 Continue``), leave nothing under the outputs directory (temp files included) and leave no
trace in any job's ``upload_progress``. Requests go over raw sockets so the body can be held back.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
import xml.etree.ElementTree as ET

import pytest_twisted
from twisted.internet.threads import deferToThread

from tests.s3_helpers import outputs_files, raw_request, s3, sign  # noqa: F401  (s3: fixture)

PATH = "/api/cloud/storage/outputs/job-1/obj.bin"
DECLARED = 64 * 1024 * 1024


def _head(port, path, headers, length=None, expect=False, method="PUT"):
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers.items() if k.lower() not in ("host", "content-length")]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if expect:
        lines.append("Expect: 100-continue")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _complete(data):
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or head.startswith(b"HTTP/1.1 100") or b"content-length:" not in head.lower():
        return False
    return len(body) >= int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])


def _answer(sock, data=b""):
    """Read one answer (status, body), complete or until the daemon closes; None if none came."""
    try:
        while not _complete(data):
            block = sock.recv(65536)
            if not block:
                break
            data += block
    except (socket.timeout, ConnectionResetError):
        pass
    if not data:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def refused_mid_body(port, path, headers, files, chunked=False, method="PUT", declared=DECLARED):
    """Send the head of a 64 MiB upload and 256 KiB of its body, then wait (without sending the
    rest) for the answer. Returns (status, body, files seen while the body was held back)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(_head(port, path, headers, None if chunked else declared, method=method))
        piece = b"x" * (256 * 1024)
        try:
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = _answer(sock)
        seen = files()
        assert answer is not None, "no answer while the body was still owed"
        return answer[0], answer[1], seen
    finally:
        sock.close()


def expect_answer(port, path, headers, length=1000):
    """Send only the head with Expect: 100-continue; return (status, body) of the first answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        sock.sendall(_head(port, path, headers, length, expect=True))
        first = sock.recv(65536)
        assert first and not first.startswith(b"HTTP/1.1 100"), "the daemon asked for the body"
        return _answer(sock, first)
    finally:
        sock.close()


def code(body):
    return ET.fromstring(body).findtext("Code")


def _refusals(daemon, access_key, secret):
    url = daemon.url + PATH
    digest = hashlib.sha256(b"x" * DECLARED).hexdigest()  # never checked: refused before
    return [
        ("anonymous", {}, 403, "AccessDenied"),
        ("unknown key", sign(url, "PUT", "STUPFFFFFFFFFFFFFFFF", secret, "UNSIGNED-PAYLOAD"), 403,
         "InvalidAccessKeyId"),
        ("wrong secret", sign(url, "PUT", access_key, "wrong", "UNSIGNED-PAYLOAD"), 403, "SignatureDoesNotMatch"),
        ("wrong token", {"X-Upload-Token": "not-the-secret"}, 403, "AccessDenied"),
        ("bad API key", {"X-API-Key": "stk_nope"}, 403, "AccessDenied"),
        ("other prefix", sign(daemon.url + "/api/cloud/storage/outputs/job-2/x", "PUT", access_key, secret,
                              digest), 403, "AccessDenied"),
        ("streaming, anonymous", {"x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                                  "Content-Encoding": "aws-chunked",
                                  "x-amz-decoded-content-length": str(DECLARED)}, 403, "AccessDenied"),
    ]


@pytest_twisted.ensureDeferred
async def test_refused_while_the_body_is_still_owed_and_nothing_is_stored(s3):
    daemon, access_key, secret = s3
    for chunked in (False, True):
        for name, headers, status, expected in _refusals(daemon, access_key, secret):
            path = PATH if name != "other prefix" else "/api/cloud/storage/outputs/job-2/x"
            got, body, seen = await deferToThread(refused_mid_body, daemon.port, path, headers,
                                                  lambda: outputs_files(daemon), chunked)
            assert (got, code(body)) == (status, expected), (name, chunked, body)
            assert seen == [], (name, chunked, seen)
    assert outputs_files(daemon) == []
    assert daemon.ctx.upload_progress("job-1") == {"objects_completed": 0, "bytes_received": 0, "in_flight": []}
    assert daemon.ctx.upload_progress.tracked_jobs() == 0


@pytest_twisted.ensureDeferred
async def test_xml_bodies_of_strangers_are_refused_before_they_are_read(s3):
    """DeleteObjects and CompleteMultipartUpload carry bodies too (up to 4 MiB): a stranger's is
    refused from the head, whether framed by length or chunked."""
    daemon, access_key, secret = s3
    for path in ("/api/cloud/storage/outputs?delete", PATH + "?uploadId=" + "0" * 32):
        for chunked in (False, True):
            got, body, _ = await deferToThread(refused_mid_body, daemon.port, path, {}, lambda: [], chunked,
                                               "POST", 3 * 1024 * 1024)
            assert (got, code(body)) == (403, "AccessDenied"), (path, chunked, body)


@pytest_twisted.ensureDeferred
async def test_keep_alive_after_an_admitted_upload(s3):
    """The head-first admission pauses and resumes reading: the connection stays usable, even when
    the next request arrives in the same packet as the upload (pipelined)."""
    daemon, access_key, secret = s3
    data = os.urandom(50_000)
    upload = _head(daemon.port, PATH, {"X-Upload-Token": secret}, len(data)) + data
    read = (f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{daemon.port}\r\nX-Upload-Token: {secret}\r\n"
            "Connection: close\r\n\r\n").encode()

    def exchange():
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        with sock:
            sock.sendall(upload + read)
            answers = b""
            while True:
                block = sock.recv(65536)
                if not block:
                    return answers
                answers += block

    answers = await deferToThread(exchange)
    first, _, rest = answers.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200"), answers[:300]
    assert b"HTTP/1.1 200" in rest and rest.endswith(data)


@pytest_twisted.ensureDeferred
async def test_revoked_unknown_and_bad_token_never_get_100_continue(s3):
    daemon, access_key, secret = s3
    url = daemon.url + PATH
    digest = hashlib.sha256(b"x" * 1000).hexdigest()
    cases = [
        (sign(url, "PUT", "STUPFFFFFFFFFFFFFFFF", secret, digest), 403, "InvalidAccessKeyId"),
        ({"X-SimpleTuner-Secret": "not-the-secret"}, 403, "AccessDenied"),
        ({"X-API-Key": "stk_nope"}, 403, "AccessDenied"),
    ]
    for headers, status, expected in cases:
        got, body = await deferToThread(expect_answer, daemon.port, PATH, headers)
        assert (got, code(body)) == (status, expected), body
    await daemon.ctx.upload_credentials.revoke("job-1")
    for headers in (sign(url, "PUT", access_key, secret, digest), {"X-Upload-Token": secret}):
        got, body = await deferToThread(expect_answer, daemon.port, PATH, headers)
        assert got == 403 and code(body) in ("InvalidAccessKeyId", "AccessDenied"), body
    assert outputs_files(daemon) == []


@pytest_twisted.ensureDeferred
async def test_anonymous_upload_in_flight_is_not_in_any_jobs_progress(s3):
    daemon, access_key, secret = s3
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
    try:
        await deferToThread(sock.sendall, _head(daemon.port, PATH, {}, DECLARED) + b"x" * 65536)
        for _ in range(20):
            assert daemon.ctx.upload_progress("job-1")["in_flight"] == []
            await deferToThread(time.sleep, 0.01)
    finally:
        sock.close()
    assert daemon.ctx.upload_progress.tracked_jobs() == 0


@pytest_twisted.ensureDeferred
async def test_accepted_uploads_with_and_without_expect_still_land(s3):
    daemon, access_key, secret = s3
    data = os.urandom(300_000)
    url = daemon.url + PATH
    for expect in (False, True):
        headers = sign(url, "PUT", access_key, secret, hashlib.sha256(data).hexdigest())

        def put():
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            with sock:
                sock.sendall(_head(daemon.port, PATH, headers, len(data), expect))
                if expect:
                    assert sock.recv(65536).startswith(b"HTTP/1.1 100 Continue")
                sock.sendall(data)
                return sock.recv(65536)

        answer = await deferToThread(put)
        assert answer.startswith(b"HTTP/1.1 200"), answer
    with open(os.path.join(daemon.ctx.outputs_dir(), "job-1", "obj.bin"), "rb") as fh:
        assert fh.read() == data
    assert daemon.ctx.upload_progress("job-1")["objects_completed"] == 2


FAR = "Fri, 01 Jan 99999 00:00:00 GMT"


@pytest_twisted.ensureDeferred
async def test_dates_in_the_year_99999_are_s3_4xx(s3):
    """x-amz-date / Date, presigned X-Amz-Date and X-Amz-Expires, SigV2 Expires: an S3 XML 4xx."""
    daemon, access_key, secret = s3
    base = "/api/cloud/storage/outputs/job-1/obj.bin"
    v4 = sign(daemon.url + base, "GET", access_key, secret, "UNSIGNED-PAYLOAD")
    no_amz_date = {k: v for k, v in v4.items() if k.lower() != "x-amz-date"}
    credential = f"{access_key}%2F99990101%2Fus-east-1%2Fs3%2Faws4_request"
    cases = [
        ("GET", base, {**no_amz_date, "Date": FAR}),
        ("GET", base, {**v4, "X-Amz-Date": "999990101T000000Z"}),
        ("GET", base, {"Authorization": f"AWS {access_key}:c2lnbmF0dXJl", "Date": FAR}),
        ("GET", base, {"Authorization": f"AWS {access_key}:c2lnbmF0dXJl", "x-amz-date": FAR}),
        ("GET", f"{base}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}&X-Amz-Date=999990101T000000Z"
                f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={'0' * 64}", {}),
        ("GET", f"{base}?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential={credential}&X-Amz-Date=99990101T000000Z"
                f"&X-Amz-Expires={'9' * 5000}&X-Amz-SignedHeaders=host&X-Amz-Signature={'0' * 64}", {}),
        ("GET", f"{base}?AWSAccessKeyId={access_key}&Signature=c2ln&Expires=3093527980800", {}),
        ("GET", f"{base}?AWSAccessKeyId={access_key}&Signature=c2ln&Expires={'9' * 5000}", {}),
        ("GET", base, {"X-API-Key": daemon.admin_key, "If-Modified-Since": FAR}),
        ("GET", base, {"X-API-Key": daemon.admin_key, "If-Unmodified-Since": FAR}),
        ("PUT", base, {**sign(daemon.url + base, "PUT", access_key, secret, "UNSIGNED-PAYLOAD"), "Date": FAR,
                       "X-Amz-Date": "999990101T000000Z"}),
    ]

    for method, path, headers in cases:
        status, answer_headers, body = await deferToThread(raw_request, daemon.port, method, path, headers,
                                                           b"x" if method == "PUT" else b"")
        assert 400 <= status < 500, (path[:120], headers, status, body)
        assert answer_headers["content-type"] == "application/xml" and code(body), (path[:120], status, body)


def _streaming(daemon, access_key, secret, sizes, declared_sizes=None, corrupt_at=None):
    """Headers and body of a signed streaming upload (STREAMING-AWS4-HMAC-SHA256-PAYLOAD) whose
    chunks have the given sizes; ``declared_sizes`` is what the headers announce."""
    from stdaemon.s3 import sigv4

    declared = sum(declared_sizes or sizes)
    headers = sign(daemon.url + PATH, "PUT", access_key, secret, "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                   {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": str(declared)})
    amz_date = headers["X-Amz-Date"]
    seed = headers["Authorization"].rsplit("Signature=", 1)[1]
    scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
    signer = sigv4.ChunkSigner(sigv4.signing_key(secret, amz_date[:8], "us-east-1", "s3"), amz_date, scope, seed)
    out, previous = [], seed
    for index, size in enumerate(list(sizes) + [0]):
        data = bytes([65 + index % 26]) * size
        previous = signer.chunk_signature(previous, hashlib.sha256(data).hexdigest())
        signature = "0" * 64 if index == corrupt_at else previous
        out.append(b"%x;chunk-signature=%s\r\n%s\r\n" % (size, signature.encode(), data))
    return headers, out


@pytest_twisted.ensureDeferred
async def test_signed_streaming_chunks_are_checked_as_they_arrive(s3):
    """Chunks are verified as they come (the key is known before the body): a short chunk before the
    last one (S3's 8 KiB rule) or a wrong chunk signature is answered while the body is still owed,
    with nothing stored; a well-formed stream lands."""
    daemon, access_key, secret = s3
    sizes = [8192, 8192, 100]
    headers, chunks = _streaming(daemon, access_key, secret, sizes)
    status, _, body = await deferToThread(raw_request, daemon.port, "PUT", PATH, headers, b"".join(chunks))
    assert status == 200, body
    with open(os.path.join(daemon.ctx.outputs_dir(), "job-1", "obj.bin"), "rb") as fh:
        assert fh.read() == b"A" * 8192 + b"B" * 8192 + b"C" * 100

    for sizes, corrupt_at, expected in (([1] * 100_000, None, "InvalidChunkSizeError"),
                                        ([8192] * 10_000, 3, "SignatureDoesNotMatch")):
        # only the first 2 000 chunks are sent: the answer must come before the rest
        headers, chunks = _streaming(daemon, access_key, secret, sizes[:2000], sizes, corrupt_at)
        declared = sum(len(c) for c in chunks) * (len(sizes) // 2000)

        def send():
            sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
            with sock:
                sock.sendall(_head(daemon.port, PATH, headers, declared))
                try:
                    sock.sendall(b"".join(chunks[:2000]))
                except OSError:
                    pass
                return _answer(sock)

        answer = await deferToThread(send)
        assert answer is not None and (answer[0], code(answer[1])) == (403, expected), answer
    assert sorted(os.path.relpath(f, daemon.ctx.outputs_dir()) for f in outputs_files(daemon)
                  if "/.stdaemon/" not in f) == ["job-1/obj.bin"]
    for _ in range(100):  # the refused uploads' temp files are removed by a worker thread
        if not [f for f in outputs_files(daemon) if "/.stdaemon/tmp/" in f]:
            break
        await deferToThread(time.sleep, 0.05)
    assert [f for f in outputs_files(daemon) if "/.stdaemon/tmp/" in f] == []
    assert daemon.ctx.upload_progress("job-1")["in_flight"] == []


@pytest_twisted.ensureDeferred
async def test_boto3_is_told_why_whatever_the_body_size(s3):
    """A refused boto3 upload gets its S3 error, not a connection error: with Expect: 100-continue
    (botocore sends it above 1 MB) the answer comes instead of 100 Continue; without it the rest of
    the body is read and dropped so the client reads the answer. Nothing is stored."""
    import boto3
    from botocore.config import Config
    from botocore.exceptions import ClientError

    daemon, access_key, secret = s3
    config = Config(retries={"max_attempts": 1}, s3={"payload_signing_enabled": False})
    for key_id, key_secret, expected in ((access_key, "wrong", "SignatureDoesNotMatch"),
                                         ("STUPFFFFFFFFFFFFFFFF", secret, "InvalidAccessKeyId")):
        client = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", region_name="us-east-1",
                              aws_access_key_id=key_id, aws_secret_access_key=key_secret, config=config)
        for size in (10, 300_000, 3 * 1024 * 1024):
            try:
                await deferToThread(client.put_object, Bucket="outputs", Key="job-1/refused.bin",
                                    Body=os.urandom(size))
            except ClientError as err:
                assert err.response["Error"]["Code"] == expected, (size, err.response)
            else:
                raise AssertionError(f"a {size}-byte upload with bad credentials was accepted")
    assert outputs_files(daemon) == []


@pytest_twisted.ensureDeferred
async def test_refusals_before_the_body_are_audited_with_the_client_address(make_daemon):
    """Behind a trusted proxy the audit names the client (S6 rules), not the proxy, even though
    the refusal comes before the root has seen the request."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    daemon = await make_daemon(settings={"server": {"trusted_proxies": ["127.0.0.1/32"]}})
    _, secret = await daemon.ctx.upload_credentials.issue("job-1")
    headers = {**sign(daemon.url + PATH, "PUT", "STUPFFFFFFFFFFFFFFFF", secret, "UNSIGNED-PAYLOAD"),
               "X-Forwarded-For": "203.0.113.7"}
    got, body = await deferToThread(expect_answer, daemon.port, PATH, headers)
    assert (got, code(body)) == (403, "InvalidAccessKeyId")
    entries = []
    for _ in range(50):  # audit writes are fire-and-forget: wait for them, bounded
        entries = (await daemon.ctx.audit.query(event_type="upload.denied"))["entries"]
        if entries:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert [(e["ip"], e["details"]["reason"]) for e in entries] == [("203.0.113.7", "unknown access key")]


@pytest_twisted.ensureDeferred
async def test_refusals_before_the_body_count_against_the_rate_limit(make_daemon):
    """Refused at admission, a request never reaches the root's rate limiter: the refusal counts
    all the same, and past the limit the answer is SlowDown (429, Retry-After)."""
    daemon = await make_daemon(settings={"rate_limit": {
        "exempt_loopback": False, "rules": [{"pattern": "^/api/cloud/storage", "calls": 3, "period": 60}]}})
    answers = []
    for _ in range(5):
        sock_answer = await deferToThread(refused_mid_body, daemon.port, PATH, {}, lambda: [], False, "PUT",
                                          1024 * 1024)
        answers.append((sock_answer[0], code(sock_answer[1])))
    assert answers == [(403, "AccessDenied")] * 3 + [(429, "SlowDown")] * 2

    def retry_after():
        sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=10)
        with sock:
            sock.sendall(_head(daemon.port, PATH, {}, 1000, expect=True))
            return sock.recv(65536)

    head = await deferToThread(retry_after)
    assert head.startswith(b"HTTP/1.1 429") and b"\r\nRetry-After: " in head, head
