"""Hostile S3 uploads cannot exhaust the daemon (S19): memory of a real ``twistd`` process stays
within +64 MiB while 8 anonymous clients send streaming PUTs of 1-byte aws-chunks for 30 s, and
none of their bytes reaches the outputs or temp directories.

Half the clients send no credentials at all, half sign with an access key that was never issued;
all declare a signed streaming payload and send ``1;chunk-signature=…`` chunks (87 bytes each)
as fast as the daemon reads them, reconnecting whenever it hangs up. Loopback only; the loop is
bounded in time (30 s) and each client in connections.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.request

from tests.s3_helpers import sign
from tests.test_process import Daemon, spawn  # noqa: F401  (fixture)

DURATION = 30.0
CLIENTS = 8
MAX_CONNECTIONS = 10_000  # per client: the loop is bounded in count as well as in time
BUDGET = 64 * 1024 * 1024
KEY = "/api/cloud/storage/outputs/job-1/flood.bin"
CHUNK = b"1;chunk-signature=" + b"0" * 64 + b"\r\nx\r\n"


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def files_under(*roots):
    found = []
    for root in roots:
        for base, _, names in os.walk(root):
            found += [os.path.join(base, n) for n in names]
    return found


def flood(port, headers, deadline, stats):
    block = CHUNK * 1000
    declared = len(CHUNK) * 1_200_000  # a 100 MB body
    head = [f"PUT {KEY} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Content-Length: {declared}",
            "Content-Encoding: aws-chunked", "x-amz-content-sha256: STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "x-amz-decoded-content-length: 1200000"]
    head += [f"{k}: {v}" for k, v in headers.items()
             if k.lower() not in ("host", "content-length", "x-amz-content-sha256")]
    head_bytes = ("\r\n".join(head) + "\r\n\r\n").encode()
    for _ in range(MAX_CONNECTIONS):
        if time.monotonic() >= deadline:
            return
        try:
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            stats["connect_errors"] += 1
            continue
        with sock:
            stats["connections"] += 1
            sent = 0
            try:
                sock.sendall(head_bytes)
                while sent < declared and time.monotonic() < deadline:
                    sock.sendall(block)
                    sent += len(block)
            except OSError:
                pass  # the daemon answered and hung up: read the answer, reconnect
            stats["bytes"] += sent
            try:
                sock.settimeout(2)
                answer = sock.recv(4096)
            except OSError:
                answer = b""
            if answer.startswith(b"HTTP/1.1 "):
                stats["statuses"].add(int(answer.split()[1]))
                if b"<Code>" in answer:
                    stats["codes"].add(answer.split(b"<Code>")[1].split(b"</Code>")[0].decode())


def test_streaming_1_byte_chunks_from_strangers_keep_memory_flat_and_store_nothing(spawn, tmp_path):
    temp = tmp_path / "tmp"
    temp.mkdir()
    daemon = spawn(env={"TMPDIR": str(temp)})
    daemon.wait_ready()
    # warm up the paths the flood takes (imports, pools) before the baseline
    url = daemon.url + KEY
    unknown = sign(url, "PUT", "STUPFFFFFFFFFFFFFFFF", "x", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
                   {"Content-Encoding": "aws-chunked", "x-amz-decoded-content-length": "1200000"})
    warm = {"connections": 0, "bytes": 0, "connect_errors": 0, "statuses": set(), "codes": set()}
    flood(daemon.port, unknown, time.monotonic() + 1.0, warm)
    flood(daemon.port, {}, time.monotonic() + 1.0, warm)
    urllib.request.urlopen(daemon.url + "/api/cloud/health", timeout=5).read()
    baseline = rss(daemon.proc.pid)

    deadline = time.monotonic() + DURATION
    stats = [{"connections": 0, "bytes": 0, "connect_errors": 0, "statuses": set(), "codes": set()}
             for _ in range(CLIENTS)]
    threads = [threading.Thread(target=flood, args=(daemon.port, unknown if i % 2 else {}, deadline, stats[i]),
                                daemon=True) for i in range(CLIENTS)]
    for thread in threads:
        thread.start()
    peak = baseline
    while any(t.is_alive() for t in threads):
        peak = max(peak, rss(daemon.proc.pid))
        assert daemon.proc.poll() is None, daemon.output()[-4000:]
        time.sleep(0.2)
    for thread in threads:
        thread.join(10)
    peak = max(peak, rss(daemon.proc.pid))

    sent = sum(s["bytes"] for s in stats)
    assert all(s["connections"] >= 1 for s in stats), stats
    assert sent > 0
    assert peak - baseline <= BUDGET, f"RSS grew by {(peak - baseline) >> 20} MiB while {sent >> 20} MiB were sent"
    # nothing of the flood was stored anywhere, and the daemon still answers
    assert files_under(os.path.join(daemon.state, "outputs"), str(temp)) == []
    with urllib.request.urlopen(daemon.url + "/api/cloud/health", timeout=5) as response:
        assert response.status == 200
    # every client was told why, as S3 clients expect
    statuses = set().union(*(s["statuses"] for s in stats))
    codes = set().union(*(s["codes"] for s in stats))
    assert statuses == {403}, (statuses, codes)
    assert codes <= {"AccessDenied", "InvalidAccessKeyId"} and codes, codes


def test_body_bytes_held_in_memory_are_bounded_across_connections():
    """Each upload's queue has its own bound; the daemon-wide budget bounds their sum: over it a
    connection that receives more is paused, and resumes once the sum is low again."""
    from types import SimpleNamespace

    from twisted.internet import defer, task
    from twisted.web.http_headers import Headers

    from stdaemon.s3.service import BodyBudget
    from stdaemon.s3.uploads import MIN_BATCH, UploadSink

    class Transport:
        def __init__(self):
            self.paused = False

        def pauseProducing(self):
            self.paused = True

        def resumeProducing(self):
            self.paused = False

    runs = []
    storage = SimpleNamespace(
        job_for=lambda target: None, clock=task.Clock(),
        body_budget=BodyBudget(high=3 * MIN_BATCH, low=MIN_BATCH),
        run=lambda fn, batch: runs.append(defer.Deferred()) or runs[-1])
    sinks = []
    for n in range(3):
        request = SimpleNamespace(requestHeaders=Headers({b"x-amz-content-sha256": [b"UNSIGNED-PAYLOAD"]}),
                                  channel=SimpleNamespace(transport=Transport()), method=b"PUT")
        target = SimpleNamespace(bucket="outputs", key=f"k{n}", upload_id=None)
        sinks.append(UploadSink(storage, request, 100 * MIN_BATCH, target, 1 << 30, None))
    transports = [s.request.channel.transport for s in sinks]
    sinks[0].write(b"a" * (2 * MIN_BATCH))       # under both bounds: one batch to the pool
    assert not transports[0].paused and len(runs) == 1
    sinks[1].write(b"b" * (2 * MIN_BATCH))       # the sum (4 MiB) is over the budget
    assert transports[1].paused and storage.body_budget.held == 4 * MIN_BATCH
    sinks[2].write(b"c" * 100)                   # a small read while over budget pauses too
    assert transports[2].paused
    assert storage.body_budget.held <= 4 * MIN_BATCH + 100
    runs[0].callback(None)                       # the first batch is written: 2 MiB + 100 B held
    assert transports[1].paused and transports[2].paused   # still over the low mark
    runs[1].callback(None)                       # the second: the sum is low again
    assert storage.body_budget.held <= MIN_BATCH
    assert not transports[1].paused and not transports[2].paused
    for sink in sinks:
        sink.close()
    assert storage.body_budget.held == 0
