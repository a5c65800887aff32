"""BlockingPool: work runs off the reactor thread; restartable; stop joins."""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.internet import reactor

from stdaemon.threads import BlockingPool


@pytest_twisted.ensureDeferred
async def test_runs_off_the_reactor_thread_restarts_and_joins():
    pool = BlockingPool(reactor, "test-pool", maxthreads=2)
    main = threading.get_ident()
    # Before start: still off the reactor thread (the reactor's shared pool).
    assert await pool.run(threading.get_ident) != main
    for _ in range(2):                              # a stopped pool starts again
        pool.start()
        assert pool.started
        ident = await pool.run(threading.get_ident)
        assert ident != main
        worker_threads = list(pool._pool.threads)
        assert any(t.ident == ident for t in worker_threads)
        await pool.stop()
        assert not pool.started
        assert not any(t.is_alive() for t in worker_threads)
