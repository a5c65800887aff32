"""Two daemons on different ports share one real redis-server: limits are shared,
an outage fails open with health degraded, and sharing resumes when Redis is back."""

import json

import pytest_twisted
import treq

from tests.redis_fixture import redis_server, wait_until  # noqa: F401 (fixture)
from tests.rate_probe import probed  # noqa: F401 (fixture)


async def get(daemon, path):
    response = await treq.get(daemon.url + path)
    await response.content()
    return response


async def rate_limiter_component(daemon):
    response = await treq.get(daemon.url + "/api/cloud/health")
    body = json.loads(await response.content())
    return next(c for c in body["components"] if c["name"] == "rate_limiter")


async def component_status(daemon, status):
    """The rate_limiter component reaches ``status``: reports keep a result for
    ``server.health_cache_seconds``, so a change shows within that interval."""
    async def reached():
        return (await rate_limiter_component(daemon))["status"] == status
    await wait_until(reached, timeout=daemon.ctx.health.cache_seconds + 10)
    return await rate_limiter_component(daemon)


async def alternate(one, two, n, path="/api/probe/other"):
    codes = []
    for i in range(n):
        codes.append((await get(one if i % 2 == 0 else two, path)).code)
    return codes


@pytest_twisted.ensureDeferred
async def test_two_instances_share_limits_through_redis(make_daemon, probed, redis_server):
    settings = {"rate_limit": {"backend": "redis", "redis_url": redis_server.url,
                               "exempt_loopback": False, "calls": 10, "timeout": 1.0}}
    one = await make_daemon(settings, subdir="one")
    two = await make_daemon(settings, subdir="two")
    assert one.port != two.port
    await wait_until(lambda: one.ctx.rate_limiter.backend.connected
                     and two.ctx.rate_limiter.backend.connected)

    # alternated between the instances: 429 at exactly the shared limit
    assert await alternate(one, two, 14) == [200] * 10 + [429] * 4
    response = await get(one, "/api/probe/other")
    assert response.headers.getRawHeaders("X-RateLimit-Remaining") == ["0"]
    assert (await rate_limiter_component(one))["status"] == "healthy"

    # Redis goes away: requests are still served (fail-open), health is degraded
    redis_server.stop()
    await wait_until(lambda: not one.ctx.rate_limiter.backend.connected
                     and not two.ctx.rate_limiter.backend.connected)
    assert await alternate(one, two, 6) == [200] * 6
    for daemon in (one, two):
        component = await component_status(daemon, "degraded")
        assert component["status"] == "degraded"
        assert "failing open" in component["message"]

    # Redis is back (empty): both reconnect by themselves and share limits again
    redis_server.start()
    await wait_until(lambda: one.ctx.rate_limiter.backend.connected
                     and two.ctx.rate_limiter.backend.connected)
    for daemon in (one, two):
        assert (await component_status(daemon, "healthy"))["status"] == "healthy"
    assert await alternate(one, two, 12) == [200] * 10 + [429] * 2


@pytest_twisted.ensureDeferred
async def test_fail_closed_refuses_while_redis_is_unreachable(make_daemon, probed):
    from tests.services import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    closed = await make_daemon({"rate_limit": {"backend": "redis", "redis_url": url,
                                               "exempt_loopback": False, "fail_open": False}},
                               subdir="closed")
    opened = await make_daemon({"rate_limit": {"backend": "redis", "redis_url": url,
                                               "exempt_loopback": False}}, subdir="open")
    response = await treq.post(closed.url + "/api/auth/login")
    body = json.loads(await response.content())
    assert response.code == 503
    assert body["error"] == "rate_limiter_unavailable"
    assert response.headers.getRawHeaders("Retry-After") == ["5"]
    assert (await rate_limiter_component(closed))["status"] == "unhealthy"
    assert (await get(closed, "/api/cloud/health/live")).code == 200  # health is never limited
    response = await treq.post(opened.url + "/api/auth/login")
    await response.content()
    assert response.code == 200
    assert response.headers.getRawHeaders("X-RateLimit-Limit") is None
    assert (await rate_limiter_component(opened))["status"] == "degraded"
