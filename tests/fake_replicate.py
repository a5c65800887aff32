"""A fake Replicate API for tests, served over real TLS on 127.0.0.1.

It follows the shapes of Replicate's documented HTTP API (v1): prediction
objects with ``id, version, input, status (starting|processing|succeeded|
failed|canceled), created_at, started_at, completed_at, error, logs, output,
metrics.predict_time, urls.get, urls.cancel``; create answers 201, cancel
answers the prediction, unknown ids answer 404 with a problem-details body
``{"title", "detail", "status"}``; ``GET /v1/account`` answers the account; ``GET /v1/webhooks/default/secret``
answers ``{"key": "whsec_…"}``; ``GET /v1/models/{owner}/{name}`` answers the model
with its ``latest_version`` and ``GET /v1/models/{owner}/{name}/versions`` the
``{"next", "previous", "results"}`` page, newest first (every SimpleTuner
``simpletuner/advanced-trainer-<profile>`` model exists with two versions;
``state.models`` holds them, ``add_version`` publishes a newer one).

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
PROFILES = ("h100", "h100-x2", "h100-x4", "h100-x8", "l40s", "l40s-x2", "l40s-x4", "l40s-x8")


def _version_id(model_id: str, n: int) -> str:
    import hashlib

    return hashlib.sha256(f"{model_id}#{n}".encode()).hexdigest()


def _default_models() -> dict:
    models = {}
    for profile in PROFILES:
        model_id = f"simpletuner/advanced-trainer-{profile}"
        models[model_id] = [  # oldest first; answered newest first
            {"id": _version_id(model_id, n), "created_at": f"2026-0{n}-01T12:00:00.000000Z",
             "cog_version": "0.14.0", "openapi_schema": {}}
            for n in (1, 2)
        ]
    return models


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
    # Replicate models: "owner/name" -> versions, oldest first.
    models: dict = field(default_factory=_default_models)
    # When set, answers GET /v1/models/... with latest_version null (only the list knows).
    hide_latest_version: bool = False
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

    def newest_version(self, model_id: str) -> dict:
        return self.models[model_id][-1]

    def add_version(self, model_id: str, created_at: str) -> dict:
        versions = self.models.setdefault(model_id, [])
        version = {"id": _version_id(model_id, len(versions) + 1), "created_at": created_at,
                   "cog_version": "0.14.0", "openapi_schema": {}}
        versions.append(version)
        return version

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
        if len(parts) in (4, 5) and parts[:2] == ["v1", "models"] and method == "GET":
            model_id = f"{parts[2]}/{parts[3]}"
            versions = state.models.get(model_id)
            if versions is None:
                return _problem(request, 404, "Not found", "Not found.")
            newest_first = list(reversed(versions))
            if len(parts) == 5 and parts[4] == "versions":
                return json.dumps({"next": None, "previous": None, "results": newest_first}).encode()
            if len(parts) == 4:
                latest = None if state.hide_latest_version or not versions else newest_first[0]
                return json.dumps({"url": f"https://replicate.com/{model_id}", "owner": parts[2],
                                   "name": parts[3], "visibility": "public", "run_count": 0,
                                   "latest_version": latest}).encode()
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
            if ":" in body["version"]:  # owner/name:version_id
                model_id, vid = body["version"].rsplit(":", 1)
                known = [v["id"] for v in state.models.get(model_id, [])]
                if vid not in known:
                    del state.predictions[prediction["id"]]
                    request.setResponseCode(422)
                    return json.dumps({"title": "Invalid version", "status": 422,
                                       "detail": f"Version {vid} of {model_id} does not exist"}).encode()
                prediction["model"] = model_id
                prediction["version"] = vid
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
