"""The guide's limiter API over the memory and SQLite backends, and the fail-open/closed policy."""

import os
import sqlite3

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from stdaemon.ratelimit import service as ratelimit
from stdaemon.ratelimit.service import (
    BackendUnavailable, MemoryBackend, RateLimiting, SQLiteBackend, get_rate_limiter,
    make_rate_limiting, s3_rate_limiter, webhook_rate_limiter,
)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def memory(clock):
    limiting = RateLimiting(MemoryBackend(clock, sweep_interval=30), clock)
    limiting.startService()
    yield limiting
    limiting.stopService()
    assert clock.getDelayedCalls() == []  # no timer left behind


@pytest_twisted.ensureDeferred
async def test_check_track_and_usage(memory, clock):
    limiter = memory.get_rate_limiter(max_requests=3, window_seconds=60, key_prefix="api")
    assert [await limiter.check("user:123") for _ in range(3)] == [True, True, True]
    assert await limiter.check("user:123") is False
    assert await limiter.check("user:456") is True
    clock.advance(20)
    usage = await limiter.get_usage("user:123")
    assert usage == {"count": 3, "limit": 3, "remaining": 0, "reset_in_seconds": 40.0}
    clock.advance(40)
    async with limiter.track("user:123") as allowed:
        assert allowed is True
    usage = await limiter.get_usage("user:123")
    assert usage["count"] == 1 and usage["remaining"] == 2


@pytest_twisted.ensureDeferred
async def test_prefixes_keep_limiters_apart(memory):
    a = memory.get_rate_limiter(1, 60, "a")
    b = memory.get_rate_limiter(1, 60, "b")
    assert await a.check("k") and await b.check("k")
    assert not await a.check("k")


def test_limiter_arguments_are_validated(memory):
    with pytest.raises(ValueError):
        memory.get_rate_limiter(0, 60)
    with pytest.raises(ValueError):
        memory.get_rate_limiter(5, 0)


@pytest_twisted.ensureDeferred
async def test_module_api_and_presets_use_the_installed_backend(memory):
    ratelimit.install(memory)
    try:
        limiter = await get_rate_limiter(max_requests=2, window_seconds=60, key_prefix="api")
        assert limiter.limiting is memory
        for _ in range(100):
            assert await webhook_rate_limiter.check("198.51.100.1")
        assert not await webhook_rate_limiter.check("198.51.100.1")
        for _ in range(50):
            assert await s3_rate_limiter.check("198.51.100.1")
        assert not await s3_rate_limiter.check("198.51.100.1")
        async with s3_rate_limiter.track("198.51.100.2") as allowed:
            assert allowed
        assert (await s3_rate_limiter.get_usage("198.51.100.1"))["count"] == 50
        assert (await webhook_rate_limiter.get_usage("198.51.100.1"))["limit"] == 100
    finally:
        ratelimit.install(None)


@pytest_twisted.ensureDeferred
async def test_memory_is_bounded_by_timer_and_cap(clock):
    backend = MemoryBackend(clock, max_keys=1000, sweep_interval=30)
    limiting = RateLimiting(backend, clock)
    limiting.startService()
    limiter = limiting.get_rate_limiter(5, 60)
    for i in range(20_000):
        await limiter.check(f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}")
    assert backend.tracked_keys() == 1000
    clock.advance(30)
    assert backend.tracked_keys() == 1000  # still inside their window
    clock.advance(30)
    assert backend.tracked_keys() == 0  # the sweep timer dropped them all
    limiting.stopService()
    assert clock.getDelayedCalls() == []


class FlakyBackend:
    backend_name = "flaky"

    def __init__(self, clock):
        self.inner = MemoryBackend(clock)
        self.mode = "ok"

    def startService(self):
        pass

    def stopService(self):
        pass

    def _call(self, method, *args):
        if self.mode == "down":
            return defer.fail(BackendUnavailable("connection refused"))
        if self.mode == "hang":
            return defer.Deferred()
        return getattr(self.inner, method)(*args)

    def hit(self, *args):
        return self._call("hit", *args)

    def peek(self, *args):
        return self._call("peek", *args)

    def ping(self):
        return self._call("ping")


@pytest_twisted.ensureDeferred
async def test_fail_open_serves_and_reports_degraded(clock):
    backend = FlakyBackend(clock)
    limiting = RateLimiting(backend, clock, fail_open=True, timeout=0.5)
    limiter = limiting.get_rate_limiter(1, 60)
    assert await limiter.check("k")
    assert not await limiter.check("k")
    backend.mode = "down"
    assert await limiter.check("k")  # served although over the limit: fail-open
    outcome = await limiter.hit("k")
    assert outcome.allowed and outcome.degraded
    component = await limiting.health()
    assert (component.name, component.status) == ("rate_limiter", "degraded")
    assert "connection refused" in component.message and "failing open" in component.message
    assert (await limiter.get_usage("k"))["degraded"] is True
    backend.mode = "ok"
    assert (await limiting.health()).status == "healthy"
    assert not await limiter.check("k")  # the window survived the outage
    assert limiting.failures == 4


@pytest_twisted.ensureDeferred
async def test_fail_closed_refuses_and_reports_unhealthy(clock):
    backend = FlakyBackend(clock)
    limiting = RateLimiting(backend, clock, fail_open=False, timeout=0.5)
    limiter = limiting.get_rate_limiter(5, 60)
    backend.mode = "down"
    assert not await limiter.check("k")
    assert (await limiting.health()).status == "unhealthy"


@pytest_twisted.ensureDeferred
async def test_a_hanging_backend_is_bounded_by_the_timeout(clock):
    backend = FlakyBackend(clock)
    limiting = RateLimiting(backend, clock, fail_open=True, timeout=0.5)
    limiter = limiting.get_rate_limiter(5, 60)
    backend.mode = "hang"
    d = defer.ensureDeferred(limiter.check("k"))
    assert not d.called
    clock.advance(0.5)
    assert d.called and await d is True
    assert limiting.last_error == "no answer within 0.5 s"
    d = defer.ensureDeferred(limiting.health())
    clock.advance(0.5)
    assert (await d).status == "degraded"


@pytest_twisted.ensureDeferred
async def test_sqlite_is_shared_by_two_processes_worth_of_backends(tmp_path, clock):
    from twisted.internet import reactor

    path = str(tmp_path / "state" / "ratelimit.db")
    one = RateLimiting(SQLiteBackend(path, clock, reactor), clock, timeout=10)
    two = RateLimiting(SQLiteBackend(path, clock, reactor), clock, timeout=10)
    one.startService()
    two.startService()
    try:
        a = one.get_rate_limiter(5, 60, "api")
        b = two.get_rate_limiter(5, 60, "api")
        results = []
        for i in range(8):
            results.append(await (a if i % 2 == 0 else b).check("1.2.3.4"))
        assert results == [True] * 5 + [False] * 3
        # concurrent decisions never take more than the limit
        c = one.get_rate_limiter(10, 60, "burst")
        d = two.get_rate_limiter(10, 60, "burst")
        answers = await defer.gatherResults(
            [defer.ensureDeferred((c if i % 2 else d).check("k")) for i in range(30)])
        assert sum(answers) == 10
        usage = await b.get_usage("1.2.3.4")
        assert usage == {"count": 5, "limit": 5, "remaining": 0, "reset_in_seconds": 60.0}
        clock.advance(60)
        assert await a.check("1.2.3.4")
        assert (await one.health()).status == "healthy"
        assert oct(os.stat(path).st_mode & 0o777) == "0o600"
        # the sweep deletes expired rows
        clock.advance(61)
        await one.backend.sweep()
        rows = sqlite3.connect(path).execute("SELECT count(*) FROM rate_limit").fetchone()[0]
        assert rows == 0
    finally:
        await one.stopService()
        await two.stopService()


@pytest_twisted.ensureDeferred
async def test_sqlite_damaged_row_is_a_fresh_window(tmp_path, clock):
    from twisted.internet import reactor

    path = str(tmp_path / "rl.db")
    limiting = RateLimiting(SQLiteBackend(path, clock, reactor), clock, timeout=10)
    limiting.startService()
    try:
        limiter = limiting.get_rate_limiter(1, 60)
        assert await limiter.check("k")
        conn = sqlite3.connect(path)
        conn.execute("UPDATE rate_limit SET timestamps = 'not json'")
        conn.commit()
        conn.close()
        assert await limiter.check("k")
        assert not await limiter.check("k")
    finally:
        await limiting.stopService()


@pytest_twisted.ensureDeferred
async def test_sqlite_unusable_file_fails_open_not_500(tmp_path, clock):
    from twisted.internet import reactor

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    limiting = RateLimiting(SQLiteBackend(str(blocker / "rl.db"), clock, reactor), clock,
                            timeout=10)
    limiting.startService()
    try:
        assert await limiting.get_rate_limiter(1, 60).check("k")
        assert not limiting.available
    finally:
        await limiting.stopService()


def test_make_rate_limiting_picks_the_configured_backend(tmp_path, clock):
    from stdaemon.config.schema import RateLimitConfig
    from stdaemon.ratelimit.redis_backend import RedisBackend

    assert isinstance(make_rate_limiting(RateLimitConfig(), clock).backend, MemoryBackend)
    lim = make_rate_limiting(RateLimitConfig(backend="sqlite"), clock, state_dir=str(tmp_path))
    assert lim.backend.path == os.path.join(str(tmp_path), "config", "cloud", "ratelimit.db")
    lim = make_rate_limiting(RateLimitConfig(backend="redis", redis_url="redis://h:7000/2",
                                             fail_open=False), clock)
    assert isinstance(lim.backend, RedisBackend) and not lim.fail_open
    assert lim.backend.settings["db"] == 2


CHILD = """
import sys
from stdaemon.ratelimit.service import SQLiteBackend
backend = SQLiteBackend(sys.argv[1], clock=None, reactor=object())
now = float(sys.argv[2])
# the key limiter "x" of the parent uses for "k"
print(''.join('1' if backend._decide('limiter.x:k', 10, 60, now, True).allowed else '0'
              for _ in range(int(sys.argv[3]))))
"""


@pytest_twisted.ensureDeferred
async def test_sqlite_window_is_shared_with_another_process(tmp_path, clock):
    import sys

    from twisted.internet import reactor
    from twisted.internet.utils import getProcessOutput

    clock.advance(1000)
    path = str(tmp_path / "shared.db")
    limiting = RateLimiting(SQLiteBackend(path, clock, reactor), clock, timeout=30)
    limiting.startService()
    try:
        limiter = limiting.get_rate_limiter(10, 60, "x")
        assert [await limiter.check("k") for _ in range(4)] == [True] * 4
        # another process takes from the same window
        out = await getProcessOutput(
            sys.executable, ["-c", CHILD, path, "1000.5", "9"],
            env={"PYTHONPATH": os.getcwd()}, reactor=reactor)
        assert out.decode().strip() == "1" * 6 + "0" * 3
        assert not await limiter.check("k")
    finally:
        await limiting.stopService()
