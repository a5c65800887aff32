"""Bounded thread pools for blocking work (S0: never block the reactor).

Every capability that calls something blocking (Argon2, boto3, hvac, SQLite
outside the main database, large file I/O) owns one :class:`BlockingPool`:
a named, bounded ``ThreadPool`` that can be started again after a stop
(Twisted's cannot), and whose stop joins its threads *off* the reactor
thread.  :class:`PoolService` puts a pool under the daemon's service tree so
it starts and stops with it.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool


class BlockingPool:
    def __init__(self, reactor: Any, name: str, maxthreads: int, minthreads: int = 0):
        self.reactor = reactor
        self.name = name
        self.maxthreads = maxthreads
        self.minthreads = minthreads
        self._pool: Optional[ThreadPool] = None

    @property
    def started(self) -> bool:
        return self._pool is not None and self._pool.started and not self._pool.joined

    def start(self) -> None:
        if self.started:
            return
        # A stopped ThreadPool cannot be restarted: a fresh one each start.
        self._pool = ThreadPool(minthreads=self.minthreads, maxthreads=self.maxthreads,
                                name=self.name)
        self._pool.start()

    def run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run ``fn`` in the pool.  Before start (command-line tools, early
        start-up) it runs in the reactor's shared pool: still off the reactor
        thread."""
        pool = self._pool if self.started else self.reactor.getThreadPool()
        return deferToThreadPool(self.reactor, pool, fn, *args, **kwargs)

    def stop(self) -> defer.Deferred:
        """Let queued work finish and join the threads, off the reactor thread."""
        pool, self._pool = self._pool, None
        if pool is None or not pool.started or pool.joined:
            return defer.succeed(None)
        return deferToThreadPool(self.reactor, self.reactor.getThreadPool(), pool.stop)


class PoolService(Service):
    """A :class:`BlockingPool` started and stopped with its parent service."""

    def __init__(self, pool: BlockingPool):
        self.pool = pool
        self.setName(f"pool:{pool.name}")

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> defer.Deferred:
        super().stopService()
        return self.pool.stop()


def install_pool(ctx: Any, name: str, maxthreads: int, minthreads: int = 0) -> BlockingPool:
    """A pool that lives as long as the daemon (child of ``ctx.services``)."""
    pool = BlockingPool(ctx.reactor, name, maxthreads, minthreads)
    PoolService(pool).setServiceParent(ctx.services)
    return pool
