"""Component checks are shared by concurrent reports and, when configured, kept briefly (injected
clock); never stale after a state-changing request."""

from __future__ import annotations

import pytest_twisted
import treq
from twisted.internet import defer, reactor, task

from stdaemon.health.service import HEALTHY, Component


async def report(daemon):
    response = await treq.get(daemon.url + "/api/cloud/health")
    assert response.code == 200
    body = await response.json()
    return {c["name"]: c for c in body["components"]}


@pytest_twisted.ensureDeferred
async def test_checks_are_kept_for_the_interval_and_shared_by_concurrent_requests(make_daemon):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    daemon = await make_daemon({"server": {"health_cache_seconds": 1.5}}, clock=clock)
    assert daemon.ctx.health.cache_seconds == 1.5
    runs = []
    gate = [None]

    async def probe():
        runs.append(clock.seconds())
        if gate[0] is not None:
            await gate[0]
        return Component("probe", HEALTHY, f"run {len(runs)}")

    daemon.ctx.health.register("probe", probe)
    assert (await report(daemon))["probe"]["message"] == "run 1"
    assert (await report(daemon))["probe"]["message"] == "run 1"      # kept
    clock.advance(daemon.ctx.health.cache_seconds)
    assert (await report(daemon))["probe"]["message"] == "run 2"      # interval over
    # A request that may change state: the next report runs the checks again.
    response = await treq.post(daemon.url + "/api/auth/logout", headers=daemon.admin_headers)
    await response.content()
    assert (await report(daemon))["probe"]["message"] == "run 3"
    # Concurrent requests while a check runs wait for that one run.
    clock.advance(daemon.ctx.health.cache_seconds)
    gate[0] = defer.Deferred()
    pending = [defer.ensureDeferred(report(daemon)) for _ in range(5)]
    for _ in range(500):
        if len(runs) == 4:
            break
        await task.deferLater(reactor, 0.01, lambda: None)
    await task.deferLater(reactor, 0.2, lambda: None)   # all five are waiting
    gate[0].callback(None)
    results = await defer.gatherResults(pending)
    assert {r["probe"]["message"] for r in results} == {"run 4"} and len(runs) == 4


def counting_probe():
    """A check whose message says how many times it ran."""
    runs = []

    async def probe():
        runs.append(1)
        return Component("probe", HEALTHY, f"run {len(runs)}")

    return probe


@pytest_twisted.ensureDeferred
async def test_by_default_results_are_kept_one_second(make_daemon):
    clock = task.Clock()
    clock.advance(1_800_000_000)
    daemon = await make_daemon(None, clock=clock)
    assert daemon.ctx.health.cache_seconds == 1.0
    daemon.ctx.health.register("probe", counting_probe())
    assert (await report(daemon))["probe"]["message"] == "run 1"
    first = await (await treq.get(daemon.url + "/api/cloud/health")).json()
    clock.advance(0.5)
    assert (await report(daemon))["probe"]["message"] == "run 1"
    # the components are the kept ones; the report's own time is the clock's
    later = await (await treq.get(daemon.url + "/api/cloud/health")).json()
    assert later["components"] == first["components"]
    assert round(later["uptime_seconds"] - first["uptime_seconds"], 3) == 0.5
    assert later["timestamp"] != first["timestamp"]
    assert list(later) == ["status", "version", "uptime_seconds", "timestamp", "components"]
    clock.advance(0.5)
    assert (await report(daemon))["probe"]["message"] == "run 2"


@pytest_twisted.ensureDeferred
async def test_zero_runs_every_check_for_every_report(make_daemon):
    daemon = await make_daemon({"server": {"health_cache_seconds": 0}})
    daemon.ctx.health.register("probe", counting_probe())
    assert (await report(daemon))["probe"]["message"] == "run 1"
    assert (await report(daemon))["probe"]["message"] == "run 2"


def test_a_report_of_kept_results_is_handed_out_again_only_while_they_are_fresh():
    from stdaemon.health.service import HealthRegistry

    clock = task.Clock()
    clock.advance(1_000)
    registry = HealthRegistry(clock, cache_seconds=1.0)
    registry.register("a", counting_probe())
    registry.register("b", counting_probe())

    def report():
        found = []
        registry.check_all().addCallback(found.append)
        return found[0]

    first = report()                              # runs both checks
    kept = report()                               # every result kept: a report is made of them
    assert [c.message for c in kept] == ["run 1", "run 1"]
    assert report() is kept                       # ... and handed out again while fresh
    clock.advance(0.5)
    assert report() is kept
    registry.invalidate()                         # a state-changing request
    after = report()
    assert after is not kept and after is not first and [c.message for c in after] == ["run 2", "run 2"]
    kept = report()
    clock.advance(1.0)                            # the oldest result is no longer fresh
    assert [c.message for c in report()] == ["run 3", "run 3"]
    registry.check_all(include_optional=True)     # a new result from another run forgets the report
    registry.register("c", counting_probe())
    assert [c.message for c in report()][-1] == "run 1"
