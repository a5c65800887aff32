"""The Redis backend against a real redis-server: atomic shared windows, expiry,
fail-open/closed when Redis goes away or hangs, and automatic reconnection."""

import random

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from stdaemon.ratelimit.redis_backend import RedisBackend, parse_redis_url
from stdaemon.ratelimit.service import MemoryBackend, RateLimiting
from tests.redis_fixture import redis_server, wait_until  # noqa: F401 (fixture)


def _reactor():
    from twisted.internet import reactor

    return reactor


@pytest.fixture
def started():
    services = []

    def start(service):
        service.startService()
        services.append(service)
        return service

    yield start
    for service in reversed(services):
        pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


def _limiting(url, started, clock=None, fail_open=True, timeout=1.0):
    reactor = _reactor()
    clock = clock if clock is not None else reactor
    backend = RedisBackend(url, clock, reactor, timeout=timeout, max_reconnect_delay=0.5)
    return started(RateLimiting(backend, clock, fail_open=fail_open, timeout=timeout))


def test_parse_redis_url():
    assert parse_redis_url("redis://:s3cret@10.0.0.5:6380/3") == {
        "scheme": "redis", "host": "10.0.0.5", "port": 6380, "path": None, "db": 3,
        "username": None, "password": "s3cret"}
    assert parse_redis_url("rediss://user:p%40ss@cache")["password"] == "p@ss"
    assert parse_redis_url("unix:///run/redis.sock?db=1")["path"] == "/run/redis.sock"
    with pytest.raises(ValueError):
        parse_redis_url("http://x")


@pytest_twisted.ensureDeferred
async def test_sliding_window_in_redis_matches_the_pure_logic(redis_server, started):
    clock = Clock()
    limiting = _limiting(redis_server.url, started, clock=clock)
    await wait_until(lambda: limiting.backend.connected)
    reference = MemoryBackend(clock)
    rng = random.Random(6)
    for _ in range(400):
        clock.advance(rng.choice([0, 0, 0.25, 0.5, 1, 3, 7.5]))
        key = rng.choice(["a", "b"])
        got = await limiting.backend.hit(key, 4, 10.0)
        want = reference.table.hit(key, clock.seconds(), 4, 10.0)
        assert (got.allowed, got.count, got.reset_at, got.retry_at) == \
            (want.allowed, want.count, want.reset_at, want.retry_at)


@pytest_twisted.ensureDeferred
async def test_no_double_burst_and_true_reset_times(redis_server, started):
    clock = Clock()
    clock.advance(1_700_000_000)
    limiting = _limiting(redis_server.url, started, clock=clock)
    await wait_until(lambda: limiting.backend.connected)
    limiter = limiting.get_rate_limiter(3, 10, "t")
    clock.advance(9)
    assert [await limiter.check("ip") for _ in range(3)] == [True] * 3
    clock.advance(1.5)  # across a fixed-window boundary: still the same 3 in the window
    outcome = await limiter.hit("ip")
    assert not outcome.allowed
    assert outcome.state.retry_after == 8.5
    assert outcome.state.reset_at == 1_700_000_019
    assert await limiter.get_usage("ip") == {"count": 3, "limit": 3, "remaining": 0,
                                             "reset_in_seconds": 8.5}
    clock.advance(8.5)
    assert await limiter.check("ip")
    # the key expires by itself (TTL set, no larger than the window plus a margin)
    key = "stdaemon:ratelimit:limiter.t:ip"
    ttl = int(redis_server.cli("pttl", key))
    assert 0 < ttl <= 11_000


@pytest_twisted.ensureDeferred
async def test_two_instances_share_exactly_the_limit(redis_server, started):
    one = _limiting(redis_server.url, started)
    two = _limiting(redis_server.url, started)
    await wait_until(lambda: one.backend.connected and two.backend.connected)
    a = one.get_rate_limiter(10, 60, "shared")
    b = two.get_rate_limiter(10, 60, "shared")
    answers = [await (a if i % 2 == 0 else b).check("203.0.113.7") for i in range(14)]
    assert answers == [True] * 10 + [False] * 4
    # concurrent decisions from both instances never take more than the limit
    burst = [defer.ensureDeferred(
        (one if i % 2 else two).get_rate_limiter(25, 60, "burst").check("k")) for i in range(80)]
    assert sum(await defer.gatherResults(burst)) == 25
    assert int(redis_server.cli("zcard", "stdaemon:ratelimit:limiter.burst:k")) == 25


@pytest_twisted.ensureDeferred
async def test_outage_fails_open_or_closed_then_reconnects(redis_server, started):
    open_ = _limiting(redis_server.url, started, fail_open=True)
    closed = _limiting(redis_server.url, started, fail_open=False)
    await wait_until(lambda: open_.backend.connected and closed.backend.connected)
    lo = open_.get_rate_limiter(2, 60, "outage")
    lc = closed.get_rate_limiter(2, 60, "outage")
    assert await lo.check("ip") and await lc.check("ip")
    assert not await lo.check("ip")
    assert (await open_.health()).status == "healthy"

    redis_server.stop()
    await wait_until(lambda: not open_.backend.connected and not closed.backend.connected)
    assert await lo.check("ip") is True       # fail-open: served although over the limit
    assert await lc.check("ip") is False      # fail-closed: refused
    health_open = await open_.health()
    health_closed = await closed.health()
    assert health_open.status == "degraded" and "failing open" in health_open.message
    assert health_closed.status == "unhealthy" and "failing closed" in health_closed.message

    redis_server.start()                      # same port, empty data
    await wait_until(lambda: open_.backend.connected and closed.backend.connected)
    assert (await open_.health()).status == "healthy"
    assert (await closed.health()).status == "healthy"
    answers = [await (lo if i % 2 else lc).check("ip") for i in range(4)]
    assert answers == [True, True, False, False]  # limits shared again


@pytest_twisted.ensureDeferred
async def test_a_hung_redis_is_cut_off_by_the_timeout(redis_server, started):
    limiting = _limiting(redis_server.url, started, timeout=0.3)
    await wait_until(lambda: limiting.backend.connected)
    limiter = limiting.get_rate_limiter(1, 60, "hang")
    assert await limiter.check("ip")
    redis_server.pause()
    try:
        assert await limiter.check("ip") is True  # no answer → timeout → fail-open
        assert limiting.last_error == "no answer within 0.3 s"
        assert (await limiting.health()).status == "degraded"
    finally:
        redis_server.resume()
    # txredisapi dropped the stalled connection; the backend reconnects by itself
    await wait_until(lambda: defer.ensureDeferred(_healthy(limiting)))
    assert not await limiter.check("ip")


async def _healthy(limiting):
    return (await limiting.health()).status == "healthy"


@pytest_twisted.ensureDeferred
async def test_unreachable_redis_at_start_fails_fast(started):
    from tests.services import free_port

    limiting = _limiting(f"redis://127.0.0.1:{free_port()}/0", started, timeout=5)
    # nothing listens there: no connection, the call fails at once (no waiting queue)
    outcome = await limiting.get_rate_limiter(1, 60).hit("k")
    assert outcome.allowed and outcome.degraded
    assert "not connected" in limiting.last_error
