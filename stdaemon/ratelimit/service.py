"""Sliding-window rate limiting: the policy over a backend and the guide's limiter API (S11).

The guide's API::

    limiter = await get_rate_limiter(max_requests=100, window_seconds=60, key_prefix="api")
    allowed = await limiter.check("user:123")          # counts the request if admitted
    async with limiter.track("user:123") as allowed:   # same, as a context manager
        ...
    usage = await limiter.get_usage("user:123")        # {count, limit, remaining, reset_in_seconds}

plus the ready-made ``webhook_rate_limiter`` (100/min) and ``s3_rate_limiter``
(50/min).  All limiters, and the HTTP middleware, go through one
:class:`RateLimiting` object built from ``rate_limit.*`` config by
:func:`make_rate_limiting`; the composition root installs it (:func:`install`)
so the module-level API uses the configured backend and several instances
share limits through Redis.

The backends (memory, SQLite, Redis) are :mod:`stdaemon.ratelimit.backends`
and :mod:`stdaemon.ratelimit.redis_backend`.

When a backend fails or times out, :class:`RateLimiting` applies the
configured policy: fail-open (``rate_limit.fail_open = true``, the default:
the request is served, the outage is logged once and the health component
``rate_limiter`` reports ``degraded``) or fail-closed (the request is
refused, health reports ``unhealthy``).  Recovery is logged too.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

from twisted.application.service import Service
from twisted.internet import defer

from stdaemon.config.schema import RateLimitConfig
from stdaemon.health.service import DEGRADED, HEALTHY, UNHEALTHY, Component
from stdaemon.logs import get_logger
from stdaemon.ratelimit.backends import (
    Backend, BackendUnavailable, MemoryBackend, Outcome, SQLiteBackend, bounded,
)

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


# -- policy ---------------------------------------------------------------------


class RateLimiting(Service):
    """The configured backend with a timeout, the fail-open/closed policy and a status.

    A child-less service: starting/stopping it starts/stops the backend.
    """

    def __init__(self, backend: Backend, clock: Any, fail_open: bool = True, timeout: float = 0.5):
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
        return bounded(d, self.timeout, self.clock)

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


def make_rate_limiting(config: RateLimitConfig, clock: Any, reactor: Any = None,
                       state_dir: str = "~/.simpletuner") -> RateLimiting:
    """The :class:`RateLimiting` for a ``RateLimitConfig`` (``rate_limit.*``)."""
    backend_name = config.backend
    timeout = float(config.timeout)
    backend: Backend
    if backend_name == "memory":
        backend = MemoryBackend(clock)
    elif backend_name == "sqlite":
        path = config.sqlite_path or os.path.join(
            os.path.expanduser(state_dir), "config", "cloud", "ratelimit.db")
        backend = SQLiteBackend(os.path.expanduser(path), clock, reactor)
    elif backend_name == "redis":
        # Deferred: Redis's client is imported only when it is configured (tests/test_lazy_imports.py).
        from stdaemon.ratelimit.redis_backend import RedisBackend

        backend = RedisBackend(config.redis_url, clock, reactor, timeout=timeout)
    else:
        raise ValueError(f"unknown rate limit backend {backend_name!r}")
    return RateLimiting(backend, clock, fail_open=bool(config.fail_open), timeout=timeout)


_installed: Optional[RateLimiting] = None


def install(limiting: Optional[RateLimiting]) -> None:
    """Make ``limiting`` the one behind :func:`get_rate_limiter` and the presets
    (the composition root does this for the configured one; ``None`` uninstalls)."""
    global _installed
    _installed = limiting


def installed() -> RateLimiting:
    """The installed :class:`RateLimiting`, or a process-local memory one."""
    global _installed
    if _installed is None:
        # Deferred import: importing the global reactor installs it (a script without a daemon).
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
