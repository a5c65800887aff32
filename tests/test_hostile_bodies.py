"""Hostile request bodies and queries (S19): every case is a 400 JSON ``{error, detail, field}``,
never a 5xx, against a real daemon."""

from __future__ import annotations

import json

import pytest_twisted
import treq

from tests.authhelpers import call, create_user, user_key

DEEP = b"[" * 5_000 + b"]" * 5_000
DEEP_OBJECT = b"{\"a\":" * 2_000 + b"1" + b"}" * 2_000


def assert_400(response, body, field=None):
    assert response.code == 400, (response.code, body)
    assert isinstance(body, dict), body
    assert body["error"] and body["detail"], body
    assert "Traceback" not in json.dumps(body)
    if field is not None:
        assert body.get("field") == field, body


@pytest_twisted.ensureDeferred
async def test_deeply_nested_json_is_400_also_unauthenticated(daemon):
    for path, key in (("/api/auth/login", None), ("/api/cloud/jobs/submit", daemon.admin_key),
                      ("/api/users", daemon.admin_key), ("/api/quotas", daemon.admin_key),
                      ("/api/cloud/providers/replicate", daemon.admin_key)):
        for raw in (DEEP, DEEP_OBJECT, b'{"config":' + DEEP + b"}"):
            method = "PUT" if path.startswith("/api/cloud/providers") else "POST"
            response, body = await call(daemon, method, path, raw, key=key,
                                        headers={"Origin": daemon.url, "Content-Type": "application/json"})
            assert_400(response, body)
            assert body["error"] == "invalid_json", body


@pytest_twisted.ensureDeferred
async def test_lone_surrogates_are_400(daemon):
    for path, raw in (("/api/users", b'{"username": "a\\ud800b", "email": "x@example.test", '
                                     b'"password": "correct horse battery"}'),
                      ("/api/auth/api-keys", b'{"name": "\\udc00"}'),
                      ("/api/cloud/jobs/submit", b'{"config": {"x": "\\ud83d"}}'),
                      ("/api/approvals/rules", b'{"name": "\\ud800", "condition": "cost_exceeds", "value": 1}')):
        response, body = await call(daemon, "POST", path, raw, key=daemon.admin_key)
        assert_400(response, body)


@pytest_twisted.ensureDeferred
async def test_hardware_profile_of_the_wrong_type_is_400(daemon):
    for profile in ({"a": 1}, ["h100"], 7, True):
        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit",
                                    {"config": {}, "hardware_profile": profile}, key=daemon.admin_key)
        assert_400(response, body, field="hardware_profile")
        assert body["success"] is False
    response, body = await call(daemon, "POST", "/api/approvals/rules",
                                {"name": "r", "condition": "hardware_profile", "value": {"a": 1}},
                                key=daemon.admin_key)
    assert_400(response, body, field="value")


@pytest_twisted.ensureDeferred
async def test_offsets_and_limits_out_of_range_are_400(daemon):
    for path in ("/api/cloud/jobs", "/api/approvals", "/api/audit"):
        for query in ("offset=9223372036854775808", "offset=99999999999999999999999", "offset=-1",
                      "limit=0", "limit=100000", "limit=abc"):
            response, body = await call(daemon, "GET", f"{path}?{query}", key=daemon.admin_key)
            assert_400(response, body, field=query.split("=")[0])
            assert body["error"] == "invalid_query"


@pytest_twisted.ensureDeferred
async def test_huge_user_ids_in_bodies_are_400(daemon):
    for huge in (2 ** 63, 2 ** 70, -1, 0):
        response, body = await call(daemon, "POST", "/api/auth/api-keys", {"name": "k", "user_id": huge},
                                    key=daemon.admin_key)
        assert_400(response, body, field="user_id")
        response, body = await call(daemon, "POST", "/api/quotas",
                                    {"quota_type": "concurrent_jobs", "limit": 1, "user_id": huge},
                                    key=daemon.admin_key)
        assert_400(response, body, field="user_id")
    response, body = await call(daemon, "DELETE", "/api/auth/api-keys", {"id": 2 ** 70}, key=daemon.admin_key)
    assert response.code in (400, 404), body


@pytest_twisted.ensureDeferred
async def test_over_long_restore_names_and_paths_are_400(daemon):
    for body_in in ({"name": "a" * 5000}, {"name": "b" * 300 + ".db"}, {"path": "/" + "c" * 5000 + ".db"},
                    {"name": 5}, {"name": "x\u0000y.db"}):
        response, body = await call(daemon, "POST", "/api/admin/backups/restore", body_in, key=daemon.admin_key)
        assert_400(response, body)
    response, body = await call(daemon, "POST", "/api/admin/backups", {"path": "/" + "d" * 5000 + ".db"},
                                key=daemon.admin_key)
    assert_400(response, body, field="path")
    response, body = await call(daemon, "POST", "/api/admin/backups", {}, key=daemon.admin_key)
    assert response.code == 201, body   # the backup directory exists: names reach the file system
    for method, path in (("DELETE", "/api/backup/" + "e" * 3000), ("GET", "/api/backup/" + "f" * 300),
                         ("POST", "/api/backup/" + "g" * 300 + "/restore")):
        response, body = await call(daemon, method, path, key=daemon.admin_key)
        assert response.code in (400, 404), (method, response.code, body)
        assert body["error"] and body["detail"]


@pytest_twisted.ensureDeferred
async def test_wrong_types_are_400_naming_the_field(daemon):
    viewer = await create_user(daemon, "vic", "viewer")
    cases = [
        ("POST", "/api/auth/login", {"username": ["a"], "password": "x"}, "username"),
        ("POST", "/api/auth/login", {"username": "a", "password": {"p": 1}}, "password"),
        ("PUT", "/api/auth/settings", {"registration_enabled": "yes"}, "registration_enabled"),
        ("POST", "/api/auth/api-keys", {"name": 5}, "name"),
        ("POST", "/api/auth/api-keys", {"name": "k", "expires_days": "7"}, "expires_days"),
        ("POST", "/api/users", {"username": 1, "email": "e@example.test", "password": "correct horse battery"},
         "username"),
        ("PATCH", f"/api/users/{viewer['id']}", {"disabled": "no"}, "disabled"),
        ("POST", "/api/admin/backups", {"compress": "yes"}, "compress"),
        ("POST", "/api/quotas", {"quota_type": "nope", "limit": 1}, "quota_type"),
        ("PUT", "/api/cloud/metrics/config", {"prometheus_enabled": "true"}, "prometheus_enabled"),
        ("POST", "/api/cloud/jobs/submit", {"config": []}, "config"),
        ("POST", "/api/cloud/jobs/submit", {"config": {}, "idempotency_key": 5}, "idempotency_key"),
    ]
    for method, path, body_in, field in cases:
        response, body = await call(daemon, method, path, body_in, key=daemon.admin_key,
                                    headers={"Origin": daemon.url})
        assert_400(response, body, field=field)
    response = await treq.get(daemon.url + "/api/cloud/health/ready")
    assert response.code == 200
    await response.content()


@pytest_twisted.ensureDeferred
async def test_fields_the_cli_sends_are_tolerated(daemon):
    """Extra fields the original server ignored are still ignored (SimpleTuner's CLI sends them)."""
    response, body = await call(daemon, "POST", "/api/auth/login",
                                {"username": "nobody", "password": "wrong password", "remember_me": True},
                                headers={"Origin": daemon.url})
    assert response.code == 401, body
    response, body = await call(daemon, "POST", "/api/auth/api-keys",
                                {"name": "cli", "scopes": ["jobs"], "description": "from the CLI"},
                                key=daemon.admin_key)
    assert response.code == 201, body
    key = await user_key(daemon, (await create_user(daemon, "olga", "operator"))["id"], "operator")
    response, body = await call(daemon, "GET", "/api/cloud/jobs?limit=5&offset=0&unknown=1&status=", key=key)
    assert response.code == 200, body
    assert body["limit"] == 5


@pytest_twisted.ensureDeferred
async def test_hostile_webhook_bodies_are_400(daemon):
    response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate",
                                {"webhook_require_signature": False}, key=daemon.admin_key)
    assert response.code == 200, body
    for raw in (DEEP, DEEP_OBJECT, b'{"id": "p", "status": "\\ud800"}', b"[1]", b"\xff"):
        response, body = await call(daemon, "POST", "/api/webhooks/replicate", raw,
                                    headers={"Content-Type": "application/json"})
        assert_400(response, body)
        assert body["error"] == "invalid_json", body
    # A trainer event is authenticated by its job's token, after the body is looked at: still 400.
    for path in ("/api/webhooks/simpletuner", "/api/webhooks/replicate"):
        for raw in (DEEP, DEEP_OBJECT):
            response, body = await call(daemon, "POST", path, raw,
                                        headers={"Content-Type": "application/json", "X-API-Key": "st_x"})
            assert response.code in (400, 401), (path, response.code, body)
            assert body["error"] and body["detail"], body


@pytest_twisted.ensureDeferred
async def test_numbers_out_of_range_are_400(daemon):
    for raw in (b'{"config": {"lr": 1e400}}', b'{"config": {"steps": ' + b"9" * 5000 + b"}}",
                b'{"config": {"x": [1, -1e999]}}'):
        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit", raw, key=daemon.admin_key)
        assert_400(response, body)
        assert body["error"] == "invalid_json"



def test_query_models_read_the_url_only():
    """twisted.web merges a form-encoded POST body into ``request.args``: query models read the
    URL's query string only."""
    from twisted.web.test.requesthelper import DummyRequest

    from stdaemon.http import validation
    from stdaemon.jobs.http import ListJobs

    request = DummyRequest([b"api", b"cloud", b"jobs"])
    request.uri = b"/api/cloud/jobs?limit=5&status="
    request.args = {b"limit": [b"7"], b"offset": [b"3"], b"status": [b"running"]}   # as a form body adds
    query = validation.validate_query(request, ListJobs)
    assert (query.limit, query.offset, query.status) == (5, 0, None)
