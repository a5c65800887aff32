"""Leases for the timers that must run once across instances.

Each leased timer (``SafeTimerService(lease=...)``, chosen in
``stdaemon.service.build_app``) asks :meth:`TimerLeases.acquire` before each run.
The lease is one Redis key per timer, ``<namespace>:lease:<timer>``, whose value
is this process's token (instance id + a random boot part):

- taken with ``SET key token NX PX <lease>``: only one instance can hold it;
- kept by its holder: renewed (``PEXPIRE`` only if the value is still the
  holder's token, one Lua script) at each run and every ``lease / 3`` seconds
  in between, so the holder runs every tick and the others skip theirs;
- released on a clean stop (``DEL`` only if the value is the holder's token),
  so another instance takes over at its next tick;
- when the holder dies, Redis expires the key after at most ``lease`` seconds
  and the next instance whose tick comes takes it.

Redis's expiry is the truth across processes; the renewal schedule and the
local view of what is held run on the injected clock.

Redis unreachable: a leased timer skips its run and counts it
(``simpletuner_cluster_lease_skipped_total{reason="redis_unavailable"}``,
health component ``cluster_leases`` degraded) rather than run on every
instance at once; none of these timers loses work by waiting (the poller
catches up, expiry and sweeps act on what is due at their next run).  A holder
that cannot renew for a whole lease may find, when Redis is back, that another
instance took over: the renewal reports it ``lost`` and it stops running that
timer.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

from twisted.internet import defer, task

from stdaemon.cluster.connection import RedisConnection, RedisUnavailable
from stdaemon.cluster.messages import lease_key
from stdaemon.logs import get_logger

log = get_logger("stdaemon.cluster")

#: KEYS[1] the lease, ARGV[1] the holder's token, ARGV[2] milliseconds: 1 if renewed, 0 if not ours
RENEW_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
#: KEYS[1] the lease, ARGV[1] the holder's token: 1 if deleted, 0 if not ours
RELEASE_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

HELD_ELSEWHERE = "held_elsewhere"
REDIS_UNAVAILABLE = "redis_unavailable"


class TimerLeases:
    def __init__(self, connection: RedisConnection, clock: Any, *, namespace: str, instance_id: str,
                 lease_seconds: float):
        self.connection = connection
        self.clock = clock
        self.namespace = namespace
        self.instance_id = instance_id
        self.token = f"{instance_id}/{secrets.token_hex(6)}"
        self.lease_seconds = lease_seconds
        self.held: dict[str, float] = {}          # timer → when our lease ends, as last renewed (clock)
        self.timers: list[str] = []               # every leased timer, in registration order
        self.acquired: dict[str, int] = {}
        self.lost: dict[str, int] = {}
        self.skipped: dict[tuple[str, str], int] = {}
        self.unavailable: Optional[str] = None    # the last Redis failure, until a call succeeds
        self._renewing: Optional[task.LoopingCall] = None
        self._runs: dict[str, defer.Deferred] = {}  # timer → its run in progress (under our lease)

    @property
    def lease_ms(self) -> int:
        return max(1, int(round(self.lease_seconds * 1000)))

    def register(self, timer: str) -> None:
        if timer not in self.timers:
            self.timers.append(timer)

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        self._renewing = task.LoopingCall(self.renew_all)
        self._renewing.clock = self.clock
        self._renewing.start(self.lease_seconds / 3.0, now=False)

    def running(self, timer: str, run: defer.Deferred) -> defer.Deferred:
        """``run`` (a leased timer's run in progress) is waited for before the leases are released."""
        self._runs[timer] = run

        def ended(result: Any) -> Any:
            if self._runs.get(timer) is run:
                del self._runs[timer]
            return result

        return run.addBoth(ended)

    async def stop(self) -> None:
        """Once the runs in progress end (the lease stays renewed meanwhile), stop renewing and
        release what is held: another instance takes over at its next tick."""
        if self._runs:
            await defer.DeferredList(list(self._runs.values()), consumeErrors=True)
        if self._renewing is not None and self._renewing.running:
            self._renewing.stop()
        for timer in list(self.held):
            try:
                await self.connection.call("eval", RELEASE_SCRIPT, keys=[self._key(timer)], args=[self.token])
            except Exception as e:
                log.info("Lease {timer} not released ({error}); it expires in Redis", timer=timer,
                         error=str(e))
            self.held.pop(timer, None)

    def _key(self, timer: str) -> str:
        return lease_key(self.namespace, timer)

    # -- the question each leased tick asks ----------------------------------------------

    async def acquire(self, timer: str) -> bool:
        """True if this instance holds ``timer``'s lease now (renewed or newly taken) and may run it;
        False if another instance holds it or Redis cannot answer (the run is skipped and counted)."""
        self.register(timer)
        try:
            if timer in self.held:
                if await self._renew(timer):
                    return True
            taken = await self.connection.call("set", self._key(timer), self.token,
                                               pexpire=self.lease_ms, only_if_not_exists=True)
        except RedisUnavailable as e:
            self._skip(timer, REDIS_UNAVAILABLE)
            if self.unavailable is None:
                log.warning("Redis is unreachable: leased timers are skipped until it is back ({error})",
                            error=str(e))
            self.unavailable = str(e)
            return False
        self._answered()
        if taken in ("OK", b"OK", True):
            self.held[timer] = self.clock.seconds() + self.lease_seconds
            self.acquired[timer] = self.acquired.get(timer, 0) + 1
            log.info("Took the lease of timer {timer} ({token})", timer=timer, token=self.token)
            return True
        self._skip(timer, HELD_ELSEWHERE)
        return False

    async def _renew(self, timer: str) -> bool:
        renewed = await self.connection.call("eval", RENEW_SCRIPT, keys=[self._key(timer)],
                                             args=[self.token, self.lease_ms])
        self._answered()
        if int(renewed or 0) == 1:
            self.held[timer] = self.clock.seconds() + self.lease_seconds
            return True
        self.held.pop(timer, None)
        self.lost[timer] = self.lost.get(timer, 0) + 1
        log.warning("Lost the lease of timer {timer} (it expired and another instance may hold it)",
                    timer=timer)
        return False

    async def renew_all(self) -> None:
        """Renew every lease held (the LoopingCall between runs); failures are counted, never raised."""
        for timer in list(self.held):
            try:
                await self._renew(timer)
            except RedisUnavailable as e:
                self.unavailable = str(e)
                if self.clock.seconds() >= self.held.get(timer, 0):
                    # our own view: the lease has run out in Redis by now
                    self.held.pop(timer, None)
                    self.lost[timer] = self.lost.get(timer, 0) + 1
                    log.warning("Lease of timer {timer} ran out while Redis was unreachable", timer=timer)
            except Exception:
                log.failure("Renewing the lease of timer {timer} failed", timer=timer)

    def _answered(self) -> None:
        if self.unavailable is not None:
            log.info("Redis answers again: leased timers run on the lease holder")
        self.unavailable = None

    def _skip(self, timer: str, reason: str) -> None:
        self.skipped[(timer, reason)] = self.skipped.get((timer, reason), 0) + 1

    # -- figures -----------------------------------------------------------------------

    def figures(self) -> list[tuple[str, bool, int, int, int, int]]:
        """``(timer, held, acquired, lost, skipped held elsewhere, skipped redis unavailable)``."""
        return [(t, t in self.held, self.acquired.get(t, 0), self.lost.get(t, 0),
                 self.skipped.get((t, HELD_ELSEWHERE), 0), self.skipped.get((t, REDIS_UNAVAILABLE), 0))
                for t in self.timers]
