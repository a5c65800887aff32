"""Timers on the injected clock whose loop survives errors.

``TimerService``/``LoopingCall`` stop for good after one exception; every
periodic job in stdaemon (poller, backups, sweeps, evictions) runs through
:class:`SafeTimerService`, which catches, logs and counts each failure and
keeps going.

A timer that must run once across several instances is given a ``lease``
(``stdaemon.cluster.leases.TimerLeases``, chosen in ``build_app``): each tick
first asks ``lease.acquire(name)``; the run happens only if this instance holds
the lease, otherwise the tick is skipped (``skipped``).  Without a lease (one
instance, the default) every tick runs, as it always did.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer, task

from stdaemon.logs import get_logger

log = get_logger("stdaemon.timers")


class SafeTimerService(Service):
    def __init__(self, name: str, interval: float, fn: Callable[[], Any], clock: Any,
                 now: bool = False, on_error: Callable[[str], None] | None = None, lease: Any = None):
        self.name = name
        self.interval = interval
        self.fn = fn
        self.clock = clock
        self.now = now
        self.on_error = on_error
        self.lease = lease
        if lease is not None:
            lease.register(name)
        self.skipped = 0
        self.runs = 0
        self.failures = 0
        self.last_error: str | None = None
        self._loop: task.LoopingCall | None = None
        self._running_call: defer.Deferred | None = None

    def startService(self) -> None:
        super().startService()
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        # The loop's own Deferred never fails (``_tick`` swallows errors).
        self._loop.start(self.interval, now=self.now)

    def stopService(self) -> defer.Deferred | None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        # Let a run in progress finish before the service counts as stopped.
        return self._running_call

    def _tick(self) -> defer.Deferred:
        if self.lease is None:
            d = defer.maybeDeferred(self.fn)
        else:
            d = defer.ensureDeferred(self._leased_run())
        self._running_call = d

        def ok(result: Any) -> None:
            if result is _SKIPPED:
                self.skipped += 1
                return
            self.runs += 1
            self.last_error = None

        def failed(failure: Any) -> None:
            self.runs += 1
            self.failures += 1
            self.last_error = failure.getErrorMessage()
            log.failure("Timer {timer} failed (it keeps running)", failure=failure,
                        level=_error_level(), timer=self.name)
            if self.on_error is not None:
                try:
                    self.on_error(self.name)
                except Exception:
                    log.failure("Timer error hook failed", timer=self.name, level=_error_level())

        def done(result: Any) -> None:
            self._running_call = None
            return None

        d.addCallbacks(ok, failed)
        d.addBoth(done)
        return d


    async def _leased_run(self) -> Any:
        """The run, if this instance holds the lease (``acquire`` counts and logs a skip)."""
        if not await self.lease.acquire(self.name):
            return _SKIPPED
        # the lease is released on stop only once this run has ended
        result = await self.lease.running(self.name, defer.maybeDeferred(self.fn))
        return None if result is _SKIPPED else result


_SKIPPED = object()


def _error_level() -> Any:
    from twisted.logger import LogLevel

    return LogLevel.error
