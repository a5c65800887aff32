"""Every route's permission enforced server-side (S12), and the console's static files (S15)."""

from __future__ import annotations

import re

import pytest_twisted
import treq

from stdaemon.http.surface import Access
from tests.authhelpers import call, create_user, login, user_key

CHANGING = ("POST", "PUT", "PATCH", "DELETE")


def concrete(template: str) -> str:
    return re.sub(r"<[^>]+>", "1", template)


async def keys_for(daemon):
    viewer = await create_user(daemon, "viewer1", "viewer")
    operator = await create_user(daemon, "operator1", "operator")
    return (viewer, await user_key(daemon, viewer["id"], "viewer"),
            operator, await user_key(daemon, operator["id"], "operator"))


@pytest_twisted.ensureDeferred
async def test_viewer_cannot_change_anything_and_operator_cannot_administer(daemon):
    viewer, viewer_key, operator, operator_key = await keys_for(daemon)
    routes = daemon.service.root.routes()
    checked_viewer = checked_operator = 0
    for template, methods, endpoint, info in routes:
        path = concrete(template)
        for method in methods:
            if info.access == Access.PUBLIC:
                continue
            body = {} if method in CHANGING else None
            if method in CHANGING or info.access > Access.VIEWER:
                response, answer = await call(daemon, method, path, body, key=viewer_key)
                assert response.code == 403, (method, template, response.code, answer)
                checked_viewer += 1
            if info.access == Access.ADMIN:
                response, answer = await call(daemon, method, path, body, key=operator_key)
                assert response.code == 403, (method, template, response.code, answer)
                checked_operator += 1
    # The user-management routes are among those refused to operators.
    assert checked_viewer > 10 and checked_operator > 5
    admin_templates = {t for t, _m, _e, i in routes if i.access == Access.ADMIN}
    assert {"/api/users", "/api/users/<user_id>"} <= admin_templates
    # No state-changing route is open to viewers (or to nobody) by accident.
    for template, methods, endpoint, info in routes:
        if set(methods) & set(CHANGING) and info.access == Access.VIEWER:
            raise AssertionError(f"{template} lets viewers change state")


@pytest_twisted.ensureDeferred
async def test_viewer_session_cannot_change_anything_either(daemon):
    await create_user(daemon, "sessionviewer", "viewer")
    session = await login(daemon, "sessionviewer", "correct horse battery")
    for method, path, body in (("POST", "/api/users", {"username": "x", "password": "long enough"}),
                               ("PUT", "/api/cloud/providers/replicate", {"proxy_url": "http://p:1"}),
                               ("POST", "/api/approvals/rules", {}),
                               ("POST", "/api/quotas", {}),
                               ("POST", "/api/auth/api-keys", {"name": "mine"}),
                               ("PUT", "/api/auth/settings", {"registration_enabled": True})):
        response, answer = await call(daemon, method, path, body, session=session)
        assert response.code == 403, (method, path, answer)
        assert answer["error"] == "forbidden"
    # Reads that viewers may do.
    for path in ("/api/users/me", "/api/cloud/jobs", "/api/auth/api-keys", "/api/approvals"):
        response, answer = await call(daemon, "GET", path, session=session)
        assert response.code == 200, (path, answer)


@pytest_twisted.ensureDeferred
async def test_operator_reads_config_and_runs_jobs_but_cannot_manage_users(daemon):
    _, _, operator, operator_key = await keys_for(daemon)
    for path in ("/api/cloud/providers", "/api/approvals/rules", "/api/quotas"):
        response, answer = await call(daemon, "GET", path, key=operator_key)
        assert response.code == 200, (path, answer)
    for method, path, body in (("GET", "/api/users", None),
                               ("POST", "/api/users", {"username": "y", "password": "long enough"}),
                               ("PATCH", f"/api/users/{operator['id']}", {"role": "admin"}),
                               ("DELETE", f"/api/users/{operator['id']}", None)):
        response, answer = await call(daemon, method, path, body, key=operator_key)
        assert response.code == 403, (method, path)
    response, me = await call(daemon, "GET", "/api/users/me", key=operator_key)
    assert me["role"] == "operator"


@pytest_twisted.ensureDeferred
async def test_console_is_served_with_a_strict_csp(daemon):
    for path in ("/", "/console/"):
        response = await treq.get(daemon.url + path)
        html = (await response.content()).decode()
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type")[0].startswith("text/html")
        csp = response.headers.getRawHeaders("content-security-policy")[0]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert response.headers.getRawHeaders("x-frame-options") == ["DENY"]
        for label in ("Username", "Password", "SSL Verification", "CA Bundle Path", "Proxy URL",
                      "HTTP Timeout", "Webhook Security", "Public URL", "Jobs", "Cloud",
                      "Advanced Configuration", "Admin", "Metrics", "Health"):
            assert f">{label}<" in html, label
        # No third-party assets and no inline script or style.
        assert "http://" not in html.replace("http://proxy.example.com", "")
        assert "https://" not in html.replace("https://stdaemon.example.com", "")
        assert "<script>" not in html and "style=" not in html
    response = await treq.get(daemon.url + "/console", allow_redirects=False)
    assert response.code == 301
    await response.content()
    for name, kind in (("console.js", "text/javascript"), ("console.css", "text/css")):
        response = await treq.get(daemon.url + "/static/" + name)
        body = await response.content()
        assert response.code == 200 and body
        assert response.headers.getRawHeaders("content-type")[0].startswith(kind)
        etag = response.headers.getRawHeaders("etag")[0]
        response = await treq.get(daemon.url + "/static/" + name, headers={"If-None-Match": etag})
        assert response.code == 304
        await response.content()
    js = (await (await treq.get(daemon.url + "/static/console.js")).content()).decode()
    assert ("Disabling SSL verification is a security risk. Only do this if you have a \" +\n"
            "    \"self-signed certificate or are behind a corporate proxy. Continue?") in js
    assert "sessionStorage" in js and "innerHTML" not in js
    for bad in ("/static/nothing.js", "/static/..%2Fservice.py", "/static/__init__.py",
                "/static/index.html"):
        response = await treq.get(daemon.url + bad)
        assert response.code == 404, bad
        await response.content()
