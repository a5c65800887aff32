"""A public stand-in surface for every rate-limited path of the guide's table, so
rate-limit tests cover each row whatever surfaces exist yet."""

import pytest
from klein import Klein
from twisted.internet import defer

import stdaemon.service as service_module
from stdaemon.http.surface import PUBLIC, Surface, route


class ProbeSurface(Surface):
    """Public stand-ins for the limited paths, so every row is tested whatever
    surfaces exist yet."""

    app = Klein()
    prefixes = ("/api",)

    @route(app, "/api/auth/login", methods=["GET", "POST"], access=PUBLIC)
    def login(self, request):
        return {"ok": True}

    @route(app, "/api/auth/register", methods=["POST"], access=PUBLIC)
    def register(self, request):
        return {"ok": True}

    @route(app, "/api/auth/api-keys", methods=["POST"], access=PUBLIC)
    def api_keys(self, request):
        return {"ok": True}

    @route(app, "/api/cloud/jobs/submit", methods=["POST"], access=PUBLIC)
    def submit(self, request):
        return {"ok": True}

    @route(app, "/api/cloud/jobs", methods=["GET", "POST"], access=PUBLIC)
    def jobs(self, request):
        return {"ok": True}

    @route(app, "/api/cloud/jobs/<job_id>/cancel", methods=["POST"], access=PUBLIC)
    def cancel(self, request, job_id):
        return {"ok": True}

    @route(app, "/api/webhooks/<provider>", methods=["POST"], access=PUBLIC)
    def webhook(self, request, provider):
        return {"ok": True}

    @route(app, "/api/cloud/storage/<path:rest>", methods=["GET", "PUT"], access=PUBLIC)
    def storage(self, request, rest):
        return {"ok": True}

    @route(app, "/api/quotas/<path:rest>", methods=["GET"], access=PUBLIC)
    def quotas(self, request, rest):
        return {"ok": True}

    @route(app, "/api/probe/other", methods=["GET", "POST"], access=PUBLIC)
    def other(self, request):
        return {"ok": True}

    @route(app, "/api/cloud/providers", methods=["GET", "PUT"], access=PUBLIC)
    def providers(self, request):
        return {"ok": True}

    @route(app, "/api/cloud/hints", access=PUBLIC)
    def hints(self, request):
        return {"ok": True}

    @route(app, "/api/users/me", access=PUBLIC)
    def me(self, request):
        return {"ok": True}

    @route(app, "/api/events/stream", access=PUBLIC)
    def stream(self, request):
        return {"ok": True}

    @route(app, "/static/<path:name>", access=PUBLIC)
    def static(self, request, name):
        return {"ok": True}


class FakeAudit:
    def __init__(self):
        self.entries = []

    async def record(self, event_type, **fields):
        self.entries.append(dict(fields, event_type=event_type))

    def record_soon(self, event_type, sampled=False, **fields):
        return defer.ensureDeferred(self.record(event_type, **fields))


@pytest.fixture
def probed(monkeypatch):
    original = service_module.build_surfaces
    monkeypatch.setattr(service_module, "build_surfaces",
                        lambda ctx: [ProbeSurface(ctx)] + original(ctx))
