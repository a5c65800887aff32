"""Replicate model versions resolved from Replicate's models API (S4, S18; issue 13 point 1).

A real daemon talks to the TLS fake Replicate through the provider client
(CA bundle from the provider settings, breaker, retries): with no version
configured, a submission runs the newest version of the hardware profile's
model ``simpletuner/advanced-trainer-<profile>``.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from stdaemon.providers import model_versions as mv
from tests.replicate_env import start_env

H100 = "simpletuner/advanced-trainer-h100"


@pytest_twisted.async_yield_fixture
async def env(make_daemon, tmp_path):
    environment = await start_env(make_daemon, tmp_path, provider_settings={"model_versions": None})
    yield environment
    await environment.fake.stop()


def model_calls(env, model_id):
    return env.fake.state.requests_to("GET", f"/v1/models/{model_id}")


async def count_rows(env, table):
    return await env.ctx.db.run_read(lambda conn: conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])


@pytest_twisted.ensureDeferred
async def test_submission_without_version_runs_the_newest_version_of_the_profile_model(env):
    state = env.fake.state
    newest = state.newest_version(H100)
    response, body = await env.submit()
    assert response.code == 200, body
    assert body["success"] is True
    sent = state.requests_to("POST", "/v1/predictions")[-1]
    assert sent.body["version"] == f"{H100}:{newest['id']}"
    assert state.predictions[list(state.predictions)[-1]]["model"] == H100
    _, job = await env.call("GET", f"/api/cloud/jobs/{body['job_id']}")
    assert job["job"]["metadata"]["model"] == H100
    assert job["job"]["metadata"]["version"] == f"{H100}:{newest['id']}"

    # Another profile runs its own model.
    x4 = "simpletuner/advanced-trainer-l40s-x4"
    response, body = await env.submit(hardware_profile="l40s-x4")
    assert response.code == 200, body
    sent = state.requests_to("POST", "/v1/predictions")[-1]
    assert sent.body["version"] == f"{x4}:{state.newest_version(x4)['id']}"


@pytest_twisted.ensureDeferred
async def test_newest_version_is_cached_and_refreshed_by_a_provider_put(env):
    state = env.fake.state
    first = state.newest_version(H100)["id"]
    await env.submit()
    await env.submit()
    assert len(model_calls(env, H100)) == 1  # the second submission used the cache
    newer = state.add_version(H100, "2026-11-01T00:00:00Z")["id"]
    await env.submit()
    assert state.requests_to("POST", "/v1/predictions")[-1].body["version"].endswith(first)
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate", {"http_timeout": 6})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code == 200, body
    assert state.requests_to("POST", "/v1/predictions")[-1].body["version"] == f"{H100}:{newer}"
    assert len(model_calls(env, H100)) == 2


@pytest_twisted.ensureDeferred
async def test_cache_expires_on_the_injected_clock(make_daemon, tmp_path):
    clock = Clock()
    clock.advance(1_800_000_000)
    environment = await start_env(make_daemon, tmp_path, clock=clock,
                                  provider_settings={"model_versions": None, "model_version_ttl": 120})
    try:
        state = environment.fake.state
        await environment.submit()
        newer = state.add_version(H100, "2026-12-01T00:00:00Z")["id"]
        clock.advance(119)
        await environment.submit()
        assert not state.requests_to("POST", "/v1/predictions")[-1].body["version"].endswith(newer)
        clock.advance(1)
        response, body = await environment.submit()
        assert response.code == 200, body
        assert state.requests_to("POST", "/v1/predictions")[-1].body["version"] == f"{H100}:{newer}"
    finally:
        await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_model_without_latest_version_falls_back_to_the_version_list(env):
    env.fake.state.hide_latest_version = True
    env.fake.state.add_version(H100, "2025-01-01T00:00:00Z")  # older than the others, listed first
    env.fake.state.models[H100].insert(0, env.fake.state.models[H100].pop())
    response, body = await env.submit()
    assert response.code == 200, body
    newest = max(env.fake.state.models[H100], key=lambda v: v["created_at"])
    assert env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["version"] == f"{H100}:{newest['id']}"
    assert env.fake.state.requests_to("GET", f"/v1/models/{H100}/versions")


@pytest_twisted.ensureDeferred
async def test_configured_versions_and_models_take_precedence(env):
    state = env.fake.state
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate",
                                 {"model_versions": {"h100-x2": "ver-h100x2"}})
    assert response.code == 200
    await env.submit(hardware_profile="h100-x2")
    assert state.requests_to("POST", "/v1/predictions")[-1].body["version"] == "ver-h100x2"
    # The per-profile model setting picks another model for the newest version.
    state.models["acme/custom-trainer"] = []
    custom = state.add_version("acme/custom-trainer", "2026-03-03T00:00:00Z")["id"]
    response, body = await env.call("PUT", "/api/cloud/providers/replicate",
                                    {"models": {"h100": "acme/custom-trainer"}})
    assert response.code == 200, body
    assert body["config"]["hardware_info"]["h100"]["model"] == "acme/custom-trainer"
    await env.submit()
    assert state.requests_to("POST", "/v1/predictions")[-1].body["version"] == f"acme/custom-trainer:{custom}"
    # version_override wins over everything, for every profile.
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate/config",
                                 {"version_override": f"{H100}:{state.models[H100][0]['id']}"})
    assert response.code == 200
    await env.submit(hardware_profile="l40s")
    assert state.requests_to("POST", "/v1/predictions")[-1].body["version"] == \
        f"{H100}:{state.models[H100][0]['id']}"
    for bad in ({"models": {"h100": "no-slash"}}, {"models": {"h200": "a/b"}},
                {"version_override": "has spaces in it"}):
        response, body = await env.call("PUT", "/api/cloud/providers/replicate", bad)
        assert response.code == 400 and body["field"] == next(iter(bad)), body


@pytest_twisted.ensureDeferred
async def test_provider_error_while_resolving_creates_nothing(env):
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate",
                                 {"models": {"h100": "simpletuner/does-not-exist"}})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code == 502, body
    assert body["error"] == "provider_error" and body["success"] is False
    assert "simpletuner/does-not-exist" in body["detail"] and "Not found." in body["detail"]
    assert await count_rows(env, "jobs") == 0
    assert await count_rows(env, "upload_credentials") == 0
    assert env.fake.state.requests_to("POST", "/v1/predictions") == []
    # An unreachable Replicate: 502 too, nothing created.
    response, _ = await env.call("PUT", "/api/cloud/providers/replicate",
                                 {"models": None, "api_base_url": "https://127.0.0.1:9", "http_timeout": 2})
    assert response.code == 200
    response, body = await env.submit()
    assert response.code in (502, 503), body
    assert body["error"] in ("provider_unavailable", "circuit_open")
    assert await count_rows(env, "jobs") == 0


@pytest_twisted.ensureDeferred
async def test_versions_listing_newest_first_with_current_marked(env):
    state = env.fake.state
    response, body = await env.call("GET", "/api/cloud/providers/replicate/versions")
    assert response.code == 200, body
    assert body["model_id"] == H100
    ids = [v["id"] for v in body["versions"]]
    assert ids == [v["id"] for v in reversed(state.models[H100])]
    assert [v["current"] for v in body["versions"]] == [True, False]
    assert body["versions"][0]["full_version"] == f"{H100}:{ids[0]}"
    assert body["current_version"] == f"{H100}:{ids[0]}" and body["version_source"] == "replicate"

    other = "simpletuner/advanced-trainer-l40s-x8"
    response, body = await env.call("GET", f"/api/cloud/providers/replicate/versions?model_id={other}")
    assert response.code == 200 and body["model_id"] == other
    assert body["versions"][0]["id"] == state.newest_version(other)["id"]

    await env.call("PUT", "/api/cloud/providers/replicate", {"version_override": ids[1]})
    _, body = await env.call("GET", "/api/cloud/providers/replicate/versions")
    assert [v["current"] for v in body["versions"]] == [False, True]
    assert body["version_source"] == "config"

    response, body = await env.call("GET", "/api/cloud/providers/replicate/versions?model_id=../etc")
    assert response.code == 400 and body["field"] == "model_id"
    response, body = await env.call("GET", "/api/cloud/providers/replicate/versions?model_id=acme/missing")
    assert response.code == 502 and "Not found." in body["detail"]


def test_parse_versions_sorts_newest_first_and_skips_junk():
    listed = mv.parse_versions("o/m", [
        {"id": "a", "created_at": "2024-01-01T00:00:00Z"},
        {"id": "c", "created_at": "2025-06-01T00:00:00.123456Z"},
        {"nope": 1}, "junk", {"id": "", "created_at": "2026-01-01T00:00:00Z"},
        {"id": "b", "created_at": None},
    ])
    assert [v.id for v in listed] == ["c", "a", "b"]
    assert listed[0].full_version == "o/m:c"
    cache = mv.VersionCache(10)
    cache.put("o/m", listed[0], 100.0)
    assert cache.get("o/m", 109.9) is listed[0] and cache.get("o/m", 110.0) is None
    assert mv.configured_version("h100", "", {"default": "d"}) == "d"
    assert mv.configured_version("h100", "x", {"h100": "d"}) == "x"
    assert mv.model_for("l40s", {}) == "simpletuner/advanced-trainer-l40s"
    with pytest.raises(ValueError):
        mv.parse_model_id("a/b/c")


@pytest_twisted.ensureDeferred
async def test_resolution_is_retried_and_counted_by_the_circuit_breaker(env):
    env.fake.state.mode = "fail"  # 500 on every call
    response, body = await env.submit()
    assert response.code == 502, body
    assert "fake replicate is failing" in body["detail"]
    assert len(model_calls(env, H100)) == 3  # an idempotent GET: retried with backoff
    response, body = await env.submit()
    assert response.code in (502, 503), body
    assert env.ctx.providers.breaker("replicate").state == "open"
    response, body = await env.submit()
    assert response.code == 503 and body["error"] == "circuit_open", body
    assert int(response.headers.getRawHeaders("retry-after")[0]) >= 1
    assert await count_rows(env, "jobs") == 0
    assert env.fake.state.requests_to("POST", "/v1/predictions") == []
