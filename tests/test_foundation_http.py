"""The root pipeline over a real loopback port: health, auth, errors, limits."""

from __future__ import annotations

import json
import re
import socket

import pytest_twisted
import treq
from twisted.internet import defer, reactor

from stdaemon.http.surface import Access


async def get_json(url, **kwargs):
    response = await treq.get(url, **kwargs)
    return response, json.loads(await response.content())


@pytest_twisted.ensureDeferred
async def test_live_ready_and_full_health(daemon):
    response, body = await get_json(daemon.url + "/api/cloud/health/live")
    assert response.code == 200 and body == {"status": "ok"}
    response, body = await get_json(daemon.url + "/health")
    assert body == {"status": "ok"}
    response, body = await get_json(daemon.url + "/api/cloud/health/ready")
    assert response.code == 200 and body == {"status": "ready"}
    response, body = await get_json(daemon.url + "/api/cloud/health")
    assert response.code == 200
    # Without a provider token the secrets component is degraded; nothing
    # else may be.
    not_healthy = {c["name"] for c in body["components"] if c["status"] != "healthy"}
    assert not_healthy <= {"secrets"}
    assert body["status"] == ("degraded" if not_healthy else "healthy")
    names = {c["name"] for c in body["components"]}
    assert {"database", "disk"} <= names
    database = next(c for c in body["components"] if c["name"] == "database")
    assert database["latency_ms"] is not None and database["latency_ms"] >= 0
    assert body["uptime_seconds"] >= 0
    assert body["timestamp"].endswith("Z")


@pytest_twisted.ensureDeferred
async def test_ready_is_503_while_stopping_and_when_database_is_gone(daemon):
    daemon.ctx.health.phase = "stopping"
    response, body = await get_json(daemon.url + "/api/cloud/health/ready")
    assert response.code == 503 and body["reason"] == "shutting down"
    daemon.ctx.health.phase = "ready"
    daemon.ctx.db.stop()
    try:
        response, body = await get_json(daemon.url + "/api/cloud/health/ready")
        assert response.code == 503 and body["reason"] == "database unavailable"
        response, body = await get_json(daemon.url + "/api/cloud/health")
        assert response.code == 503 and body["status"] == "unhealthy"
    finally:
        daemon.ctx.db.start()


@pytest_twisted.ensureDeferred
async def test_unknown_route_is_json_404_and_wrong_method_405(daemon):
    response, body = await get_json(daemon.url + "/no/such/route")
    assert response.code == 404 and body["error"] == "not_found" and "detail" in body
    response = await treq.post(daemon.url + "/api/cloud/health/live")
    body = json.loads(await response.content())
    assert response.code == 405 and body["error"] == "method_not_allowed"
    assert "GET" in response.headers.getRawHeaders("allow")[0]


@pytest_twisted.ensureDeferred
async def test_correlation_id_is_echoed_or_generated(daemon):
    response = await treq.get(daemon.url + "/health", headers={"X-Correlation-ID": "abc-123"})
    assert response.headers.getRawHeaders("x-correlation-id") == ["abc-123"]
    await response.content()
    response = await treq.get(daemon.url + "/health", headers={"X-Correlation-ID": "bad id <script>"})
    generated = response.headers.getRawHeaders("x-correlation-id")[0]
    assert generated != "bad id <script>" and len(generated) == 32
    await response.content()


def raw_request(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    """Send raw bytes and read the answer until the server closes (blocking,
    run in a thread so the reactor keeps serving)."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused_before_it_is_read(daemon):
    from twisted.internet.threads import deferToThread

    limit = daemon.ctx.config.server.max_body_bytes
    head = (f"POST /api/cloud/health/live HTTP/1.1\r\nHost: x\r\nContent-Length: {limit + 1}\r\n"
            "Expect: 100-continue\r\n\r\n").encode()
    answer = await deferToThread(raw_request, daemon.port, head)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"100 Continue" not in answer
    body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert body["error"] == "payload_too_large"


@pytest_twisted.ensureDeferred
async def test_oversized_chunked_body_is_cut_off(daemon):
    from twisted.internet.threads import deferToThread

    limit = daemon.ctx.config.server.max_body_bytes
    chunk = b"x" * 65536
    count = limit // len(chunk) + 2
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(count)) + b"0\r\n\r\n"
    head = b"POST /api/cloud/health/live HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer = await deferToThread(raw_request, daemon.port, head + body)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


@pytest_twisted.ensureDeferred
async def test_every_non_public_route_needs_a_key(daemon):
    """Enumerate every registered route: without a valid key (even from
    127.0.0.1 with a forged X-Forwarded-For) each non-public one is 401."""
    routes = daemon.service.root.routes()
    assert routes, "no routes registered"
    checked = 0
    for template, methods, endpoint, info in routes:
        if info.access == Access.PUBLIC:
            continue
        path = re.sub(r"<(?:(\w+):)?\w+>",
                      lambda m: {"int": "1", "path": "x/y"}.get(m.group(1) or "", "x"), template)
        for method in methods:
            for headers in ({}, {"X-Forwarded-For": "127.0.0.1"}, {"X-API-Key": "st_wrong"},
                            {"Authorization": "Bearer st_wrong"}):
                response = await treq.request(method, daemon.url + path, headers=headers, data=b"{}")
                body = await response.content()
                assert response.code == 401, (method, template, response.code, body[:200])
                assert response.headers.getRawHeaders("www-authenticate")
                checked += 1
    public = [r for r in routes if r[3].access == Access.PUBLIC]
    assert public and all(r[0].startswith(("/api/cloud/health", "/health", "/api/webhooks",
                                           "/api/cloud/storage", "/api/auth/login",
                                           "/api/cloud/metrics/prometheus", "/", "/console",
                                           "/static")) for r in public)
    return checked


@pytest_twisted.ensureDeferred
async def test_admin_key_file_is_private_and_works(daemon):
    import os
    import stat

    path = daemon.ctx.path("config", "cloud", "admin.key")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert daemon.admin_key.startswith("st_")
    from stdaemon.users import api_keys, store as users_store

    principal = await daemon.ctx.db.run_read(users_store.lookup, daemon.admin_key, daemon.ctx.now())
    assert principal.role == "admin"
    stored = await daemon.ctx.db.run_read(
        lambda c: [r[0] for r in c.execute("SELECT key_hash FROM api_keys")])
    assert daemon.admin_key not in stored and api_keys.hash_key(daemon.admin_key) in stored


@pytest_twisted.ensureDeferred
async def test_graceful_stop_waits_for_in_flight_requests(make_daemon):
    running = await make_daemon()
    gate = defer.Deferred()
    entered = defer.Deferred()

    async def hold(request, match):
        if not entered.called:
            entered.callback(None)
        await gate
        return None

    running.service.root.middlewares.append(hold)
    pending = treq.get(running.url + "/api/cloud/health/live")
    await entered
    stopping = running.service.stopService()
    await deferLater(0.1)
    assert not stopping.called, "stop did not wait for the in-flight request"
    # No new connections are accepted once stopping has begun.
    refused = await treq.get(running.url + "/health").addCallbacks(lambda r: False, lambda f: True)
    assert refused
    gate.callback(None)
    response = await pending
    assert response.code == 200
    assert json.loads(await response.content()) == {"status": "ok"}
    await stopping
    assert running.ctx.health.phase == "stopping"


def deferLater(seconds):
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


@pytest_twisted.ensureDeferred
async def test_https_listener_from_certificate_settings(make_daemon, tmp_path):
    """server.ssl_cert/ssl_key (SIMPLETUNER_SSL_CERT/KEY) turn tcp listeners into TLS."""
    import ssl
    import urllib.request

    import trustme
    from twisted.internet.threads import deferToThread

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for blob in cert.cert_chain_pems[1:]:
        with open(cert_path, "ab") as fh:
            fh.write(blob.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    running = await make_daemon(env={"SIMPLETUNER_SSL_CERT": str(cert_path),
                                     "SIMPLETUNER_SSL_KEY": str(key_path)})
    assert running.url.startswith("https://")
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def fetch():
        with urllib.request.urlopen(running.url + "/api/cloud/health/live", context=context,
                                    timeout=10) as response:
            return response.status, json.loads(response.read())

    assert await deferToThread(fetch) == (200, {"status": "ok"})

    def plain():
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{running.port}/health", timeout=5).read()
        except Exception:
            return "refused"
        return "served"

    assert await deferToThread(plain) == "refused"


@pytest_twisted.ensureDeferred
async def test_post_bodies_are_not_parsed_as_forms_by_twisted_web(daemon, monkeypatch):
    """Routes read their own bodies: twisted.web's form parsing (the e-mail header parser over
    every POST's Content-Type) is off, and a form-encoded body is refused as JSON would be."""
    from twisted.web import http as twisted_http

    calls = []
    original = twisted_http._parseContentType
    monkeypatch.setattr(twisted_http, "_parseContentType", lambda line: calls.append(line) or original(line))
    for content_type in (b"application/json", b"application/x-www-form-urlencoded"):
        response = await treq.post(daemon.url + "/api/auth/login", data=b"username=admin&password=x",
                                   headers={b"Content-Type": content_type})
        body = json.loads(await response.content())
        assert response.code == 400, body
    assert calls == []


@pytest_twisted.ensureDeferred
async def test_answers_carry_their_length_and_stdaemons_headers_over_keep_alive(daemon):
    """Whole answers are sent with Content-Length (no chunked framing), two pipelined requests on
    one connection are both answered, and the headers name stdaemon, not the framework."""
    from twisted.internet.threads import deferToThread

    port = int(daemon.url.rsplit(":", 1)[1])
    one = b"GET /api/cloud/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
    last = b"GET /no/such/route HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    raw = await deferToThread(raw_request, port, one + last)
    first, rest = raw.split(b"\r\n\r\n", 1)
    head = first.decode("latin-1").split("\r\n")
    assert head[0] == "HTTP/1.1 200 OK"
    fields = {}
    for line in head[1:]:
        name, _, value = line.partition(": ")
        fields.setdefault(name.lower(), []).append(value)
    assert fields["content-length"] == [str(len(b'{"status":"ok"}'))]
    assert "transfer-encoding" not in fields
    assert fields["server"] == ["stdaemon"]
    assert fields["x-content-type-options"] == ["nosniff"]
    assert fields["content-type"] == ["application/json"]
    assert len(fields["x-correlation-id"][0]) == 32 and fields["date"][0].endswith("GMT")
    assert rest.startswith(b'{"status":"ok"}HTTP/1.1 404 Not Found\r\n')
    second_head, second_body = rest[len(b'{"status":"ok"}'):].split(b"\r\n\r\n", 1)
    length = re.search(rb"\r\nContent-Length: (\d+)\r\n", second_head + b"\r\n")
    assert length and int(length.group(1)) == len(second_body)
    assert json.loads(second_body)["error"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_cancels_its_handler_and_is_not_in_flight(daemon, monkeypatch):
    root = daemon.service.root
    match = root.match("GET", "/api/cloud/health/live")
    cancelled = defer.Deferred()
    entered = defer.Deferred()

    async def hanging(surface, request):
        entered.callback(None)
        await defer.Deferred(lambda d: cancelled.callback("cancelled"))
        return {"never": "sent"}

    monkeypatch.setattr(match.info, "handler", hanging)
    with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1]))) as sock:
        sock.sendall(b"GET /api/cloud/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await entered
        assert root.inflight == 1
    assert await cancelled == "cancelled"
    for _ in range(50):
        if root.inflight == 0:
            break
        await deferLater(0.02)
    assert root.inflight == 0
    assert (await root.idle()) is None


@pytest_twisted.ensureDeferred
async def test_a_handler_cancelled_because_its_client_left_logs_no_error(daemon, monkeypatch):
    from klein import Klein
    from twisted.logger import globalLogPublisher

    from stdaemon.http.surface import PUBLIC, Surface, route

    entered = defer.Deferred()

    class Hanging(Surface):
        app = Klein()

        @route(app, "/hang", access=PUBLIC)
        async def hang(self, request):
            entered.callback(None)
            await defer.Deferred()
            return {"never": "sent"}

    hanging = Hanging.app.endpoints[next(iter(Hanging.app.endpoints))].route_info.handler
    root = daemon.service.root
    monkeypatch.setattr(root.match("GET", "/api/cloud/health/live").info, "handler", hanging)
    errors = []

    def observe(event):
        level = event.get("log_level")
        if level is not None and level.name in ("error", "critical"):
            errors.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        with socket.create_connection(("127.0.0.1", int(daemon.url.rsplit(":", 1)[1]))) as sock:
            sock.sendall(b"GET /api/cloud/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            await entered
        for _ in range(50):
            if root.inflight == 0:
                break
            await deferLater(0.02)
        await deferLater(0.05)
    finally:
        globalLogPublisher.removeObserver(observe)
    assert root.inflight == 0
    assert errors == []
