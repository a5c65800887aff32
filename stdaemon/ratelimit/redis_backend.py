"""The Redis rate-limit backend: one sliding window shared by every instance.

Each key is a sorted set of admitted request times (score = time, member =
unique id).  One Lua script prunes the set, counts, admits if there is room,
refreshes the key's expiry and reports the times the caller needs for the
headers — atomically, so two instances can never both take the last slot.

Times come from each instance's injected clock (keep the hosts' clocks in
sync with NTP, as for any distributed system); the script never reads the
Redis clock, so tests can drive it with ``task.Clock``.

Robustness: txredisapi reconnects by itself (with capped backoff), but its
handler queues calls while disconnected and can wait for ever.  This backend
never queues: it picks a live connection from the pool or fails at once with
:class:`BackendUnavailable`, and every call carries a timeout (txredisapi's
``replyTimeout`` aborts a connection that stopped answering; the caller's
``addTimeout`` bounds the wait on the injected clock).  The fail-open/closed
policy lives in :class:`stdaemon.ratelimit.service.RateLimiting`; what every
backend answers is :class:`stdaemon.ratelimit.backends.Backend`.
"""

from __future__ import annotations

import itertools
import math
import os
from typing import Any, Optional
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS

from stdaemon.ratelimit.backends import BackendUnavailable, bounded
from stdaemon.ratelimit.sliding_window import WindowState

__all__ = ["RedisBackend", "parse_redis_url", "SLIDING_WINDOW_SCRIPT"]

#: KEYS[1] the window; ARGV: now, period, limit, member, count_it (1/0), ttl_ms.
#: Returns {allowed, count, oldest score, score of the entry that must leave
#: before there is room ("" when there is room)}.
SLIDING_WINDOW_SCRIPT = """
local key = KEYS[1]
local now = tonumber(ARGV[1])
local period = tonumber(ARGV[2])
local limit = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', key, '-inf', now - period)
local count = redis.call('ZCARD', key)
local allowed = 0
if count < limit then
  allowed = 1
  if ARGV[5] == '1' then
    redis.call('ZADD', key, now, ARGV[4])
    redis.call('PEXPIRE', key, ARGV[6])
    count = count + 1
  end
end
local oldest = ''
if count > 0 then
  oldest = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')[2]
end
local blocker = ''
if count >= limit and limit > 0 then
  blocker = redis.call('ZRANGE', key, count - limit, count - limit, 'WITHSCORES')[2]
end
return {allowed, count, oldest, blocker}
"""


def parse_redis_url(url: str) -> dict:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` (TLS) or ``unix:///path[?db=N]``."""
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a redis URL: {url!r}")
    db: Optional[int] = None
    if parts.scheme == "unix":
        path = parts.path
        for item in (parts.query or "").split("&"):
            if item.startswith("db="):
                db = int(item[3:])
    else:
        path = None
        db_part = parts.path.strip("/")
        if db_part:
            db = int(db_part)
    return {
        "scheme": parts.scheme,
        "host": parts.hostname or "127.0.0.1",
        "port": parts.port or 6379,
        "path": path,
        "db": db,
        "username": unquote(parts.username) if parts.username else None,
        "password": unquote(parts.password) if parts.password else None,
    }


def _score(value: Any) -> Optional[float]:
    if value in (None, "", b""):
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return float(value)


class RedisBackend(Service):
    backend_name = "redis"

    def __init__(self, url: str, clock: Any, reactor: Any, timeout: float = 0.5,
                 namespace: str = "stdaemon:ratelimit", poolsize: int = 2,
                 connect_timeout: float = 2.0, max_reconnect_delay: float = 5.0):
        self.url, self.settings = url, parse_redis_url(url)
        self.clock, self.reactor = clock, reactor
        self.namespace = namespace
        # every call bounded by ``timeout``; connecting by ``connect_timeout``, reconnecting
        # backs off up to ``max_reconnect_delay``
        self.timeout, self.connect_timeout, self.max_reconnect_delay = timeout, connect_timeout, max_reconnect_delay
        self.poolsize = poolsize
        self._factory: Optional[txredisapi.RedisFactory] = None
        self._ids = itertools.count()
        self._instance = os.urandom(6).hex()
        self._next = 0

    @property
    def where(self) -> str:
        s = self.settings
        return s["path"] if s["scheme"] == "unix" else f"{s['host']}:{s['port']}"

    def _endpoint(self) -> Any:
        s = self.settings
        if s["scheme"] == "unix":
            return UNIXClientEndpoint(self.reactor, s["path"], timeout=self.connect_timeout)
        endpoint = HostnameEndpoint(self.reactor, s["host"], s["port"],
                                    timeout=self.connect_timeout)
        if s["scheme"] == "rediss":
            endpoint = wrapClientTLS(optionsForClientTLS(s["host"]), endpoint)
        return endpoint

    def startService(self) -> None:
        super().startService()
        s = self.settings
        factory = txredisapi.RedisFactory(
            self.where, s["db"], self.poolsize, isLazy=True, password=s["password"],
            username=s["username"],
            # txredisapi aborts a connection that leaves a call unanswered this long
            replyTimeout=max(1, int(math.ceil(self.timeout * 4))),
            convertNumbers=False)
        factory.maxDelay = self.max_reconnect_delay
        factory.initialDelay = min(factory.initialDelay, self.max_reconnect_delay)
        factory.startConnecting(self._endpoint())
        self._factory = factory

    def stopService(self) -> Any:
        super().stopService()
        factory, self._factory = self._factory, None
        if factory is None:
            return None
        return factory.disconnect()

    @property
    def connected(self) -> int:
        if self._factory is None:
            return 0
        return sum(1 for conn in self._factory.pool if conn.connected)

    def _connection(self) -> Any:
        """A live connection, round robin; never waits for one."""
        pool = [] if self._factory is None else [c for c in self._factory.pool if c.connected]
        if not pool:
            raise BackendUnavailable(f"not connected to redis at {self.where}")
        self._next = (self._next + 1) % len(pool)
        return pool[self._next]

    def _bounded(self, d: defer.Deferred) -> defer.Deferred:
        return bounded(d, self.timeout, self.clock)

    def _key(self, key: str) -> str:
        return f"{self.namespace}:{key}"

    def _run(self, key: str, limit: int, period: float, count_it: bool) -> defer.Deferred:
        now = self.clock.seconds()
        member = f"{now!r}:{self._instance}:{next(self._ids)}"
        ttl_ms = int(math.ceil(period * 1000)) + 1000
        try:
            conn = self._connection()
            d = conn.eval(SLIDING_WINDOW_SCRIPT, keys=[self._key(key)],
                          args=[repr(now), repr(float(period)), int(limit), member,
                                "1" if count_it else "0", ttl_ms])
        except BackendUnavailable:
            return defer.fail()
        except Exception as e:  # a connection dropped between the check and the call
            return defer.fail(BackendUnavailable(f"redis: {e}"))

        def parse(reply: Any) -> WindowState:
            allowed, count, oldest, blocker = reply
            count = int(count)
            oldest_score = _score(oldest)
            blocker_score = _score(blocker)
            reset_at = oldest_score + period if oldest_score is not None else now
            if count < limit:
                retry_at = now
            elif blocker_score is not None:
                retry_at = max(blocker_score + period, math.nextafter(now, math.inf))
            else:
                retry_at = math.inf
            return WindowState(allowed=bool(int(allowed)), limit=limit, period=period,
                               count=count, now=now, reset_at=reset_at, retry_at=retry_at)

        def failed(failure: Any) -> Any:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                return failure
            raise BackendUnavailable(f"redis: {failure.getErrorMessage()}")

        return self._bounded(d).addCallbacks(parse, failed)

    def hit(self, key: str, limit: int, period: float) -> defer.Deferred:
        return self._run(key, limit, period, True)

    def peek(self, key: str, limit: int, period: float) -> defer.Deferred:
        return self._run(key, limit, period, False)

    def ping(self) -> defer.Deferred:
        try:
            d = self._connection().ping()
        except BackendUnavailable:
            return defer.fail()
        return self._bounded(d).addCallback(
            lambda _: f"{self.where} ({self.connected}/{self.poolsize} connections)")

    def tracked_keys(self) -> Optional[int]:
        return None
