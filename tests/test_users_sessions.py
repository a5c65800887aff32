"""Users, password login, session cookies, CSRF, expiry and API keys (S12)."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, task

from stdaemon.users import csrf
from stdaemon.users import store as users
from stdaemon.invalid import InvalidValue
from tests.authhelpers import call, create_user, login, user_key
from tests.postgres_fixture import engine_settings


@pytest.fixture(params=["sqlite", "postgresql"])
def daemon(request, make_daemon):
    """The daemon on each engine in turn (users, keys and sessions are rows of its database)."""
    settings = engine_settings(request, request.param)
    return pytest_twisted.blockon(defer.ensureDeferred(make_daemon(settings)))


class RecordingAudit:
    def __init__(self):
        self.entries = []

    async def record(self, event_type, **fields):
        self.entries.append((event_type, fields))

    def record_soon(self, event_type, sampled=False, **fields):
        return defer.ensureDeferred(self.record(event_type, **fields))

    def types(self):
        return [entry[0] for entry in self.entries]


# -- pure parts ---------------------------------------------------------------------

def test_argon2_hash_verifies_and_rejects():
    hashed = users.hash_password("correct horse battery")
    assert hashed.startswith("$argon2id$")
    assert users.verify_password(hashed, "correct horse battery")
    assert not users.verify_password(hashed, "wrong password!")
    assert not users.verify_password(None, "anything at all")
    assert not users.verify_password("not-a-hash", "anything at all")


def test_origin_rules():
    allowed = csrf.allowed_origins("127.0.0.1:8080", False, "https://st.example.com/")
    assert allowed == {"http://127.0.0.1:8080", "https://st.example.com"}
    assert csrf.origin_allowed("http://127.0.0.1:8080", None, allowed)
    assert csrf.origin_allowed("https://ST.example.com:443", None, allowed)
    assert not csrf.origin_allowed("https://evil.example", None, allowed)
    assert not csrf.origin_allowed("null", None, allowed)
    assert not csrf.origin_allowed(None, "https://evil.example/page", allowed)
    assert csrf.origin_allowed(None, "http://127.0.0.1:8080/console/", allowed)


def test_csrf_token_must_match_cookie_and_session():
    token = "abc123"
    digest = users.token_hash(token)
    assert csrf.token_matches(token, token, digest)
    assert not csrf.token_matches(token, "other", digest)
    assert not csrf.token_matches("other", "other", digest)
    assert not csrf.token_matches(None, token, digest)


@pytest.mark.parametrize("bad", ["", "a b", "../x", "x" * 65, 5, None])
def test_username_validation(bad):
    with pytest.raises(InvalidValue) as info:
        users.check_username(bad)
    assert info.value.field == "username"


# -- over a real port ------------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_login_sets_hardened_cookies_and_me_works(daemon):
    audit = daemon.ctx.audit = RecordingAudit()
    user = await create_user(daemon, "olga", "operator")
    assert "password" not in user and "password_hash" not in user
    session = await login(daemon, "olga", "correct horse battery")
    session_cookie = next(h for h in session.set_cookie_headers if h.startswith("st_session="))
    csrf_cookie = next(h for h in session.set_cookie_headers if h.startswith("st_csrf="))
    assert "HttpOnly" in session_cookie and "samesite=strict" in session_cookie.lower()
    assert "Secure" not in session_cookie  # plain HTTP on loopback
    assert "HttpOnly" not in csrf_cookie and "samesite=strict" in csrf_cookie.lower()
    response, me = await call(daemon, "GET", "/api/users/me", session=session)
    assert response.code == 200
    assert me["username"] == "olga" and me["role"] == "operator" and me["via"] == "session"
    # Login by email works too.
    await login(daemon, "olga@example.test", "correct horse battery")
    assert "auth.login.success" in audit.types()


@pytest_twisted.ensureDeferred
async def test_wrong_password_and_unknown_user_are_401_and_audited(daemon):
    audit = daemon.ctx.audit = RecordingAudit()
    await create_user(daemon, "victor", "viewer")
    await login(daemon, "victor", "not the password", expect=401)
    response, body = await call(daemon, "POST", "/api/auth/login",
                                {"username": "nobody", "password": "whatever123"})
    assert response.code == 401 and body["error"] == "invalid_credentials"
    assert audit.types().count("auth.login.failed") == 2
    # The admin user created at first start has no password: no login.
    await login(daemon, "admin", "", expect=400)
    response, body = await call(daemon, "POST", "/api/auth/login", {"username": "x"})
    assert response.code == 400 and body["field"] == "password"
    response, body = await call(daemon, "POST", "/api/auth/login", b"not json")
    assert response.code == 400


@pytest_twisted.ensureDeferred
async def test_csrf_required_for_session_state_changes(daemon):
    user = await create_user(daemon, "ada", "admin")
    session = await login(daemon, "ada", "correct horse battery")
    body = {"username": "new1", "password": "long enough pw", "role": "viewer"}
    # Missing token.
    response, answer = await call(daemon, "POST", "/api/users", body,
                                  headers={"X-CSRF-Token": "", "Origin": daemon.url},
                                  session=session)
    assert response.code == 403 and answer["error"] == "csrf_failed"
    # Token that is not this session's.
    response, answer = await call(daemon, "POST", "/api/users", body,
                                  headers={"X-CSRF-Token": "forged"}, session=session)
    assert response.code == 403
    # Foreign origin, right token.
    response, answer = await call(daemon, "POST", "/api/users", body,
                                  headers={"Origin": "https://evil.example"}, session=session)
    assert response.code == 403 and answer["error"] == "csrf_origin"
    # Reads need no token.
    response, _ = await call(daemon, "GET", "/api/users", session=session)
    assert response.code == 200
    # Correct token and origin.
    response, answer = await call(daemon, "POST", "/api/users", body, session=session)
    assert response.code == 201, answer
    # API-key requests are exempt even with a foreign Origin.
    response, answer = await call(daemon, "PATCH", f"/api/users/{answer['id']}", {"role": "operator"},
                                  headers={"Origin": "https://evil.example"}, key=daemon.admin_key)
    assert response.code == 200 and answer["role"] == "operator"
    # Login from a foreign origin is refused too.
    response, answer = await call(daemon, "POST", "/api/auth/login",
                                  {"username": "ada", "password": "correct horse battery"},
                                  headers={"Origin": "https://evil.example"})
    assert response.code == 403
    assert user["role"] == "admin"


@pytest_twisted.ensureDeferred
async def test_public_url_origin_is_accepted(make_daemon):
    daemon = await make_daemon(settings={"server": {"public_url": "https://st.example.com"}})
    await create_user(daemon, "pat", "admin")
    session = await login(daemon, "pat", "correct horse battery")
    response, answer = await call(daemon, "PUT", "/api/auth/settings", {"registration_enabled": True},
                                  headers={"Origin": "https://st.example.com"}, session=session)
    assert response.code == 200 and answer["registration_enabled"] is True


@pytest_twisted.ensureDeferred
async def test_logout_ends_the_session(daemon):
    await create_user(daemon, "lou", "viewer")
    session = await login(daemon, "lou", "correct horse battery")
    response, body = await call(daemon, "POST", "/api/auth/logout", session=session)
    assert response.code == 200 and body["session_ended"] is True
    cleared = response.headers.getRawHeaders("set-cookie")
    assert any(h.startswith("st_session=;") or h.startswith("st_session=\"\"") or "Max-Age=0" in h
               for h in cleared)
    response, _ = await call(daemon, "GET", "/api/users/me", session=session)
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_sessions_expire_and_are_swept_by_the_timer(make_daemon):
    clock = task.Clock()
    clock.advance(1_000_000)
    daemon = await make_daemon(settings={"auth": {"session_ttl": 600}}, clock=clock)
    await create_user(daemon, "eve", "viewer")
    session = await login(daemon, "eve", "correct horse battery")
    response, _ = await call(daemon, "GET", "/api/users/me", session=session)
    assert response.code == 200
    assert await daemon.ctx.db.run_read(users.count_sessions) == 1
    clock.advance(601)  # past the TTL: dead at once, before any sweep
    response, _ = await call(daemon, "GET", "/api/users/me", session=session)
    assert response.code == 401
    # Drive the sweep timer and wait for each run (its write) to finish: under
    # load the write may take longer than one read.
    timer = next(s for s in daemon.ctx.services if getattr(s, "name", None) == "session-sweep")
    for _ in range(20):
        clock.advance(60)
        if timer._running_call is not None:
            await timer._running_call
        if await daemon.ctx.db.run_read(users.count_sessions) == 0:
            break
    assert await daemon.ctx.db.run_read(users.count_sessions) == 0
    assert daemon.ctx.sessions.swept >= 1


@pytest_twisted.ensureDeferred
async def test_registration_only_when_enabled(daemon):
    body = {"username": "reg1", "email": "reg1@example.test", "password": "registered pw"}
    response, answer = await call(daemon, "POST", "/api/auth/register", body)
    assert response.code == 403
    response, answer = await call(daemon, "GET", "/api/auth/settings")
    assert answer == {"registration_enabled": False}
    response, _ = await call(daemon, "PUT", "/api/auth/settings", {"registration_enabled": True},
                             key=daemon.admin_key)
    assert response.code == 200
    response, answer = await call(daemon, "POST", "/api/auth/register", body)
    assert response.code == 201 and answer["user"]["role"] == "viewer"
    response, answer = await call(daemon, "POST", "/api/auth/register", body)
    assert response.code == 409
    await login(daemon, "reg1", "registered pw")


@pytest_twisted.ensureDeferred
async def test_registration_enabled_by_config(make_daemon):
    daemon = await make_daemon(settings={"auth": {"registration_enabled": True}})
    response, answer = await call(daemon, "POST", "/api/auth/register",
                                  {"username": "cfg", "password": "registered pw"})
    assert response.code == 201, answer


@pytest_twisted.ensureDeferred
async def test_api_keys_own_scope_role_ceiling_and_revocation(daemon):
    audit = daemon.ctx.audit = RecordingAudit()
    operator = await create_user(daemon, "opal", "operator")
    other = await create_user(daemon, "otto", "operator")
    session = await login(daemon, "opal", "correct horse battery")
    response, body = await call(daemon, "POST", "/api/auth/api-keys", {"name": "ci", "role": "admin"},
                                session=session)
    assert response.code == 403 and body["field"] == "role"
    response, created = await call(daemon, "POST", "/api/auth/api-keys",
                                   {"name": "ci", "expires_days": 30}, session=session)
    assert response.code == 201 and created["role"] == "operator" and created["key"].startswith("st_")
    key = created["key"]
    response, me = await call(daemon, "GET", "/api/users/me", key=key)
    assert me["username"] == "opal" and me["via"] == "api_key"
    response, listed = await call(daemon, "GET", "/api/auth/api-keys", key=key)
    assert [k["name"] for k in listed["keys"]] == ["ci"]
    assert all("key" not in k and "key_hash" not in k for k in listed["keys"])
    # Someone else's key is invisible to an operator.
    other_key = await user_key(daemon, other["id"], "viewer")
    response, admin_list = await call(daemon, "GET", "/api/auth/api-keys", key=daemon.admin_key)
    other_id = next(k["id"] for k in admin_list["keys"] if k["user_id"] == other["id"])
    response, _ = await call(daemon, "DELETE", f"/api/auth/api-keys/{other_id}", key=key)
    assert response.code == 404
    # Bad input.
    for bad in ({"name": ""}, {"name": "x", "expires_days": -1}, {"name": "x", "role": "root"}):
        response, body = await call(daemon, "POST", "/api/auth/api-keys", bad, key=key)
        assert response.code == 400, bad
    response, _ = await call(daemon, "POST", "/api/auth/api-keys",
                             {"name": "x", "user_id": other["id"]}, key=key)
    assert response.code == 403
    # Revocation takes effect at once (cache invalidated).
    response, _ = await call(daemon, "DELETE", f"/api/auth/api-keys/{created['id']}", key=key)
    assert response.code == 200
    response, _ = await call(daemon, "GET", "/api/users/me", key=key)
    assert response.code == 401
    # The collection form: DELETE /api/auth/api-keys?id=N.
    response, second = await call(daemon, "POST", "/api/auth/api-keys", {"name": "second"},
                                  session=session)
    response, _ = await call(daemon, "DELETE", f"/api/auth/api-keys?id={second['id']}", session=session)
    assert response.code == 200
    response, _ = await call(daemon, "GET", "/api/users/me", key=second["key"])
    assert response.code == 401
    response, body = await call(daemon, "DELETE", "/api/auth/api-keys", session=session)
    assert response.code == 400 and body["field"] == "id"
    response, _ = await call(daemon, "GET", "/api/users/me", key=other_key)
    assert response.code == 200
    assert {"api_key.created", "api_key.revoked"} <= set(audit.types())
    assert operator["role"] == "operator"


@pytest_twisted.ensureDeferred
async def test_user_management_rules(daemon):
    admin_id = (await call(daemon, "GET", "/api/users/me", key=daemon.admin_key))[1]["id"]
    # The only admin cannot be demoted or deleted.
    response, body = await call(daemon, "PATCH", f"/api/users/{admin_id}", {"role": "viewer"},
                                key=daemon.admin_key)
    assert response.code == 409
    response, body = await call(daemon, "DELETE", f"/api/users/{admin_id}", key=daemon.admin_key)
    assert response.code == 409
    # Duplicate usernames, bad fields, unknown users.
    await create_user(daemon, "dup", "viewer")
    response, body = await call(daemon, "POST", "/api/users",
                                {"username": "dup", "password": "long enough", "role": "viewer"},
                                key=daemon.admin_key)
    assert response.code == 409 and body["field"] == "username"
    response, body = await call(daemon, "POST", "/api/users",
                                {"username": "short", "password": "x", "role": "viewer"},
                                key=daemon.admin_key)
    assert response.code == 400 and body["field"] == "password"
    response, body = await call(daemon, "PATCH", "/api/users/9999", {"role": "viewer"},
                                key=daemon.admin_key)
    assert response.code == 404
    response, body = await call(daemon, "PATCH", "/api/users/abc", {"role": "viewer"},
                                key=daemon.admin_key)
    assert response.code == 404
    # Demotion lowers the user's keys and ends sessions; disabling blocks login.
    op = await create_user(daemon, "demote", "operator")
    op_key = await user_key(daemon, op["id"], "operator")
    session = await login(daemon, "demote", "correct horse battery")
    response, body = await call(daemon, "PATCH", f"/api/users/{op['id']}", {"role": "viewer"},
                                key=daemon.admin_key)
    assert response.code == 200 and body["role"] == "viewer"
    response, me = await call(daemon, "GET", "/api/users/me", key=op_key)
    assert me["role"] == "viewer"
    response, _ = await call(daemon, "GET", "/api/users/me", session=session)
    assert response.code == 401
    response, _ = await call(daemon, "PATCH", f"/api/users/{op['id']}", {"disabled": True},
                             key=daemon.admin_key)
    await login(daemon, "demote", "correct horse battery", expect=401)
    response, _ = await call(daemon, "GET", "/api/users/me", key=op_key)
    assert response.code == 401
    response, _ = await call(daemon, "DELETE", f"/api/users/{op['id']}", key=daemon.admin_key)
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_auth_events_reach_the_real_audit_log(daemon):
    assert daemon.ctx.audit is not None
    await create_user(daemon, "audited", "operator")
    await login(daemon, "audited", "wrong password!", expect=401)
    session = await login(daemon, "audited", "correct horse battery")
    response, created = await call(daemon, "POST", "/api/auth/api-keys", {"name": "audit me"},
                                   session=session)
    assert response.code == 201
    response, _ = await call(daemon, "DELETE", f"/api/auth/api-keys/{created['id']}", session=session)
    assert response.code == 200
    for event_type in ("auth.login.failed", "auth.login.success", "api_key.created", "api_key.revoked"):
        response, page = await call(daemon, "GET", f"/api/audit?event_type={event_type}",
                                    key=daemon.admin_key)
        assert response.code == 200 and page["total"] >= 1, (event_type, page)
        entry = page["entries"][0]
        assert entry["ip"] == "127.0.0.1"
        assert "correct horse" not in json.dumps(entry) and created["key"] not in json.dumps(entry)


@pytest_twisted.ensureDeferred
async def test_cookies_are_secure_over_https(make_daemon, tmp_path):
    import ssl
    import urllib.request

    import trustme
    from twisted.internet.threads import deferToThread

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    with open(cert_path, "wb") as handle:
        for blob in cert.cert_chain_pems:
            handle.write(blob.bytes())
    cert.private_key_pem.write_to_path(str(key_path))
    daemon = await make_daemon(settings={"server": {"ssl_cert": str(cert_path), "ssl_key": str(key_path)}})
    assert daemon.url.startswith("https://")
    context = ssl.create_default_context()
    ca.configure_trust(context)

    def post(path, body, headers):
        request = urllib.request.Request(daemon.url + path, data=json.dumps(body).encode(),
                                         headers=dict(headers, **{"Content-Type": "application/json"}),
                                         method="POST")
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            return response.status, response.headers.get_all("Set-Cookie") or []

    status, _ = await deferToThread(post, "/api/users", {"username": "tls", "password": "long enough pw",
                                                         "role": "viewer"},
                                    {"X-API-Key": daemon.admin_key})
    assert status == 201
    status, cookies = await deferToThread(post, "/api/auth/login",
                                          {"username": "tls", "password": "long enough pw"},
                                          {"Origin": daemon.url})
    assert status == 200 and len(cookies) == 2
    assert all("; Secure" in c and "samesite=strict" in c.lower() for c in cookies)
    assert any(c.startswith("st_session=") and "HttpOnly" in c for c in cookies)
