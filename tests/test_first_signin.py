"""First sign-in without curl (issue 13 point 7): the one-time setup link printed on
first start, and "Sign in with API key" sessions, on a real daemon."""

from __future__ import annotations

import json

import pytest_twisted
from twisted.internet import task
from twisted.logger import globalLogPublisher

from tests.authhelpers import Session, call, create_user, login, user_key


def setup_token(daemon) -> str:
    return daemon.ctx.setup_url.split("#setup=", 1)[1]


async def setup(daemon, token, password="a new strong password", origin=None):
    headers = {"Origin": origin or daemon.url}
    response, body = await call(daemon, "POST", "/api/auth/setup", {"token": token, "password": password},
                                headers=headers)
    return response, body


def cookies(response) -> dict:
    from http.cookies import SimpleCookie

    jar = {}
    for header in response.headers.getRawHeaders("set-cookie") or []:
        parsed = SimpleCookie()
        parsed.load(header)
        jar.update({name: morsel.value for name, morsel in parsed.items()})
    return jar


@pytest_twisted.ensureDeferred
async def test_first_start_logs_a_one_time_link_that_sets_the_admin_password(make_daemon):
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        daemon = await make_daemon()
    finally:
        globalLogPublisher.removeObserver(events.append)
    url = daemon.ctx.setup_url
    assert url.startswith(f"{daemon.url}/console/#setup=")
    logged = [e for e in events if "First sign-in" in e.get("log_format", "")]
    assert logged and logged[0]["url"] == url and logged[0]["log_level"].name == "warn"
    token = setup_token(daemon)
    stored = await daemon.ctx.db.run_read(lambda c: c.execute(
        "SELECT value_json FROM settings WHERE namespace = 'auth' AND key = 'setup_token'").fetchone()[0])
    assert token not in stored and "sha256" in json.loads(stored)

    response, body = await call(daemon, "POST", "/api/auth/setup/check", {"token": token})
    assert response.code == 200 and body == {"valid": True, "username": "admin"}
    response, body = await call(daemon, "POST", "/api/auth/setup/check", {"token": "nope"})
    assert body["valid"] is False

    response, body = await setup(daemon, token, password="short")
    assert response.code == 400 and body["field"] == "password"
    response, body = await setup(daemon, token, origin="https://evil.example")
    assert response.code == 403  # the Origin rule of login applies
    response, body = await setup(daemon, token)
    assert response.code == 200 and body["success"] is True, body
    jar = cookies(response)
    session = Session(jar, [], body)
    response, me = await call(daemon, "GET", "/api/users/me", session=session)
    assert response.code == 200 and me["username"] == "admin" and me["role"] == "admin"

    # Single use.
    response, body = await setup(daemon, token)
    assert response.code == 401 and body["error"] == "invalid_setup_token"
    # The password works for a normal sign-in.
    await login(daemon, "admin", "a new strong password")
    rows = await daemon.ctx.db.run_read(lambda c: c.execute(
        "SELECT event_type FROM audit_log WHERE event_type = 'auth.setup.completed'").fetchall())
    assert len(rows) == 1


@pytest_twisted.ensureDeferred
async def test_setup_link_expires_after_30_minutes_and_stops_once_a_password_exists(make_daemon, tmp_path):
    clock = task.Clock()
    clock.advance(1_700_000_000)
    daemon = await make_daemon(clock=clock)
    token = setup_token(daemon)
    clock.advance(30 * 60 - 1)
    response, body = await call(daemon, "POST", "/api/auth/setup/check", {"token": token})
    assert body["valid"] is True
    clock.advance(1)
    response, body = await setup(daemon, token)
    assert response.code == 401
    # A restart while nobody has a password prints a fresh link; the old one stays dead.
    await daemon.service.stopService()
    again = await make_daemon(clock=clock)
    fresh = setup_token(again)
    assert fresh != token
    response, _ = await setup(again, token)
    assert response.code == 401
    response, _ = await setup(again, fresh)
    assert response.code == 200
    await again.service.stopService()
    third = await make_daemon(clock=clock)
    assert getattr(third.ctx, "setup_url", None) is None  # setup is over


@pytest_twisted.ensureDeferred
async def test_sign_in_with_api_key_caps_the_session_at_the_key_role(daemon):
    response, body = await call(daemon, "POST", "/api/auth/login", {"api_key": daemon.admin_key},
                                headers={"Origin": daemon.url})
    assert response.code == 200 and body["user"]["role"] == "admin", body
    admin_session = Session(cookies(response), [], body)
    response, _ = await call(daemon, "PUT", "/api/cloud/providers/replicate", {"http_timeout": 9},
                             session=admin_session)
    assert response.code == 200

    # A viewer key of an admin user opens a viewer session.
    me = (await call(daemon, "GET", "/api/users/me", key=daemon.admin_key))[1]
    viewer_key = await user_key(daemon, me["id"], "viewer")
    response, body = await call(daemon, "POST", "/api/auth/login", {"api_key": viewer_key},
                                headers={"Origin": daemon.url})
    assert response.code == 200 and body["user"]["role"] == "viewer"
    viewer_session = Session(cookies(response), [], body)
    response, me_view = await call(daemon, "GET", "/api/users/me", session=viewer_session)
    assert me_view["role"] == "viewer"
    response, _ = await call(daemon, "PUT", "/api/cloud/providers/replicate", {"http_timeout": 8},
                             session=viewer_session)
    assert response.code == 403
    response, _ = await call(daemon, "GET", "/api/cloud/jobs", session=viewer_session)
    assert response.code == 200

    # Revoking the key ends the sessions opened with it.
    keys = (await call(daemon, "GET", "/api/auth/api-keys", key=daemon.admin_key))[1]
    key_id = [k for k in keys["keys"] if k["prefix"] == viewer_key[:7] and k["role"] == "viewer"][0]["id"]
    response, _ = await call(daemon, "DELETE", f"/api/auth/api-keys/{key_id}", key=daemon.admin_key)
    assert response.code == 200
    response, _ = await call(daemon, "GET", "/api/cloud/jobs", session=viewer_session)
    assert response.code == 401

    response, body = await call(daemon, "POST", "/api/auth/login", {"api_key": "st_wrong"},
                                headers={"Origin": daemon.url})
    assert response.code == 401
    response, body = await call(daemon, "POST", "/api/auth/login", {"api_key": 5}, headers={"Origin": daemon.url})
    assert response.code == 400 and body["field"] == "api_key"
