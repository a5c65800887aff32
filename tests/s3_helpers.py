"""Shared pieces of the S3 tests: a test CA and server certificate, a botocore-signed request
builder, and a raw HTTP/1.1 client that frames bodies exactly (chunked, truncated, hang-ups)."""

from __future__ import annotations

import os
import hashlib
import socket

import pytest
import pytest_twisted
import trustme
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials


@pytest.fixture(scope="module")
def tls(tmp_path_factory):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    base = tmp_path_factory.mktemp("tls")
    cert_path, key_path, ca_path = base / "cert.pem", base / "key.pem", base / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for extra in cert.cert_chain_pems[1:]:
        with open(cert_path, "ab") as fh:
            fh.write(extra.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    ca.cert_pem.write_to_path(str(ca_path))
    return {"cert": str(cert_path), "key": str(key_path), "ca": str(ca_path)}


@pytest.fixture
def s3(make_daemon):
    """A daemon and the upload credentials of job ``job-1``: ``(daemon, access_key, secret)``."""
    from twisted.internet import defer

    async def setup():
        daemon = await make_daemon()
        access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
        return daemon, access_key, secret

    return pytest_twisted.blockon(defer.ensureDeferred(setup()))


def outputs_files(daemon):
    """Every file under the outputs directory (temp files and sidecars included)."""
    found = []
    for root, _, names in os.walk(daemon.ctx.outputs_dir()):
        found += [os.path.join(root, n) for n in names]
    return found


class _FixedPayload(S3SigV4Auth):
    def __init__(self, creds, payload_hash):
        super().__init__(creds, "s3", "us-east-1")
        self._payload_hash = payload_hash

    def payload(self, request):
        return self._payload_hash


def sign(url, method, access_key, secret, payload_hash, headers=None):
    request = AWSRequest(method=method, url=url, headers=dict(headers or {}))
    _FixedPayload(Credentials(access_key, secret), payload_hash).add_auth(request)
    return {k: (v if isinstance(v, str) else v.decode()) for k, v in request.prepare().headers.items()}


def raw_request(port, method, path, headers, body=b"", chunked=False, expect_continue=False, hang_up_after=None):
    """Send one HTTP/1.1 request; return (status, headers dict, body) or None when cut off."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        for name, value in headers.items():
            if name.lower() not in ("host", "content-length", "transfer-encoding"):
                lines.append(f"{name}: {value}")
        if chunked:
            lines.append("Transfer-Encoding: chunked")
        else:
            lines.append(f"Content-Length: {len(body)}")
        if expect_continue:
            lines.append("Expect: 100-continue")
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if expect_continue:
            first = sock.recv(65536)
            if not first.startswith(b"HTTP/1.1 100"):
                return _parse(first + _read_all(sock))
        payload = body
        if chunked:
            payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 7000]), body[i:i + 7000])
                               for i in range(0, len(body), 7000)) + b"0\r\n\r\n"
        if hang_up_after is not None:
            sock.sendall(payload[:hang_up_after])
            return None
        try:
            sock.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return _parse(_read_all(sock))
    finally:
        sock.close()


def _read_all(sock):
    data = b""
    while True:
        try:
            block = sock.recv(65536)
        except (ConnectionResetError, socket.timeout):
            break
        if not block:
            break
        data += block
    return data


def _parse(data):
    while data.startswith(b"HTTP/1.1 100"):
        data = data.split(b"\r\n\r\n", 1)[1]
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        decoded, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0] or b"0", 16)
            if size == 0:
                break
            decoded, rest = decoded + rest[:size], rest[size + 2:]
        body = decoded
    return status, headers, body




def file_sha256(path) -> str:
    """SHA-256 (hex) of a file, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
