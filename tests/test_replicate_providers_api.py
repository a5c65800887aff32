"""Provider configuration API (S5) on a real daemon port."""

from __future__ import annotations

import pytest
import pytest_twisted
import trustme

from stdaemon.store.database import connect
from tests.replicate_env import audit_events, start_env


@pytest_twisted.async_yield_fixture
async def env(make_daemon, tmp_path):
    environment = await start_env(make_daemon, tmp_path, env={"SIMPLETUNER_SSL_VERIFY": "true"})
    yield environment
    await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_list_and_get_show_effective_values_and_sources(env):
    response, body = await env.call("GET", "/api/cloud/providers")
    assert response.code == 200
    assert body["providers"][0]["name"] == "replicate"
    assert body["providers"][0]["configured"] is True

    for path in ("/api/cloud/providers/replicate", "/api/cloud/providers/replicate/config"):
        response, body = await env.call("GET", path)
        assert response.code == 200
        assert body["config"]["api_base_url"] == env.fake.url
        assert body["sources"]["api_base_url"] == "file"
        assert body["sources"]["ssl_verify"] == "env"
        assert body["sources"]["webhook_require_signature"] == "default"
        assert body["config"]["webhook_require_signature"] is True
        assert body["config"]["http_timeout"] == 5
        assert body["config"]["hardware_info"]["h100-x2"]["gpu_count"] == 2
        assert body["circuit_breaker"]["state"] == "closed"


@pytest_twisted.ensureDeferred
async def test_unknown_provider_is_404_and_auth_is_required(env):
    response, body = await env.call("GET", "/api/cloud/providers/runpod")
    assert response.code == 404 and body["error"] == "not_found" and "runpod" in body["detail"]
    response, body = await env.call("PUT", "/api/cloud/providers/runpod", {"http_timeout": 5})
    assert response.code == 404
    import treq
    response = await treq.get(env.url("/api/cloud/providers/replicate"))
    assert response.code == 401
    assert "detail" in await response.json()


@pytest.mark.parametrize("body,field", [
    ({"no_such_field": 1}, "no_such_field"),
    ({"webhook_allowed_ips": ["10.0.0.0/33"]}, "webhook_allowed_ips"),
    ({"webhook_allowed_ips": ["not-an-ip"]}, "webhook_allowed_ips"),
    ({"proxy_url": "proxy.corp:3128"}, "proxy_url"),
    ({"proxy_url": "http://"}, "proxy_url"),
    ({"http_timeout": 0}, "http_timeout"),
    ({"http_timeout": -3}, "http_timeout"),
    ({"http_timeout": "soon"}, "http_timeout"),
    ({"ssl_verify": "maybe"}, "ssl_verify"),
    ({"ssl_ca_bundle": "/nonexistent/ca.pem"}, "ssl_ca_bundle"),
    ({"hardware_profile": "a100"}, "hardware_profile"),
    ({"cost_limit_period": "yearly"}, "cost_limit_period"),
    ({"cost_limit_action": "explode"}, "cost_limit_action"),
    ({"api_base_url": "ftp://x"}, "api_base_url"),
    ({"s3_public_url": "nohost"}, "s3_public_url"),
])
@pytest_twisted.ensureDeferred
async def test_each_invalid_field_is_a_400_naming_it(env, body, field):
    response, answer = await env.call("PUT", "/api/cloud/providers/replicate", body)
    assert response.code == 400, answer
    assert answer["field"] == field
    assert answer["detail"].startswith(field + ":")
    assert answer["error"] in ("invalid_field", "unknown_field")


@pytest_twisted.ensureDeferred
async def test_ca_bundle_must_be_pem(env, tmp_path):
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello, I am not a certificate\n")
    response, body = await env.call("PUT", "/api/cloud/providers/replicate", {"ssl_ca_bundle": str(not_pem)})
    assert response.code == 400 and body["field"] == "ssl_ca_bundle" and "PEM" in body["detail"]
    unreadable = tmp_path / "dir.pem"
    unreadable.mkdir()
    response, body = await env.call("PUT", "/api/cloud/providers/replicate", {"ssl_ca_bundle": str(unreadable)})
    assert response.code == 400 and body["field"] == "ssl_ca_bundle"


@pytest_twisted.ensureDeferred
async def test_update_persists_applies_and_is_audited_with_secrets_redacted(env, tmp_path):
    bundle = tmp_path / "multi.pem"
    bundle.write_bytes(trustme.CA().cert_pem.bytes() + trustme.CA().cert_pem.bytes())
    update = {"webhook_allowed_ips": ["10.0.0.0/8", "192.168.1.7"], "http_timeout": 60,
              "proxy_url": "http://corp:hunter2@proxy.corp:3128", "ssl_ca_bundle": str(bundle),
              "cost_limit_enabled": True, "cost_limit_amount": 50, "cost_limit_action": "block"}
    response, body = await env.call("PUT", "/api/cloud/providers/replicate", update)
    assert response.code == 200, body
    assert body["config"]["webhook_allowed_ips"] == ["10.0.0.0/8", "192.168.1.7/32"]
    assert body["sources"]["http_timeout"] == "api"
    assert body["config"]["proxy_url"] == "http://corp:***@proxy.corp:3128"
    assert "hunter2" not in str(body)

    # Persisted in the database.
    conn = connect(env.ctx.database_path)
    rows = dict(conn.execute("SELECT key, value_json FROM settings WHERE namespace = 'provider:replicate'"))
    conn.close()
    assert rows["http_timeout"] == "60.0"
    assert "proxy_url" in rows

    # Applies to the outbound client at once.
    outbound = env.ctx.providers.outbound("replicate")
    assert outbound.http_timeout == 60.0 and outbound.https_proxy.endswith("@proxy.corp:3128")

    # Reloading from the database gives the same effective values.
    before = env.ctx.providers.effective("replicate")
    await env.ctx.providers.load()
    assert env.ctx.providers.effective("replicate") == before

    # Audited through the audit writer, old and new values, secrets redacted.
    events = audit_events(env, "provider.configured")
    assert len(events) == 1
    details = events[0]["details"]
    assert details["old"]["http_timeout"] == 5 and details["new"]["http_timeout"] == 60.0
    assert details["new"]["proxy_url"] == "http://corp:***@proxy.corp:3128"
    assert "hunter2" not in str(details)
    assert events[0]["target"] == "replicate" and events[0]["actor"]
    assert events[0]["ip"] == "127.0.0.1"

    # Partial update: other fields are untouched; null resets to the lower layer.
    response, body = await env.call("PUT", "/api/cloud/providers/replicate/config", {"http_timeout": None})
    assert response.code == 200
    assert body["config"]["http_timeout"] == 5 and body["sources"]["http_timeout"] == "file"
    assert body["config"]["cost_limit_amount"] == 50


@pytest_twisted.ensureDeferred
async def test_environment_source(make_daemon, tmp_path):
    environment = await start_env(make_daemon, tmp_path, env={"SIMPLETUNER_HTTP_TIMEOUT": "45"},
                                  provider_settings={"http_timeout": None})
    try:
        _, body = await environment.call("GET", "/api/cloud/providers/replicate")
        assert body["config"]["http_timeout"] == 45.0
        assert body["sources"]["http_timeout"] == "env"
    finally:
        await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_health_components_for_breaker_and_provider(env):
    _, health = await env.call("GET", "/api/cloud/health")
    names = {c["name"]: c for c in health["components"]}
    assert names["circuit_breaker:replicate"]["status"] == "healthy"
    assert "provider:replicate" not in names  # only on request: it calls Replicate
    _, health = await env.call("GET", "/api/cloud/health?include_providers=true")
    names = {c["name"]: c for c in health["components"]}
    assert names["provider:replicate"]["status"] == "healthy"
    assert "stdaemon-tests" in names["provider:replicate"]["message"]
    assert env.fake.state.requests_to("GET", "/v1/account")
    env.fake.state.token = "r8_rotated_elsewhere"  # our token is no longer accepted
    _, health = await env.call("GET", "/api/cloud/health?include_providers=true")
    names = {c["name"]: c for c in health["components"]}
    assert names["provider:replicate"]["status"] == "degraded"
    assert "401" in names["provider:replicate"]["message"]


@pytest_twisted.ensureDeferred
async def test_saved_settings_survive_a_restart(make_daemon, tmp_path):
    first = await start_env(make_daemon, tmp_path)
    try:
        response, _ = await first.call("PUT", "/api/cloud/providers/replicate",
                                       {"http_timeout": 61, "webhook_allowed_ips": ["10.1.0.0/16"]})
        assert response.code == 200
        await first.daemon.service.stopService()
        second = await make_daemon(settings={"server": {"public_url": "https://daemon.example.test"},
                                             "providers": {"replicate": {"http_timeout": 5}}})
        import treq

        response = await treq.get(second.url + "/api/cloud/providers/replicate",
                                  headers={"X-API-Key": second.admin_key})
        body = await response.json()
        assert body["config"]["http_timeout"] == 61 and body["sources"]["http_timeout"] == "api"
        assert body["config"]["webhook_allowed_ips"] == ["10.1.0.0/16"]
    finally:
        await first.fake.stop()
