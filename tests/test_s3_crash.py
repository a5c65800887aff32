"""``kill -9`` during uploads: no partial object becomes visible and the daemon restarts cleanly."""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import signal
import socket
import time

from tests.test_process import Daemon, spawn  # noqa: F401 (fixture)

MIB = 1024 * 1024
BASE = "/api/cloud/storage/outputs"


def _admin_key(daemon) -> str:
    with open(os.path.join(daemon.state, "config", "cloud", "admin.key")) as fh:
        return fh.read().strip()


def _call(daemon, method, path, body=b"", headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers={"X-API-Key": _admin_key(daemon), **(headers or {})})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _visible_files(state):
    out = []
    for root, dirs, names in os.walk(os.path.join(state, "outputs")):
        if ".stdaemon" in dirs:
            dirs.remove(".stdaemon")
        out += [os.path.relpath(os.path.join(root, n), state) for n in names]
    return sorted(out)


def _start_partial_put(daemon, path, total, sent, headers=None):
    """Send the headers and ``sent`` of ``total`` body bytes, then leave the request hanging."""
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=30)
    head = f"PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {_admin_key(daemon)}\r\nContent-Length: {total}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    sock.sendall(head.encode() + b"\r\n" + os.urandom(sent))
    return sock


def test_kill_9_during_uploads_leaves_no_partial_object_and_restarts(spawn, tmp_path):  # noqa: F811
    daemon = spawn()
    daemon.wait_ready()
    status, body = _call(daemon, "POST", f"{BASE}/job-1/model.bin?uploads")
    assert status == 200, body
    upload_id = re.search(rb"<UploadId>([0-9a-f]+)</UploadId>", body).group(1).decode()
    part1 = os.urandom(5 * MIB)
    status, _ = _call(daemon, "PUT", f"{BASE}/job-1/model.bin?partNumber=1&uploadId={upload_id}", part1)
    assert status == 200
    hanging = [
        _start_partial_put(daemon, f"{BASE}/job-1/model.bin?partNumber=2&uploadId={upload_id}", 8 * MIB, 3 * MIB),
        _start_partial_put(daemon, f"{BASE}/job-1/single.bin", 10 * MIB, 4 * MIB),
    ]
    tmp_dir = os.path.join(daemon.state, "outputs", ".stdaemon", "tmp")
    deadline = time.monotonic() + 10
    while len(os.listdir(tmp_dir)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # the daemon is writing both bodies to temp files
    assert len(os.listdir(tmp_dir)) == 2
    daemon.proc.send_signal(signal.SIGKILL)
    daemon.proc.wait(10)
    for sock in hanging:
        sock.close()
    assert _visible_files(daemon.state) == []

    restarted = Daemon(tmp_path)  # same state dir (tmp_path/state)
    try:
        restarted.wait_ready()
        assert _visible_files(restarted.state) == []
        status, body = _call(restarted, "GET", f"{BASE}?list-type=2")
        assert status == 200 and b"<KeyCount>0</KeyCount>" in body
        status, body = _call(restarted, "GET", f"{BASE}/job-1/single.bin")
        assert status == 404 and b"NoSuchKey" in body
        # the acknowledged part survived: the upload completes with it
        etag = '"%s"' % hashlib.md5(part1).hexdigest()
        xml = (f"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>{etag}</ETag></Part>"
               "</CompleteMultipartUpload>").encode()
        status, body = _call(restarted, "POST", f"{BASE}/job-1/model.bin?uploadId={upload_id}", xml)
        assert status == 200, body
        status, body = _call(restarted, "GET", f"{BASE}/job-1/model.bin")
        assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(part1).digest()
        tmp_dir = os.path.join(restarted.state, "outputs", ".stdaemon", "tmp")
        assert os.listdir(tmp_dir) == []  # crash leftovers removed at start-up
    finally:
        assert restarted.stop() == 0
