"""Hostile bytes on the wire (S19), written to a raw socket: undecodable headers, made-up
methods, HEAD on the SSE route followed by a keep-alive request on the same connection."""

from __future__ import annotations

import json
import socket
import time

import pytest_twisted
from twisted.internet import defer, threads

from tests.authhelpers import create_user, user_key

ANSWER_WITHIN = 10.0


class RawClient:
    """A blocking HTTP/1.1 client on one keep-alive connection (run in a thread)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=ANSWER_WITHIN)
        self.buffer = b""

    def close(self) -> None:
        self.sock.close()

    def request(self, head: bytes, body: bytes = b"", head_only: bool = False) -> tuple[int, dict, bytes]:
        self.sock.sendall(head + body)
        return self.read_response(head_only)

    def _fill(self, deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("no answer within %.0f s" % ANSWER_WITHIN)
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed")
        self.buffer += chunk

    def read_response(self, head_only: bool = False) -> tuple[int, dict, bytes]:
        deadline = time.monotonic() + ANSWER_WITHIN
        while b"\r\n\r\n" not in self.buffer:
            self._fill(deadline)
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split()[1])
        headers: dict = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")
        if head_only:
            return status, headers, b""
        if "content-length" in headers:
            length = int(headers["content-length"])
            while len(self.buffer) < length:
                self._fill(deadline)
            body, self.buffer = self.buffer[:length], self.buffer[length:]
            return status, headers, body
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                while b"\r\n" not in self.buffer:
                    self._fill(deadline)
                size_line, rest = self.buffer.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                while len(rest) < size + 2:
                    self._fill(deadline)
                    rest = self.buffer.split(b"\r\n", 1)[1]
                body += rest[:size]
                self.buffer = rest[size + 2:]
                if size == 0:
                    return status, headers, body
        # No length: read until the server closes.
        while True:
            try:
                self._fill(deadline)
            except ConnectionError:
                break
        body, self.buffer = self.buffer, b""
        return status, headers, body


def get(path: str, *extra: bytes, method: bytes = b"GET") -> bytes:
    lines = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: 127.0.0.1"] + list(extra)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def in_thread(fn, *args):
    return threads.deferToThread(fn, *args)


def _assert_json_error(status: int, headers: dict, body: bytes) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body[:300])
    parsed = json.loads(body)
    assert parsed["error"] and parsed["detail"], parsed
    assert b"Traceback" not in body and b"<html" not in body.lower()
    return parsed


@pytest_twisted.ensureDeferred
async def test_undecodable_headers_never_give_5xx(daemon):
    key = daemon.admin_key.encode()

    def run():
        results = []
        for path in ("/health", "/api/cloud/health/live", "/api/cloud/jobs"):
            for header in (b"X-Forwarded-For: \xff", b"X-Real-IP: 1.2.\xff", b"X-Correlation-ID: ab\xffcd",
                           b"X-API-Key: \xff", b"Authorization: Bearer \xff", b"Cookie: st_session=\xff",
                           b"User-Agent: \xfe\xff"):
                client = RawClient(daemon.port)
                try:
                    auth = [] if header.startswith((b"X-API-Key", b"Authorization", b"Cookie")) \
                        else [b"X-API-Key: " + key]
                    results.append((path, header) + client.request(get(path, header, *auth)))
                finally:
                    client.close()
        return results

    for path, header, status, headers, body in await in_thread(run):
        assert status < 500, (path, header, status, body[:300])
        if header.startswith((b"X-API-Key", b"Authorization", b"Cookie")):
            assert status in (400, 401), (path, header, status)
            _assert_json_error(status, headers, body)
        else:
            assert status == 200, (path, header, status, body[:300])
            assert headers["content-type"].startswith("application/json")
            json.loads(body)
        if header.startswith(b"X-Correlation-ID"):
            cid = headers["x-correlation-id"]
            assert cid and "\\x" not in cid and len(cid) == 32, cid


@pytest_twisted.ensureDeferred
async def test_made_up_methods_are_refused_without_new_metric_series(daemon):
    metrics = daemon.ctx.metrics

    def run(count: int):
        client = RawClient(daemon.port)
        answers = []
        try:
            for n in range(count):
                status, headers, body = client.request(get("/api/cloud/health/live", method=b"M%dX" % n))
                answers.append((status, headers, body))
        finally:
            client.close()
        return answers

    first = await in_thread(run, 5)
    before = (len(metrics.http_requests), len(metrics.http_errors))
    answers = await in_thread(run, 2000)
    assert (len(metrics.http_requests), len(metrics.http_errors)) == before
    for status, headers, body in first + answers:
        assert status in (405, 501), status
        _assert_json_error(status, headers, body)


@pytest_twisted.ensureDeferred
async def test_head_on_the_event_stream_finishes_and_takes_no_stream_slot(daemon):
    user = await create_user(daemon, "hedda", "viewer")
    key = (await user_key(daemon, user["id"], "viewer")).encode()
    bus = daemon.ctx.events

    def run():
        client = RawClient(daemon.port)
        out = []
        try:
            for _ in range(bus.max_per_user + 2):
                out.append(client.request(get("/api/events/stream", b"X-API-Key: " + key, method=b"HEAD"),
                                          head_only=True))
            # The same keep-alive connection still answers.
            out.append(client.request(get("/api/cloud/health/live")))
        finally:
            client.close()
        return out

    answers = await in_thread(run)
    for status, headers, _ in answers[:-1]:
        assert status == 200, answers
        assert headers["content-type"].startswith("text/event-stream")
    status, _, body = answers[-1]
    assert status == 200 and json.loads(body) == {"status": "ok"}
    await defer.succeed(None)
    # No stream slot was taken: a real stream still opens.
    client = RawClient(daemon.port)
    try:
        status, headers, _ = await in_thread(client.request, get("/api/events/stream", b"X-API-Key: " + key), b"",
                                             True)
        assert status == 200 and headers["content-type"].startswith("text/event-stream")
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_protocol_errors_are_answered_in_json(daemon):
    """What twisted.web refuses itself (malformed framing, over-long lines) is answered with the
    same JSON error shape, not an empty 400 or a silent hang-up."""
    cases = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nBadHeaderNoColon\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /api/auth/login HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
    ]

    def run():
        out = []
        for raw in cases:
            client = RawClient(daemon.port)
            try:
                client.sock.sendall(raw)
                out.append((raw[:40],) + client.read_response())
            finally:
                client.close()
        return out

    for raw, status, headers, body in await in_thread(run):
        assert status in (400, 431), (raw, status)
        _assert_json_error(status, headers, body)


@pytest_twisted.ensureDeferred
async def test_head_on_every_get_route_answers_headers_only(daemon):
    """HEAD on every GET route of the route table finishes with headers only: the next request on
    the same keep-alive connection is answered (a body or an unfinished answer would break it)."""
    import re

    paths = []
    for template, methods, _, _ in daemon.service.root.routes():
        if "GET" in methods and not template.startswith("/api/cloud/storage"):
            paths.append(re.sub(r"<(?:[a-z]+:)?[a-z_]+>", "1", template))
    key = daemon.admin_key.encode()

    def run():
        client = RawClient(daemon.port)
        answers = []
        try:
            for path in paths:
                status, headers, _ = client.request(get(path, b"X-API-Key: " + key, method=b"HEAD"),
                                                    head_only=True)
                answers.append((path, status))
            answers.append(("follow-up",) + client.request(get("/api/cloud/health/live"))[:1])
        finally:
            client.close()
        return answers

    answers = await in_thread(run)
    assert len(answers) == len(paths) + 1 and len(paths) > 20
    for path, status in answers[:-1]:
        assert status < 500, (path, status)
    assert answers[-1] == ("follow-up", 200)
