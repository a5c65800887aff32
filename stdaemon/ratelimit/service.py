"""Sliding-window rate limiting: the guide's limiter API and its backends (S11).

The guide's API::

    limiter = await get_rate_limiter(max_requests=100, window_seconds=60, key_prefix="api")
    allowed = await limiter.check("user:123")          # counts the request if admitted
    async with limiter.track("user:123") as allowed:   # same, as a context manager
        ...
    usage = await limiter.get_usage("user:123")        # {count, limit, remaining, reset_in_seconds}

plus the ready-made ``webhook_rate_limiter`` (100/min) and ``s3_rate_limiter``
(50/min).  All limiters, and the HTTP middleware, go through one
:class:`RateLimiting` object built from ``rate_limit.*`` config by
:func:`make_rate_limiting`; the service installs it (:func:`install`) so the
module-level API uses the configured backend and several instances share
limits through Redis.

Backends (each a ``Service``; the arithmetic is :mod:`stdaemon.ratelimit.sliding_window`):

``memory``
    One process.  Bounded: at most ``max_keys`` keys (least recently used
    evicted) and a timer on the injected clock sweeps keys whose window is empty.
``sqlite``
    One file shared by the processes of one host (``BEGIN IMMEDIATE``
    serialises them; each key is a JSON array of timestamps).  Queries run on a
    dedicated one-thread pool, never on the reactor thread.
``redis``
    :mod:`stdaemon.ratelimit.redis_backend`: an atomic Lua script over a sorted
    set per key, keys expire, a timeout on every call, automatic reconnect.

When a backend fails or times out, :class:`RateLimiting` applies the
configured policy: fail-open (``rate_limit.fail_open = true``, the default:
the request is served, the outage is logged once and the health component
``rate_limiter`` reports ``degraded``) or fail-closed (the request is
refused, health reports ``unhealthy``).  Recovery is logged too.
"""

from __future__ import annotations

import json
import os
import sqlite3
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

from twisted.application.service import Service
from twisted.internet import defer

from stdaemon.ratelimit.sliding_window import SlidingWindowTable, WindowState, decide, evaluate, prune
from stdaemon.health.service import DEGRADED, HEALTHY, UNHEALTHY, Component
from stdaemon.logs import get_logger
from stdaemon.threads import BlockingPool
from stdaemon.timers import SafeTimerService

__all__ = [
    "BackendUnavailable",
    "Outcome",
    "MemoryBackend",
    "SQLiteBackend",
    "RateLimiting",
    "RateLimiter",
    "make_rate_limiting",
    "install",
    "installed",
    "get_rate_limiter",
    "webhook_rate_limiter",
    "s3_rate_limiter",
]

log = get_logger("stdaemon.ratelimit")


class BackendUnavailable(Exception):
    """The backend could not answer (down, timed out, refused)."""


@dataclass(frozen=True)
class Outcome:
    """A decision.  ``state`` is ``None`` when the backend was unavailable and
    the fail-open/closed policy decided ``allowed``."""

    allowed: bool
    state: Optional[WindowState]

    @property
    def degraded(self) -> bool:
        return self.state is None


# -- backends ------------------------------------------------------------------


class MemoryBackend(Service):
    """In-process windows, bounded in keys and swept by a timer on ``clock``."""

    backend_name = "memory"

    def __init__(self, clock: Any, max_keys: int = 100_000, sweep_interval: float = 30.0):
        self.clock = clock
        self.table = SlidingWindowTable(max_keys=max_keys)
        self._sweeper = SafeTimerService("rate-limit-sweep", sweep_interval, self.sweep, clock)

    def startService(self) -> None:
        super().startService()
        self._sweeper.startService()

    def stopService(self) -> Any:
        super().stopService()
        return self._sweeper.stopService()

    def sweep(self) -> int:
        return self.table.sweep(self.clock.seconds())

    def hit(self, key: str, limit: int, period: float) -> defer.Deferred:
        return defer.succeed(self.table.hit(key, self.clock.seconds(), limit, period))

    def peek(self, key: str, limit: int, period: float) -> defer.Deferred:
        return defer.succeed(self.table.peek(key, self.clock.seconds(), limit, period))

    def ping(self) -> defer.Deferred:
        return defer.succeed(f"{len(self.table)} keys tracked")

    def tracked_keys(self) -> int:
        return len(self.table)


class SQLiteBackend(Service):
    """Windows in one SQLite file that every process on the host can share.

    Each key is a row ``(key, timestamps JSON, expires_at)``; a decision is one
    ``BEGIN IMMEDIATE`` transaction, so concurrent processes serialise on the
    file lock and never both take the last slot.  All queries run on a
    dedicated single-thread pool; a timer deletes expired rows.
    """

    backend_name = "sqlite"

    _SCHEMA = (
        "CREATE TABLE IF NOT EXISTS rate_limit ("
        " key TEXT PRIMARY KEY, timestamps TEXT NOT NULL, expires_at REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS rate_limit_expires ON rate_limit (expires_at)",
    )

    def __init__(self, path: str, clock: Any, reactor: Any = None, busy_timeout: float = 5.0,
                 sweep_interval: float = 60.0):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.path = path
        self.clock = clock
        self.reactor = reactor
        self.busy_timeout = busy_timeout
        # One thread: the connection below belongs to it.
        self._pool = BlockingPool(reactor, "stdaemon-ratelimit-sqlite", maxthreads=1, minthreads=1)
        self._conn: Optional[sqlite3.Connection] = None  # used by the pool's thread only
        self._sweeper = SafeTimerService("rate-limit-sqlite-sweep", sweep_interval, self.sweep,
                                         clock)

    # service

    def startService(self) -> None:
        super().startService()
        self._pool.start()
        self._sweeper.startService()

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        yield self._sweeper.stopService()
        try:
            yield self._run(self._close)
        finally:
            yield self._pool.stop()

    # thread side

    def _run(self, fn: Any, *args: Any) -> defer.Deferred:
        return self._pool.run(fn, *args)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            directory = os.path.dirname(self.path)
            if directory:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            os.close(fd)
            conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            for statement in self._SCHEMA:
                conn.execute(statement)
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @staticmethod
    def _load(raw: Optional[str]) -> list[float]:
        if raw is None:
            return []
        try:
            values = json.loads(raw)
            stamps = sorted(float(v) for v in values)
        except (ValueError, TypeError):
            return []  # a damaged row is a fresh window, not an outage
        return stamps

    def _decide(self, key: str, limit: int, period: float, now: float, count_it: bool) -> WindowState:
        conn = self._connection()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT timestamps FROM rate_limit WHERE key = ?",
                                   (key,)).fetchone()
                stamps = self._load(row[0] if row else None)
                if count_it:
                    state = decide(stamps, now, limit, period)
                    if stamps:
                        conn.execute(
                            "INSERT OR REPLACE INTO rate_limit (key, timestamps, expires_at)"
                            " VALUES (?, ?, ?)", (key, json.dumps(stamps), stamps[-1] + period))
                    elif row:
                        conn.execute("DELETE FROM rate_limit WHERE key = ?", (key,))
                else:
                    prune(stamps, now, period)
                    state = evaluate(stamps, now, limit, period, len(stamps) < limit)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            # a broken handle is reopened on the next call
            self._close()
            raise BackendUnavailable(f"sqlite: {e}") from None
        return state

    def _sweep(self, now: float) -> int:
        conn = self._connection()
        return conn.execute("DELETE FROM rate_limit WHERE expires_at <= ?", (now,)).rowcount

    def _count(self, now: float) -> int:
        conn = self._connection()
        return conn.execute("SELECT count(*) FROM rate_limit WHERE expires_at > ?",
                            (now,)).fetchone()[0]

    # reactor side

    def hit(self, key: str, limit: int, period: float) -> defer.Deferred:
        return self._run(self._decide, key, limit, period, self.clock.seconds(), True)

    def peek(self, key: str, limit: int, period: float) -> defer.Deferred:
        return self._run(self._decide, key, limit, period, self.clock.seconds(), False)

    def sweep(self) -> defer.Deferred:
        return self._run(self._sweep, self.clock.seconds())

    def ping(self) -> defer.Deferred:
        return self._run(self._count, self.clock.seconds()).addCallback(
            lambda n: f"{n} keys tracked in {self.path}")

    def tracked_keys(self) -> Optional[int]:
        return None  # counting needs a query; the middleware keeps its own gauge


# -- policy ---------------------------------------------------------------------


class RateLimiting(Service):
    """The configured backend with a timeout, the fail-open/closed policy and a status.

    A child-less service: starting/stopping it starts/stops the backend.
    """

    def __init__(self, backend: Any, clock: Any, fail_open: bool = True, timeout: float = 0.5):
        self.backend = backend
        self.clock = clock
        self.fail_open = fail_open
        self.timeout = timeout
        self.available = True
        self.last_error: Optional[str] = None
        self.failures = 0
        self.unavailable_since: Optional[float] = None

    @property
    def backend_name(self) -> str:
        return getattr(self.backend, "backend_name", type(self.backend).__name__)

    def startService(self) -> None:
        super().startService()
        self.backend.startService()

    def stopService(self) -> Any:
        super().stopService()
        if _installed is self:
            install(None)
        return self.backend.stopService()

    def _bounded(self, d: defer.Deferred) -> defer.Deferred:
        if not d.called:
            d.addTimeout(self.timeout, self.clock)
        return d

    def _failed(self, error: BaseException) -> None:
        self.failures += 1
        if isinstance(error, defer.TimeoutError):
            reason = f"no answer within {self.timeout:g} s"
        else:
            reason = str(error) or type(error).__name__
        self.last_error = reason
        if self.available:
            self.available = False
            self.unavailable_since = self.clock.seconds()
            log.warning("rate limit backend {backend} unavailable ({reason}); failing {policy}",
                        backend=self.backend_name, reason=reason,
                        policy="open" if self.fail_open else "closed")

    def _succeeded(self) -> None:
        if not self.available:
            self.available = True
            log.info("rate limit backend {backend} available again after {failures} failures",
                     backend=self.backend_name, failures=self.failures)
            self.unavailable_since = None

    async def _ask(self, method: str, key: str, limit: int, period: float) -> Outcome:
        try:
            d = defer.maybeDeferred(getattr(self.backend, method), key, limit, period)
            state = await self._bounded(d)
        except Exception as e:  # every backend failure is subject to the policy
            self._failed(e)
            return Outcome(self.fail_open, None)
        self._succeeded()
        return Outcome(state.allowed, state)

    async def hit(self, key: str, limit: int, period: float) -> Outcome:
        """Count a request for ``key`` if there is room; the policy decides on failure."""
        return await self._ask("hit", key, limit, period)

    async def peek(self, key: str, limit: int, period: float) -> Outcome:
        """Look at ``key``'s window without counting anything."""
        return await self._ask("peek", key, limit, period)

    def get_rate_limiter(self, max_requests: int = 100, window_seconds: float = 60,
                         key_prefix: str = "") -> "RateLimiter":
        return RateLimiter(self, max_requests, window_seconds, key_prefix)

    def status(self) -> str:
        if self.available:
            return HEALTHY
        return DEGRADED if self.fail_open else UNHEALTHY

    async def health(self) -> Component:
        """The ``rate_limiter`` health component: a live round trip to the backend."""
        started = self.clock.seconds()
        try:
            message = await self._bounded(defer.maybeDeferred(self.backend.ping))
        except Exception as e:
            self._failed(e)
            policy = "failing open" if self.fail_open else "failing closed"
            return Component("rate_limiter", self.status(),
                             f"{self.backend_name} backend unavailable: {self.last_error}; {policy}")
        self._succeeded()
        return Component("rate_limiter", HEALTHY, f"{self.backend_name}: {message}",
                         round((self.clock.seconds() - started) * 1000, 3))


class RateLimiter:
    """The guide's limiter: ``max_requests`` per ``window_seconds`` per key."""

    def __init__(self, limiting: RateLimiting, max_requests: int, window_seconds: float,
                 key_prefix: str = ""):
        if int(max_requests) < 1:
            raise ValueError("max_requests must be at least 1")
        if float(window_seconds) <= 0:
            raise ValueError("window_seconds must be positive")
        self.limiting = limiting
        self.max_requests = int(max_requests)
        self.window_seconds = float(window_seconds)
        self.key_prefix = key_prefix

    def _key(self, key: str) -> str:
        return f"limiter.{self.key_prefix}:{key}"

    async def hit(self, key: str) -> Outcome:
        return await self.limiting.hit(self._key(key), self.max_requests, self.window_seconds)

    async def check(self, key: str) -> bool:
        """Whether a request for ``key`` is allowed now; an allowed one is counted."""
        return (await self.hit(key)).allowed

    @asynccontextmanager
    async def track(self, key: str) -> AsyncIterator[bool]:
        """``async with limiter.track(key) as allowed:`` — counts like :meth:`check`."""
        yield await self.check(key)

    async def get_usage(self, key: str) -> dict:
        """``{count, limit, remaining, reset_in_seconds}`` without counting anything.

        While the backend is unavailable the figures are unknown: ``count`` is
        0 and ``"degraded": True`` is added.
        """
        outcome = await self.limiting.peek(self._key(key), self.max_requests, self.window_seconds)
        if outcome.state is None:
            return {"count": 0, "limit": self.max_requests, "remaining": self.max_requests,
                    "reset_in_seconds": 0.0, "degraded": True}
        return outcome.state.usage()


# -- construction and the module-level API -------------------------------------


def make_rate_limiting(config: Any, clock: Any, reactor: Any = None,
                       state_dir: str = "~/.simpletuner") -> RateLimiting:
    """The :class:`RateLimiting` for a ``RateLimitConfig`` (``rate_limit.*``)."""
    backend_name = getattr(config, "backend", "memory")
    timeout = float(getattr(config, "timeout", 0.5))
    if backend_name == "memory":
        backend: Any = MemoryBackend(clock)
    elif backend_name == "sqlite":
        path = getattr(config, "sqlite_path", "") or os.path.join(
            os.path.expanduser(state_dir), "config", "cloud", "ratelimit.db")
        backend = SQLiteBackend(os.path.expanduser(path), clock, reactor)
    elif backend_name == "redis":
        from stdaemon.ratelimit.redis_backend import RedisBackend

        backend = RedisBackend(config.redis_url, clock, reactor, timeout=timeout)
    else:
        raise ValueError(f"unknown rate limit backend {backend_name!r}")
    return RateLimiting(backend, clock, fail_open=bool(getattr(config, "fail_open", True)),
                        timeout=timeout)


_installed: Optional[RateLimiting] = None


def install(limiting: Optional[RateLimiting]) -> None:
    """Make ``limiting`` the one behind :func:`get_rate_limiter` and the presets
    (the service does this at start; ``None`` uninstalls)."""
    global _installed
    _installed = limiting


def installed() -> RateLimiting:
    """The installed :class:`RateLimiting`, or a process-local memory one."""
    global _installed
    if _installed is None:
        from twisted.internet import reactor

        _installed = RateLimiting(MemoryBackend(reactor), reactor)
    return _installed


async def get_rate_limiter(max_requests: int = 100, window_seconds: float = 60,
                           key_prefix: str = "") -> RateLimiter:
    """A sliding-window limiter on the configured backend (the guide's API)."""
    return installed().get_rate_limiter(max_requests, window_seconds, key_prefix)


class _PresetLimiter:
    """A module-level limiter bound, at each call, to the installed backend."""

    def __init__(self, max_requests: int, window_seconds: float, key_prefix: str):
        self.max_requests = max_requests
        self.window_seconds = window_seconds
        self.key_prefix = key_prefix

    def _limiter(self) -> RateLimiter:
        return installed().get_rate_limiter(self.max_requests, self.window_seconds,
                                            self.key_prefix)

    async def check(self, key: str) -> bool:
        return await self._limiter().check(key)

    def track(self, key: str) -> Any:
        return self._limiter().track(key)

    async def get_usage(self, key: str) -> dict:
        return await self._limiter().get_usage(key)


#: 100 requests a minute per key, for webhook receivers.
webhook_rate_limiter = _PresetLimiter(100, 60, "webhook")
#: 50 requests a minute per key, for S3 uploads.
s3_rate_limiter = _PresetLimiter(50, 60, "s3")
