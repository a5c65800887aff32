"""Rate-limit backends (S11): what every backend answers, and the two local ones.

A backend is a ``Service`` that decides sliding windows (the arithmetic is
:mod:`stdaemon.ratelimit.sliding_window`) and follows :class:`Backend`:

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

A backend that cannot answer fails with :class:`BackendUnavailable`; the
fail-open/closed policy is :class:`stdaemon.ratelimit.service.RateLimiting`'s.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import dataclass
from typing import Any, Optional, Protocol

from twisted.application.service import Service
from twisted.internet import defer

from stdaemon.ratelimit.sliding_window import SlidingWindowTable, WindowState, decide, evaluate, prune
from stdaemon.threads import BlockingPool
from stdaemon.timers import SafeTimerService

__all__ = ["Backend", "BackendUnavailable", "Outcome", "MemoryBackend", "SQLiteBackend", "bounded"]


class Backend(Protocol):
    """A rate-limit backend: ``hit``/``peek`` fire with a :class:`WindowState` (or fail,
    :class:`BackendUnavailable`), ``ping`` with a short description of its state."""

    backend_name: str

    def hit(self, key: str, limit: int, period: float) -> defer.Deferred: ...

    def peek(self, key: str, limit: int, period: float) -> defer.Deferred: ...

    def ping(self) -> defer.Deferred: ...

    def tracked_keys(self) -> Optional[int]: ...

    def startService(self) -> None: ...

    def stopService(self) -> Any: ...


def bounded(d: defer.Deferred, timeout: float, clock: Any) -> defer.Deferred:
    """``d``, failing with ``defer.TimeoutError`` after ``timeout`` seconds of ``clock``
    unless it has already fired."""
    if not d.called:
        d.addTimeout(timeout, clock)
    return d


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

    def __init__(self, path: str, clock: Any, reactor: Any, busy_timeout: float = 5.0,
                 sweep_interval: float = 60.0):
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
