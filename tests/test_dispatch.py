"""The dispatch table: one match per request, the same answer as matching each surface in turn."""

from __future__ import annotations

import re

import pytest
import treq
import pytest_twisted
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import RequestRedirect

from stdaemon.http.errors import ApiError

_CONVERTER = re.compile(r"<(?:(\w+)(?:\([^)]*\))?:)?(\w+)>")
SAMPLES = {"int": "7", "path": "a/b.txt", "default": "x1"}


def sample_path(template: str) -> str:
    return _CONVERTER.sub(lambda m: SAMPLES.get(m.group(1) or "default", "x1"), template)


def surface_by_surface(surfaces, method, path):
    """The former algorithm: each surface's own map in turn; the first full match wins."""
    allowed = set()
    for surface in surfaces:
        adapter = surface.app.url_map.bind("localhost", path_info=path, default_method=method)
        try:
            rule, args = adapter.match(return_rule=True)
        except NotFound:
            continue
        except MethodNotAllowed as e:
            allowed.update(e.valid_methods or ())
            continue
        except RequestRedirect:
            continue
        return ("match", rule.endpoint, args)
    return ("405", tuple(sorted(allowed))) if allowed else ("404",)


def one_table(root, method, path):
    try:
        match = root.match(method, path)
    except ApiError as error:
        if error.status == 405:
            return ("405", tuple(sorted(error.headers["Allow"].split(", "))))
        return (str(error.status),)
    return ("match", match.endpoint, match.args)


def test_the_one_table_matches_like_each_surface_in_turn(daemon):
    root = daemon.service.root
    surfaces = root.surfaces
    paths = {sample_path(template) for template, _, _, _ in root.routes()}
    paths |= {p.rstrip("/") + "/" for p in paths} | {p + "/extra" for p in paths}
    paths |= {"/", "/api", "/api/cloud", "/nothing", "/api/cloud/storage", "/api/cloud/storage/outputs",
              "/api/cloud/jobs/", "//api/cloud/health/live", "/health/"}
    checked = 0
    for _ in range(2):   # the second pass is answered from the kept matches of paths with parameters
        for path in sorted(paths):
            for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
                assert one_table(root, method, path) == surface_by_surface(surfaces, method, path), \
                    (method, path)
                checked += 1
    assert root.dispatch._recent
    # every declared route was found through the table at least once
    endpoints = {endpoint for _, _, endpoint, _ in root.routes()}
    found = {root.match(m, sample_path(t)).endpoint for t, ms, _, _ in root.routes() for m in ms[:1]}
    assert found == endpoints
    assert checked > 1000


def test_kept_matches_are_bounded_and_hand_out_their_own_arguments(daemon, monkeypatch):
    from stdaemon.http import dispatch as dispatch_module

    dispatch = daemon.service.root.dispatch
    first = dispatch.match("GET", "/api/cloud/jobs/abc")
    first.args["job_id"] = "changed by a handler"
    again = dispatch.match("GET", "/api/cloud/jobs/abc")
    assert again.args == {"job_id": "abc"} and again.endpoint == first.endpoint
    monkeypatch.setattr(dispatch_module, "RECENT_MATCHES", 8)
    dispatch._recent.clear()
    for n in range(50):
        assert dispatch.match("GET", f"/api/cloud/jobs/j{n}").args == {"job_id": f"j{n}"}
        assert len(dispatch._recent) <= 8


def test_where_surfaces_overlap_the_first_surface_keeps_the_path():
    from klein import Klein

    from stdaemon.http.root import Root
    from stdaemon.http.surface import PUBLIC, Surface, route
    from tests.test_surface import FakeCtx

    class First(Surface):
        app = Klein()

        @route(app, "/x/<path:rest>", methods=["GET", "PUT"], access=PUBLIC)
        def anything(self, request, rest):
            return {}

        @route(app, "/y/<name>", access=PUBLIC)
        def y(self, request, name):
            return {}

    class Second(Surface):
        app = Klein()

        @route(app, "/x/<bucket>/<path:key>", methods=["GET", "PUT", "DELETE"], access=PUBLIC)
        def specific(self, request, bucket, key):
            return {}

        @route(app, "/x/fixed", access=PUBLIC)
        def fixed(self, request):
            return {}

        @route(app, "/y/<int:number>", methods=["GET", "POST"], access=PUBLIC)
        def y_number(self, request, number):
            return {}

    ctx = FakeCtx()
    surfaces = [First(ctx), Second(ctx)]
    root = Root(ctx, surfaces)
    for path in ("/x/a/b", "/x/fixed", "/x/a", "/y/7", "/y/a", "/x/", "/z"):
        for method in ("GET", "PUT", "DELETE", "POST"):
            assert one_table(root, method, path) == surface_by_surface(surfaces, method, path), \
                (method, path)
    assert root.match("PUT", "/x/a/b").endpoint.endswith("First.anything")
    assert root.match("DELETE", "/x/a/b").endpoint.endswith("Second.specific")


@pytest_twisted.ensureDeferred
async def test_the_match_taken_with_the_headers_is_the_one_the_handler_runs_with(daemon):
    root = daemon.service.root
    calls = []
    original = root._match_raw

    def counting(method, uri):
        calls.append((method, uri))
        return original(method, uri)

    root._match_raw = counting
    try:
        response = await treq.get(f"{daemon.url}/api/cloud/health/live")
        assert response.code == 200 and (await response.json()) == {"status": "ok"}
        response = await treq.get(f"{daemon.url}/api/cloud/jobs/nope", headers=daemon.admin_headers)
        assert response.code == 404 and (await response.json())["error"] == "not_found"
        response = await treq.post(f"{daemon.url}/api/cloud/health/live")
        assert response.code == 405 and (await response.json())["error"] == "method_not_allowed"
    finally:
        del root._match_raw
    assert [uri for _, uri in calls] == [b"/api/cloud/health/live", b"/api/cloud/jobs/nope",
                                         b"/api/cloud/health/live"]


@pytest_twisted.ensureDeferred
async def test_a_path_whose_escapes_are_not_utf8_is_a_json_400(daemon):
    response = await treq.get(f"{daemon.url}/api/cloud/jobs/%ff%fe", headers=daemon.admin_headers)
    assert response.code == 400
    assert (await response.json())["error"] == "invalid_path"


@pytest_twisted.ensureDeferred
async def test_generated_correlation_ids_are_distinct_and_an_incoming_one_is_echoed(daemon):
    seen = set()
    for _ in range(5):
        response = await treq.get(f"{daemon.url}/health")
        await response.content()
        seen.add(response.headers.getRawHeaders("x-correlation-id")[0])
    assert len(seen) == 5 and all(re.fullmatch(r"[0-9a-f]{32}", cid) for cid in seen)
    response = await treq.get(f"{daemon.url}/health", headers={"X-Correlation-ID": "abc-123"})
    await response.content()
    assert response.headers.getRawHeaders("x-correlation-id") == ["abc-123"]


@pytest_twisted.ensureDeferred
async def test_the_request_debug_line_is_built_only_when_an_observer_keeps_debug(daemon, monkeypatch):
    from twisted.logger import globalLogPublisher

    from stdaemon import logs

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        for wanted in (False, True):
            monkeypatch.setattr(logs, "_debug_wanted", wanted)
            response = await treq.get(f"{daemon.url}/api/cloud/health/live?w={int(wanted)}")
            await response.content()
    finally:
        globalLogPublisher.removeObserver(events.append)
    lines = [e for e in events if e.get("log_namespace") == "stdaemon.http" and e.get("status") == 200
             and "/api/cloud/health/live" in str(e.get("path", ""))]
    assert len(lines) == 1 and lines[0]["log_level"].name == "debug"
    # and with debug kept, make_observer says so
    assert logs.make_observer("DEBUG") is not None and logs.debug_enabled()
