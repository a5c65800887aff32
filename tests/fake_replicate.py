"""A fake Replicate API for tests, served over real TLS on 127.0.0.1.

It follows the shapes of Replicate's documented HTTP API (v1): prediction
objects with ``id, version, input, status (starting|processing|succeeded|
failed|canceled), created_at, started_at, completed_at, error, logs, output,
metrics.predict_time, urls.get, urls.cancel``; create answers 201, cancel
answers the prediction, unknown ids answer 404 with a problem-details body
``{"title", "detail", "status"}``; ``GET /v1/account`` answers the account; ``GET /v1/webhooks/default/secret``
answers ``{"key": "whsec_…"}``.

Failure modes for tests: ``mode = "ok" | "fail" (500) | "throttle" (429 with
Retry-After) | "stall" (accepts the request, never answers)``.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field

import trustme
from twisted.internet import ssl
from twisted.internet.endpoints import SSL4ServerEndpoint
from twisted.web import server
from twisted.web.resource import Resource

PREDICTION_STATUSES = ("starting", "processing", "succeeded", "failed", "canceled")


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict
    body: object


@dataclass
class FakeReplicateState:
    token: str = "r8_test_token"
    mode: str = "ok"
    retry_after: str = "1"
    predictions: dict = field(default_factory=dict)
    requests: list = field(default_factory=list)
    stalled: list = field(default_factory=list)
    base_url: str = ""
    # Signing secret answered by GET /v1/webhooks/default/secret.
    webhook_secret: str = "whsec_c3RkYWVtb24tdGVzdHMtd2ViaG9vay1zZWNyZXQ="
    _ids: itertools.count = field(default_factory=lambda: itertools.count(1))

    def add_prediction(self, version: str, input_: dict, webhook=None, events=None) -> dict:
        pid = f"fake{next(self._ids):08d}rep"
        prediction = {
            "id": pid,
            "model": "simpletuner/trainer",
            "version": version,
            "input": input_,
            "logs": "",
            "output": None,
            "data_removed": False,
            "error": None,
            "status": "starting",
            "created_at": "2026-01-01T00:00:00.000000Z",
            "started_at": None,
            "completed_at": None,
            "metrics": {},
            "webhook": webhook,
            "webhook_events_filter": events,
            "urls": {
                "get": f"{self.base_url}/v1/predictions/{pid}",
                "cancel": f"{self.base_url}/v1/predictions/{pid}/cancel",
                "web": f"https://replicate.com/p/{pid}",
            },
        }
        self.predictions[pid] = prediction
        return prediction

    def set_status(self, pid: str, status: str, *, predict_time=None, logs=None,
                   error=None, output=None) -> dict:
        assert status in PREDICTION_STATUSES
        prediction = self.predictions[pid]
        prediction["status"] = status
        if status != "starting" and prediction["started_at"] is None:
            prediction["started_at"] = "2026-01-01T00:00:05.000000Z"
        if status in ("succeeded", "failed", "canceled"):
            prediction["completed_at"] = "2026-01-01T01:00:00.000000Z"
        if predict_time is not None:
            prediction["metrics"] = {"predict_time": predict_time}
        if logs is not None:
            prediction["logs"] = logs
        if error is not None:
            prediction["error"] = error
        if output is not None:
            prediction["output"] = output
        return prediction

    def requests_to(self, method: str, path_prefix: str) -> list:
        return [r for r in self.requests if r.method == method and r.path.startswith(path_prefix)]


def _problem(request, status: int, title: str, detail: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/problem+json")
    return json.dumps({"title": title, "detail": detail, "status": status}).encode()


class _Root(Resource):
    isLeaf = True

    def __init__(self, state: FakeReplicateState):
        super().__init__()
        self.state = state

    def render(self, request):
        state = self.state
        method = request.method.decode()
        path = request.path.decode()
        raw = request.content.read()
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        state.requests.append(RecordedRequest(method, path, headers, body))

        if state.mode == "stall":
            state.stalled.append(request)
            return server.NOT_DONE_YET
        if state.mode == "fail":
            return _problem(request, 500, "Internal Server Error", "fake replicate is failing")
        if state.mode == "throttle":
            request.setHeader(b"retry-after", state.retry_after.encode())
            return _problem(request, 429, "Too Many Requests", "Request was throttled.")
        if headers.get("authorization") != f"Bearer {state.token}":
            return _problem(request, 401, "Unauthenticated",
                            "You did not pass a valid authentication token")

        request.setHeader(b"content-type", b"application/json")
        parts = [p for p in path.split("/") if p]
        if parts == ["v1", "account"] and method == "GET":
            return json.dumps({"type": "organization", "username": "stdaemon-tests",
                               "name": "stdaemon tests", "github_url": None}).encode()
        if parts == ["v1", "webhooks", "default", "secret"] and method == "GET":
            return json.dumps({"key": state.webhook_secret}).encode()
        if parts == ["v1", "predictions"] and method == "POST":
            if not isinstance(body, dict) or not body.get("version") or not isinstance(body.get("input"), dict):
                request.setResponseCode(422)
                return json.dumps({"title": "Input validation failed", "status": 422,
                                   "detail": "- version: Invalid version or not permitted",
                                   "invalid_fields": [{"type": "required", "field": "version",
                                                       "description": "version is required"}]}).encode()
            if body["version"] == "forbidden-version":
                return _problem(request, 403, "Forbidden",
                                "You do not have permission to use this model version")
            prediction = state.add_prediction(body["version"], body["input"], body.get("webhook"),
                                              body.get("webhook_events_filter"))
            request.setResponseCode(201)
            return json.dumps(prediction).encode()
        if len(parts) >= 3 and parts[:2] == ["v1", "predictions"]:
            prediction = state.predictions.get(parts[2])
            if prediction is None:
                return _problem(request, 404, "Not found", "Not found.")
            if len(parts) == 3 and method == "GET":
                return json.dumps(prediction).encode()
            if len(parts) == 4 and parts[3] == "cancel" and method == "POST":
                if prediction["status"] in ("starting", "processing"):
                    state.set_status(parts[2], "canceled")
                return json.dumps(prediction).encode()
        return _problem(request, 404, "Not found", "Not found.")


class FakeReplicate:
    """The running fake: ``url``, ``state``, ``ca`` (trustme CA) and helpers."""

    def __init__(self, reactor, state: FakeReplicateState | None = None):
        self.reactor = reactor
        self.state = state or FakeReplicateState()
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("127.0.0.1", "localhost")
        self.port = None
        self.url = ""

    def write_ca_bundle(self, path, *extra_pems: bytes) -> str:
        """Write a PEM bundle: ``extra_pems`` first, then this server's CA."""
        data = b"".join(extra_pems) + self.ca.cert_pem.bytes()
        with open(path, "wb") as handle:
            handle.write(data)
        return str(path)

    async def start(self):
        pem = self.cert.private_key_and_cert_chain_pem.bytes()
        options = ssl.PrivateCertificate.loadPEM(pem).options()
        site = server.Site(_Root(self.state))
        site.displayTracebacks = False
        endpoint = SSL4ServerEndpoint(self.reactor, 0, options, interface="127.0.0.1")
        self.port = await endpoint.listen(site)
        self.url = f"https://127.0.0.1:{self.port.getHost().port}"
        self.state.base_url = self.url
        return self

    async def stop(self):
        for request in self.state.stalled:
            if request.channel is not None and request.channel.transport is not None:
                request.channel.transport.abortConnection()
        self.state.stalled.clear()
        if self.port is not None:
            await self.port.stopListening()
            self.port = None
