"""SafeTimerService on task.Clock: runs on schedule, survives errors, stops."""

from __future__ import annotations

from twisted.internet import defer, task

from stdaemon.timers import SafeTimerService


def test_runs_on_the_injected_clock_and_survives_errors():
    clock = task.Clock()
    calls = []
    errors = []

    def job():
        calls.append(clock.seconds())
        if len(calls) == 2:
            raise RuntimeError("boom")
        if len(calls) == 3:
            return defer.fail(ValueError("async boom"))

    timer = SafeTimerService("job", 10, job, clock, on_error=errors.append)
    timer.startService()
    assert calls == []                       # now=False: first run after one interval
    clock.advance(10)
    clock.advance(10)                        # raises: logged, counted, loop continues
    clock.advance(10)                        # fails asynchronously: same
    clock.advance(10)
    assert calls == [10, 20, 30, 40]
    assert timer.failures == 2 and errors == ["job", "job"]
    assert timer.last_error is None          # the last run succeeded
    timer.stopService()
    clock.advance(100)
    assert len(calls) == 4
    assert not clock.getDelayedCalls()       # nothing left behind


def test_stop_waits_for_the_run_in_progress():
    clock = task.Clock()
    pending = defer.Deferred()
    timer = SafeTimerService("slow", 5, lambda: pending, clock, now=True)
    timer.startService()
    stopped = timer.stopService()
    assert stopped is pending or (stopped is not None and not stopped.called)
    pending.callback(None)
    assert timer.runs == 1


def test_app_add_timer_counts_failures(tmp_path):
    from stdaemon.app import App
    from tests.conftest import build_config

    clock = task.Clock()
    ctx = App(build_config(tmp_path), reactor=clock, clock=clock)

    def broken():
        raise OSError("disk gone")

    ctx.add_timer("broken", 1, broken)
    ctx.services.startService()
    clock.advance(1)
    clock.advance(1)
    assert ctx.timer_failures == {"broken": 2}
    ctx.services.stopService()
