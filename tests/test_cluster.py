"""Several instances on one REAL redis-server: job events relayed between them (SSE included),
reconnection after Redis restarts, and the run-once timers' leases (one runner per tick, take-over
after the holder's lease expires, skipped runs while Redis is away). stdaemon's own timing runs on
task.Clock; Redis's key expiry is real time."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet.task import Clock

from stdaemon.cluster import messages
from stdaemon.cluster.service import ClusterService
from stdaemon.config import load_config
from stdaemon.config.schema import ClusterConfig
from stdaemon.events.service import PUBLIC_JOB_FIELDS, EventBus
from stdaemon.health.service import DEGRADED, HEALTHY
from stdaemon.invalid import InvalidValue
from stdaemon.metrics.service import Metrics
from stdaemon.timers import SafeTimerService
from tests.redis_fixture import redis_server, wait_until  # noqa: F401 (fixture)
from tests.test_approvals_quotas_events import open_stream, until
from tests.test_metrics import GUIDE_NAME_LINTS, promtool_problems, samples


def _reactor():
    from twisted.internet import reactor

    return reactor


# -- pure: messages, backoff, config -----------------------------------------------------------

def test_event_messages_round_trip_and_refuse_anything_else():
    text = messages.encode_event("a/1", 7, "job", 3, {"job_id": "j", "status": "running", "metadata": "x"})
    event = messages.decode_event(text.encode(), PUBLIC_JOB_FIELDS)
    assert (event.origin, event.number, event.type, event.user_id) == ("a/1", 7, "job", 3)
    assert event.data == {"job_id": "j", "status": "running"}          # only public fields pass
    for bad in (b"\xff", "not json", "[]", json.dumps({"v": 2}), "x" * 70_000,
                json.dumps({"v": 1, "origin": "a", "n": 0, "type": "job", "data": {}}),
                json.dumps({"v": 1, "origin": "a", "n": 1, "type": "Job!", "data": {}}),
                json.dumps({"v": 1, "origin": "a", "n": 1, "type": "job", "user_id": "1", "data": {}}),
                json.dumps({"v": 1, "origin": "", "n": 1, "type": "job", "data": {}}),
                json.dumps({"v": 1, "origin": "a", "n": 1, "type": "job", "data": []})):
        with pytest.raises(messages.BadMessage):
            messages.decode_event(bad, PUBLIC_JOB_FIELDS)


def test_backoff_doubles_to_the_cap_with_bounded_jitter():
    assert [messages.backoff_delay(n, 0.5, 4.0) for n in (1, 2, 3, 4, 5, 50)] == [0.5, 1, 2, 4, 4, 4]
    assert messages.backoff_delay(1, 1.0, 10.0, jitter=1.0) == pytest.approx(1.1)
    assert messages.backoff_delay(1, 1.0, 10.0, jitter=-5) == pytest.approx(0.9)


def test_cluster_config_loads_from_env_and_is_validated(tmp_path):
    default = load_config(None, environ={}).config.cluster
    assert default == ClusterConfig() and default.redis_url == ""      # one instance by default
    config = load_config(None, environ={"SIMPLETUNER_CLUSTER_REDIS_URL": "redis://:pw@10.0.0.1:6380/2",
                                        "SIMPLETUNER_CLUSTER_INSTANCE_ID": "web-1",
                                        "SIMPLETUNER_CLUSTER_LEASE_SECONDS": "45"}).config
    assert (config.cluster.redis_url, config.cluster.instance_id, config.cluster.lease_seconds) == \
        ("redis://:pw@10.0.0.1:6380/2", "web-1", 45.0)
    assert config.sources["cluster.redis_url"] == "env"
    ini = tmp_path / "c.ini"
    ini.write_text("[cluster]\nredis_url = unix:///run/redis.sock?db=1\nnamespace = prod\ntimeout = 0.5\n"
                   "lease_seconds = 2\n")
    loaded = load_config(str(ini), environ={}).config.cluster
    assert (loaded.redis_url, loaded.namespace, loaded.timeout, loaded.lease_seconds) == \
        ("unix:///run/redis.sock?db=1", "prod", 0.5, 2.0)
    for env, path in (({"SIMPLETUNER_CLUSTER_REDIS_URL": "http://:secret@h"}, "cluster.redis_url"),
                      ({"SIMPLETUNER_CLUSTER_REDIS_URL": "redis://h:port/0"}, "cluster.redis_url"),
                      ({"SIMPLETUNER_CLUSTER_REDIS_URL": "redis://h/db"}, "cluster.redis_url"),
                      ({"SIMPLETUNER_CLUSTER_REDIS_URL": "redis:///0"}, "cluster.redis_url"),
                      ({"SIMPLETUNER_CLUSTER_INSTANCE_ID": "a b"}, "cluster.instance_id"),
                      ({"SIMPLETUNER_CLUSTER_LEASE_SECONDS": "0"}, "cluster.lease_seconds"),
                      ({"SIMPLETUNER_CLUSTER_LEASE_SECONDS": "2"}, "cluster.lease_seconds")):  # < 3 x timeout
        with pytest.raises(InvalidValue) as info:
            load_config(None, environ=env)
        assert info.value.field == path, env
        assert "secret" not in str(info.value)


# -- pure: the bus's side of the relay -----------------------------------------------------------

def test_bus_relays_its_own_events_and_shows_relayed_ones_in_order_per_job():
    bus = EventBus(Clock())
    sent = []
    bus.relay = lambda *args: sent.append(args)
    bus.publish({"job_id": "j", "status": "queued", "user_id": 1, "metadata": {"secret": 1}})
    assert sent == [("job", {"job_id": "j", "status": "queued", "user_id": 1}, 1)]
    assert bus.receive("job", {"job_id": "j", "status": "running"}, 1) is not None
    assert bus.receive("job", {"job_id": "j", "status": "queued"}, 1) is None      # would go back
    assert bus.receive("job", {"job_id": "j", "status": "running", "progress": 5}, 1) is not None
    assert bus.receive("job", {"job_id": "j", "status": "completed"}, 1) is not None
    assert bus.receive("job", {"job_id": "j", "status": "failed"}, 1) is None      # finished already
    assert [e.data["status"] for e in bus.backlog] == ["queued", "running", "running", "completed"]
    assert (bus.published, bus.received, bus.stale) == (1, 3, 2)
    assert len(sent) == 1                                # a relayed event is never relayed again


def test_cluster_metrics_pass_promtool_and_show_the_figures():
    metrics = Metrics(Clock())
    metrics.register_cluster_source(lambda: {
        "events_relayed": 4, "events_received": 3, "events_dropped": 1, "events_pending": 2,
        "subscriptions": 2, "connected": {"commands": True, "subscription": False},
        "leases": [("jobs.poll", True, 2, 1, 0, 3), ("backup", False, 0, 0, 7, 0)]})
    body = metrics.render(["health"])[0]
    assert set(promtool_problems(body)) <= GUIDE_NAME_LINTS
    found = samples(body.decode())
    assert found[("simpletuner_cluster_events_relayed_total", frozenset())] == 4
    assert found[("simpletuner_cluster_events_pending", frozenset())] == 2
    assert found[("simpletuner_cluster_redis_connected", frozenset({("connection", "subscription")}))] == 0
    assert found[("simpletuner_cluster_lease_held", frozenset({("timer", "jobs.poll")}))] == 1
    assert found[("simpletuner_cluster_lease_lost_total", frozenset({("timer", "jobs.poll")}))] == 1
    assert found[("simpletuner_cluster_lease_skipped_total",
                  frozenset({("timer", "backup"), ("reason", "held_elsewhere")}))] == 7


# -- real Redis ---------------------------------------------------------------------------------

@pytest.fixture
def cluster(redis_server):  # noqa: F811 (fixture)
    """``make(instance_id, clock=None, **config)`` → a started ClusterService wired to an EventBus."""
    made = []

    def make(instance_id, clock=None, **settings):
        clock = clock if clock is not None else Clock()
        options = {"redis_url": redis_server.url, "instance_id": instance_id, "timeout": 0.5,
                   "lease_seconds": 1.5, **settings}
        service = ClusterService(ClusterConfig(**options), clock, _reactor(), PUBLIC_JOB_FIELDS,
                                 initial_delay=0.1, max_delay=0.4)
        bus = EventBus(clock)
        bus.relay = service.relay.send
        service.relay.on_event.append(bus.receive)
        service.bus = bus
        service.startService()
        made.append(service)
        return service

    yield make
    for service in reversed(made):
        if service.running:
            pytest_twisted.blockon(defer.maybeDeferred(service.stopService))


async def _subscribed(*services):
    await wait_until(lambda: all(s.relay.healthy for s in services), timeout=10)


def _statuses(bus):
    return [(e.data["job_id"], e.data["status"]) for e in bus.backlog]


@pytest_twisted.ensureDeferred
async def test_an_event_reaches_the_other_instance_once_and_in_order(cluster):
    a, b = cluster("a"), cluster("b")
    await _subscribed(a, b)
    for status in ("queued", "running", "completed"):
        a.bus.publish({"job_id": "j1", "status": status, "user_id": 1})
    b.bus.publish({"job_id": "j2", "status": "queued", "user_id": 2})
    await wait_until(lambda: len(b.bus.backlog) == 4 and len(a.bus.backlog) == 4, timeout=10)
    assert _statuses(b.bus) == [("j2", "queued"), ("j1", "queued"), ("j1", "running"), ("j1", "completed")]
    assert _statuses(a.bus) == [("j1", "queued"), ("j1", "running"), ("j1", "completed"), ("j2", "queued")]
    # nothing arrives twice: the instance's own messages are not delivered back to it
    await wait_until(lambda: a.relay.relayed == 3 and b.relay.relayed == 1, timeout=5)
    assert (a.relay.received, b.relay.received) == (1, 3)
    assert len(a.bus.backlog) == 4 and len(b.bus.backlog) == 4
    # a message that is not an event is counted and ignored
    a.commands.protocol.publish(a.relay.channel, "hello")
    await wait_until(lambda: b.relay.malformed == 1, timeout=5)
    assert len(b.bus.backlog) == 4
    assert (await b.events_health()).status == HEALTHY


@pytest_twisted.ensureDeferred
async def test_an_event_on_one_daemon_reaches_an_sse_stream_on_the_other(make_daemon, redis_server):  # noqa: F811
    settings = {"cluster": {"redis_url": redis_server.url, "timeout": 0.5, "lease_seconds": 2}}
    one = await make_daemon(settings={"cluster": {**settings["cluster"], "instance_id": "one"}}, subdir="one")
    two = await make_daemon(settings={"cluster": {**settings["cluster"], "instance_id": "two"}}, subdir="two")
    await _subscribed(one.ctx.cluster, two.ctx.cluster)
    response, reader, done = await open_stream(one, one.admin_key)
    assert response.code == 200
    two.ctx.events.publish({"job_id": "from-two", "status": "running", "user_id": None})
    one.ctx.events.publish({"job_id": "from-one", "status": "queued", "user_id": None})
    assert await until(lambda: {e["data"]["job_id"] for e in reader.events} == {"from-two", "from-one"})
    await until(lambda: False, rounds=10)                 # a moment for any duplicate to show up
    assert sorted(e["data"]["job_id"] for e in reader.events) == ["from-one", "from-two"]
    assert all(e["id"].startswith(one.ctx.events.boot + "-") for e in reader.events)
    # health and metrics of a clustered daemon
    report = {c.name: c for c in await one.ctx.health.check_all()}
    assert report["cluster_events"].status == HEALTHY and report["cluster_leases"].status == HEALTHY
    await wait_until(lambda: one.ctx.cluster.relay.relayed == 1, timeout=5)
    text = one.ctx.metrics.render(["health"])[0].decode()
    found = samples(text)
    assert found[("simpletuner_cluster_events_received_total", frozenset())] == 1
    assert found[("simpletuner_cluster_events_relayed_total", frozenset())] == 1
    assert found[("simpletuner_cluster_redis_connected", frozenset({("connection", "subscription")}))] == 1
    assert ("simpletuner_cluster_lease_held", frozenset({("timer", "jobs.poll")})) in found
    one.ctx.events.close_all()
    await done


@pytest_twisted.ensureDeferred
async def test_the_subscription_comes_back_after_redis_restarts(cluster, redis_server):  # noqa: F811
    clock = Clock()
    a, b = cluster("a", clock=clock), cluster("b", clock=clock)
    await _subscribed(a, b)
    redis_server.stop()
    await wait_until(lambda: not a.relay.subscribed and not b.relay.subscribed, timeout=10)
    assert (await a.events_health()).status == DEGRADED
    # local events still flow while Redis is away; the one to relay waits for it
    a.bus.publish({"job_id": "during", "status": "running", "user_id": None})
    assert _statuses(a.bus) == [("during", "running")] and a.relay.pending == 1
    # reconnection is retried on the injected clock (refused while Redis is down)
    attempts = a.subscriber.failures
    for _ in range(5):
        clock.advance(0.5)
        await wait_until(lambda: a.subscriber.failures > attempts, timeout=5)
        attempts = a.subscriber.failures
    redis_server.start()

    async def back():
        clock.advance(0.5)
        return a.relay.healthy and b.relay.healthy

    await wait_until(back, timeout=15)
    assert a.relay.subscriptions == 2 and b.relay.subscriptions == 2
    # the waiting event was published once Redis was back (b sees it only if it had resubscribed by
    # then: pub/sub keeps nothing for a subscriber that is away)
    await wait_until(lambda: a.relay.pending == 0 and a.relay.relayed == 1, timeout=5)
    b.bus.publish({"job_id": "after", "status": "queued", "user_id": None})
    await wait_until(lambda: ("after", "queued") in _statuses(a.bus), timeout=5)
    assert (await a.events_health()).status == HEALTHY


@pytest_twisted.ensureDeferred
async def test_a_redis_that_stops_answering_is_cut_off_on_the_clock_and_rejoined(cluster, redis_server):  # noqa: F811
    clock = Clock()
    a, b = cluster("a", clock=clock), cluster("b", clock=clock)
    await _subscribed(a, b)
    redis_server.pause()                             # accepts connections, answers nothing
    try:
        a.bus.publish({"job_id": "hung", "status": "queued", "user_id": None})
        assert _statuses(a.bus) == [("hung", "queued")]          # shown here at once
        assert a.commands.in_flight == 1
        clock.advance(0.5)                           # cluster.timeout: the call is given up
        await wait_until(lambda: not a.commands.connected, timeout=5)
        assert a.relay.pending == 1                  # kept for the next connection
        clock.advance(5)                             # the subscription's ping goes unanswered...
        clock.advance(0.5)                           # ...and is given up: it reconnects too
        await wait_until(lambda: not a.relay.subscribed, timeout=5)
        assert (await a.events_health()).status == DEGRADED
        for _ in range(3):                           # connecting to a frozen Redis times out too
            failures = a.commands.failures
            clock.advance(0.5)
            clock.advance(0.5)
            await wait_until(lambda: a.commands.failures > failures, timeout=5)
    finally:
        redis_server.resume()

    async def back():
        clock.advance(0.5)
        return a.relay.healthy and b.relay.healthy and a.relay.pending == 0

    await wait_until(back, timeout=15)
    assert a.relay.relayed == 1


# -- leases -----------------------------------------------------------------------------------

def _leased_timer(service, clock, runs, name="jobs.poll"):
    timer = SafeTimerService(name, 10, lambda: runs.append(service.instance_id), clock, lease=service.leases)
    timer.startService()
    return timer


async def _tick(clock, timers, seconds=10):
    """Advance the clock once every Redis call in flight is answered (task.Clock jumps: a call still
    on the wire would otherwise time out at once), then wait for the runs the advance started."""
    services = {t.lease for t in timers if t.lease is not None}
    await wait_until(lambda: all(s.connection.in_flight == 0 for s in services), timeout=5)
    clock.advance(seconds)
    await wait_until(lambda: all(t._running_call is None for t in timers), timeout=5)
    await wait_until(lambda: all(s.connection.in_flight == 0 for s in services), timeout=5)


@pytest_twisted.ensureDeferred
async def test_one_runner_per_tick_and_take_over_when_the_holder_dies(cluster, redis_server):  # noqa: F811
    clock = Clock()
    a, b = cluster("a", clock=clock), cluster("b", clock=clock)
    await wait_until(lambda: a.commands.connected and b.commands.connected, timeout=10)
    runs: list = []
    timers = [_leased_timer(a, clock, runs), _leased_timer(b, clock, runs)]
    for tick in range(1, 6):
        await _tick(clock, timers)
        assert len(runs) == tick                     # exactly one instance ran each tick
    assert len(set(runs)) == 1                       # and it is the same one: it keeps the lease
    holder, other = (a, b) if runs[0] == "a" else (b, a)
    assert holder.leases.held.keys() == {"jobs.poll"} and not other.leases.held
    assert other.leases.figures() == [("jobs.poll", False, 0, 0, 5, 0)]
    assert redis_server.cli("get", "stdaemon:lease:jobs.poll") == holder.leases.token
    # the holder dies (no release): nobody runs until Redis expires its lease (lease_seconds real time)
    timers[[a, b].index(holder)].stopService()
    await holder.commands.stop()
    holder.leases._renewing.stop()
    await _tick(clock, timers)
    assert len(runs) == 5
    await wait_until(lambda: redis_server.cli("exists", "stdaemon:lease:jobs.poll") == "0", timeout=5)
    await _tick(clock, timers)
    assert runs[-1] == other.instance_id and len(runs) == 6
    assert other.leases.acquired == {"jobs.poll": 1}
    await _tick(clock, timers)
    assert runs[-2:] == [other.instance_id] * 2


@pytest_twisted.ensureDeferred
async def test_a_clean_stop_hands_the_lease_over_at_the_next_tick(cluster, redis_server):  # noqa: F811
    clock = Clock()
    a, b = cluster("a", clock=clock), cluster("b", clock=clock)
    await wait_until(lambda: a.commands.connected and b.commands.connected, timeout=10)
    runs: list = []
    timer_a = _leased_timer(a, clock, runs, "backup")
    await _tick(clock, [timer_a])
    timer_b = _leased_timer(b, clock, runs, "backup")
    # the holder renews every lease_seconds / 3 of its clock: the lease outlives lease_seconds (1.5 s)
    # of real time in Redis
    for _ in range(5):
        await until(lambda: False, rounds=20)                # 0.4 s of real time
        await _tick(clock, [timer_a, timer_b], seconds=0.5)
    assert redis_server.cli("get", "stdaemon:lease:backup") == a.leases.token
    assert runs == ["a"] and b.leases.figures()[0][4] == 0   # b has not ticked yet (interval 10)
    await _tick(clock, [timer_a, timer_b], seconds=10)
    assert runs == ["a", "a"]
    timer_a.stopService()
    await a.stopService()                                    # releases the lease
    assert redis_server.cli("exists", "stdaemon:lease:backup") == "0"
    await _tick(clock, [timer_b])
    assert runs == ["a", "a", "b"]


@pytest_twisted.ensureDeferred
async def test_a_stopping_holder_keeps_the_lease_until_its_run_ends(cluster, redis_server):  # noqa: F811
    clock = Clock()
    a = cluster("a", clock=clock)
    await wait_until(lambda: a.commands.connected, timeout=10)
    run = defer.Deferred()
    timer = SafeTimerService("approval-expiry", 10, lambda: run, clock, lease=a.leases)
    timer.startService()
    clock.advance(10)
    await wait_until(lambda: "approval-expiry" in a.leases.held, timeout=5)
    # the daemon stops its services together: the timer waits for its run, the cluster for the lease
    stopping = defer.DeferredList([defer.maybeDeferred(timer.stopService), a.stopService()])
    await until(lambda: False, rounds=5)
    assert redis_server.cli("get", "stdaemon:lease:approval-expiry") == a.leases.token
    run.callback(None)
    await stopping
    assert redis_server.cli("exists", "stdaemon:lease:approval-expiry") == "0"
    assert timer.runs == 1


@pytest_twisted.ensureDeferred
async def test_leased_runs_are_skipped_and_counted_while_redis_is_away(cluster, redis_server):  # noqa: F811
    clock = Clock()
    a = cluster("a", clock=clock)
    await wait_until(lambda: a.commands.connected, timeout=10)
    runs: list = []
    timer = _leased_timer(a, clock, runs)
    await _tick(clock, [timer])
    assert runs == ["a"]
    redis_server.stop()
    await wait_until(lambda: not a.commands.connected, timeout=10)
    await _tick(clock, [timer])
    await _tick(clock, [timer])
    assert runs == ["a"] and timer.skipped == 2 and timer.failures == 0
    health = await a.leases_health()
    assert health.status == DEGRADED and "2 skipped" in health.message
    metrics = Metrics(clock)
    metrics.register_cluster_source(a.figures)
    found = samples(metrics.render(["health"])[0].decode())
    assert found[("simpletuner_cluster_lease_skipped_total",
                  frozenset({("timer", "jobs.poll"), ("reason", "redis_unavailable")}))] == 2
    assert found[("simpletuner_cluster_redis_connected", frozenset({("connection", "commands")}))] == 0
    redis_server.start()                                     # empty: the lease is gone, a takes it again

    async def back():
        clock.advance(0.5)
        return a.commands.connected

    await wait_until(back, timeout=15)
    health = await a.leases_health()           # connected again: healthy before the next tick
    assert health.status == HEALTHY and "2 run(s) skipped" in health.message
    await _tick(clock, [timer])
    assert runs == ["a", "a"] and (await a.leases_health()).status == HEALTHY
    assert a.leases.lost == {"jobs.poll": 1} and a.leases.acquired == {"jobs.poll": 2}


@pytest_twisted.ensureDeferred
async def test_a_single_instance_takes_no_lease_and_shows_no_cluster_parts(daemon):
    assert daemon.ctx.cluster.enabled is False and daemon.ctx.cluster.relay is None
    assert daemon.ctx.events.relay is None
    assert all(t.lease is None for t in daemon.ctx.services if isinstance(t, SafeTimerService))
    names = [c.name for c in await daemon.ctx.health.check_all()]
    assert not any(name.startswith("cluster") for name in names)
    assert "simpletuner_cluster" not in daemon.ctx.metrics.render(["health"])[0].decode()


@pytest.mark.parametrize("backend, leased", [("local", False), ("s3", True)])
def test_stale_multipart_uploads_are_swept_once_only_when_the_store_is_shared(tmp_path, backend, leased):
    """With storage.backend s3 every instance sees the same stale uploads: one sweeps them. With
    local storage each instance sweeps its own disk."""
    from twisted.internet import reactor

    from stdaemon.service import build_app
    from tests.conftest import build_config

    storage = {"backend": backend}
    if backend == "s3":
        storage.update(bucket="outputs-bucket", endpoint_url="http://127.0.0.1:9", region="us-east-1")
    config = build_config(tmp_path, {"cluster": {"redis_url": "redis://127.0.0.1:9/0"}, "storage": storage})
    app, _root = build_app(config, reactor, Clock())
    timers = {t.name: t for t in app.services if isinstance(t, SafeTimerService)}
    assert timers["jobs.poll"].lease is app.cluster.leases
    assert (timers["s3-multipart-cleanup"].lease is app.cluster.leases) is leased
