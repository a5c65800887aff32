"""The root and the route decorator, driven through treq's StubTreq."""

from __future__ import annotations

import json

import pytest
from klein import Klein
from treq.testing import StubTreq
from pydantic import ConfigDict
from twisted.internet import task

from stdaemon.health.service import HealthRegistry
from stdaemon.http.errors import ApiError, invalid_field
from stdaemon.http.dispatch import UnprotectedRoute
from stdaemon.http.root import Root
from stdaemon.http.surface import ADMIN, OPERATOR, PUBLIC, VIEWER, Response, Surface, route
from stdaemon.http.validation import BodyModel
from stdaemon.metrics.service import Metrics
from stdaemon.users.api_keys import Principal


class Echo(BodyModel):
    """Any JSON object (extra fields are kept by ``given()``)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class Sample(Surface):
    app = Klein()
    prefixes = ("/sample",)

    @route(app, "/sample/public", access=PUBLIC)
    def public(self, request):
        return {"principal": request.principal.username if request.principal else None}

    @route(app, "/sample/echo", methods=["POST"], access=VIEWER, body=Echo)
    def echo(self, request, body):
        given = body.given()
        if "bad" in given:
            raise invalid_field("bad", "must not be present")
        return Response({"got": given, "by": request.principal.username}, status=201)

    @route(app, "/sample/admin", methods=["DELETE"])
    def admin_only(self, request):
        return {"ok": True}

    @route(app, "/sample/operator/<int:number>", methods=["PUT"], access=OPERATOR)
    async def operator(self, request, number):
        return {"number": number}

    @route(app, "/sample/crash", access=ADMIN)
    def crash(self, request):
        raise KeyError("secret internals")


class FakeAuth:
    KEYS = {
        "st_viewer": Principal(1, "vera", "viewer"),
        "st_operator": Principal(2, "otto", "operator"),
        "st_admin": Principal(3, "ada", "admin"),
    }

    async def authenticate(self, request):
        return self.KEYS.get(request.getHeader("x-api-key") or "")


class FakeCtx:
    def __init__(self):
        from tests.conftest import build_config
        import tempfile

        self.config = build_config(tempfile.mkdtemp())
        self.clock = task.Clock()
        self.auth = FakeAuth()
        self.metrics = Metrics(self.clock)
        self.health = HealthRegistry(self.clock)
        self.trusted_proxies = ()


@pytest.fixture
def stub():
    ctx = FakeCtx()
    root = Root(ctx, [Sample(ctx)])
    return StubTreq(root), ctx


def call(stub, method, path, key=None, body=None):
    client, _ = stub
    headers = {"X-API-Key": key} if key else {}
    response = client.request(method, "http://example/" + path.lstrip("/"), headers=headers,
                              data=body)
    result = []
    response.addCallback(result.append)
    client.flush()
    (resp,) = result
    content = []
    client.content(resp).addCallback(content.append)
    client.flush()
    return resp.code, json.loads(content[0]) if content[0] else None, resp


def test_public_route_needs_no_key_but_sees_one(stub):
    assert call(stub, "GET", "/sample/public")[:2] == (200, {"principal": None})
    assert call(stub, "GET", "/sample/public", key="st_admin")[:2] == (200, {"principal": "ada"})


def test_roles_are_enforced_before_the_handler(stub):
    code, body, resp = call(stub, "POST", "/sample/echo", body=b"{}")
    assert code == 401 and body["error"] == "unauthorized"
    assert resp.headers.getRawHeaders("www-authenticate")
    assert call(stub, "POST", "/sample/echo", key="st_viewer", body=b'{"a":1}')[:2] == \
        (201, {"got": {"a": 1}, "by": "vera"})
    assert call(stub, "PUT", "/sample/operator/7", key="st_viewer")[0] == 403
    assert call(stub, "PUT", "/sample/operator/7", key="st_operator")[:2] == (200, {"number": 7})
    assert call(stub, "DELETE", "/sample/admin", key="st_operator")[0] == 403
    assert call(stub, "DELETE", "/sample/admin", key="st_admin")[0] == 200


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"", b"\xff\xfe"])
def test_bad_json_is_a_400_not_a_500(stub, body):
    code, answer, _ = call(stub, "POST", "/sample/echo", key="st_viewer", body=body)
    assert code == 400 and answer["error"] == "invalid_json" and answer["detail"]


def test_invalid_field_names_the_field(stub):
    code, body, _ = call(stub, "POST", "/sample/echo", key="st_viewer", body=b'{"bad": 1}')
    assert code == 400 and body["field"] == "bad" and body["detail"].startswith("bad:")


def test_unexpected_exception_is_a_json_500_without_traceback(stub):
    code, body, resp = call(stub, "GET", "/sample/crash", key="st_admin")
    assert code == 500
    assert body == {"error": "internal_error", "detail": "Internal server error"}


def test_metrics_use_route_templates_not_raw_paths(stub):
    _, ctx = stub
    for n in range(3):
        call(stub, "PUT", f"/sample/operator/{n}", key="st_operator")
    assert ctx.metrics.http_requests["PUT_/sample/operator/<int:number>"][0] == 3
    call(stub, "GET", "/nothing/here")
    assert "GET_unmatched" in ctx.metrics.http_requests


def test_a_route_without_access_policy_is_refused_at_mount():
    class Sneaky(Surface):
        app = Klein()

        @app.route("/sneaky")
        def sneaky(self, request):
            return b"secret"

    with pytest.raises(UnprotectedRoute):
        Root(FakeCtx(), [Sneaky(FakeCtx())])


def test_api_error_carries_extra_fields_and_headers():
    error = ApiError(503, "breaker_open", "Provider unavailable", headers={"Retry-After": "30"},
                     provider="replicate")
    assert error.body() == {"error": "breaker_open", "detail": "Provider unavailable",
                            "provider": "replicate"}
    assert error.headers == {"Retry-After": "30"}


def test_route_declarations_compile_no_url_builders_until_one_is_asked_for(monkeypatch):
    """werkzeug compiles two URL builders per rule when it joins a map; a surface's rules compile
    theirs only when a URL is built (start-up cost), and building a URL still works."""
    from werkzeug.routing import Rule

    compiled: list = []
    original = Rule._compile_builder

    def counting(self, append_unknown=True):
        compiled.append(self.rule)
        return original(self, append_unknown)

    monkeypatch.setattr(Rule, "_compile_builder", counting)

    class Lazy(Surface):
        app = Klein()

        @route(app, "/api/lazy/<int:item>", access=PUBLIC)
        def item(self, request, item):
            return {"item": item}

    rules = list(Lazy.app.url_map.iter_rules())
    assert [r.rule for r in rules] == ["/api/lazy/<int:item>"]
    assert compiled == []
    adapter = Lazy.app.url_map.bind("localhost")
    assert adapter.match("/api/lazy/7") == (rules[0].endpoint, {"item": 7})
    assert compiled == []
    assert adapter.build(rules[0].endpoint, {"item": 7}) == "/api/lazy/7"
    assert adapter.build(rules[0].endpoint, {"item": 8, "extra": "x"}) == "/api/lazy/8?extra=x"
    assert compiled == ["/api/lazy/<int:item>"]  # the one builder asked for, once
    assert adapter.build(rules[0].endpoint, {"item": 9}, append_unknown=False) == "/api/lazy/9"
    assert compiled == ["/api/lazy/<int:item>"] * 2
