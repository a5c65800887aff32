"""The database off the reactor thread, with exactly one writer thread.

``Database.run_write(fn, ...)`` runs ``fn(conn, ...)`` on the single writer
thread inside a write transaction (SQLite: ``BEGIN IMMEDIATE`` … ``COMMIT``,
rolled back if ``fn`` raises) and fires its Deferred only after the commit is
on disk (SQLite: WAL, ``synchronous=FULL``; PostgreSQL: a SERIALIZABLE
transaction, retried on a serialization failure, committed with
``synchronous_commit=on``): a 2xx acknowledged after ``run_write`` is durable.

``Database.run_read(fn, ...)`` runs ``fn(conn, ...)`` on one of a small pool
of reader threads; WAL lets readers proceed while the writer commits.

What differs between SQLite and PostgreSQL is the engine's business
(:mod:`stdaemon.store.engines`); this module only owns the threads, the
connections and the order of work.

Connections are per thread and opened lazily (again after a lost PostgreSQL
connection).  ``reopen()`` (used by restore) closes every connection; the
next call opens the new file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from typing import Any, Callable, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from stdaemon.store import schema
from stdaemon.store.engines import BUSY_TIMEOUT_MS, Engine, LostBeforeCommit, SqliteEngine, sqlite_connect

T = TypeVar("T")

__all__ = ["BUSY_TIMEOUT_MS", "Database", "DatabaseClosed", "connect"]


class DatabaseClosed(RuntimeError):
    """The database is closed (shutting down, or being swapped by a restore)."""


def connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    """Open a SQLite connection with stdaemon's pragmas (also used by tools and tests)."""
    return sqlite_connect(path, readonly)


class Database:
    def __init__(self, path: str, reactor: Any, readers: int = 2, engine: Engine | None = None):
        #: the SQLite file (also where a PostgreSQL daemon's backups would have gone: unused there)
        self.path = path
        self.engine = engine if engine is not None else SqliteEngine(path)
        self.dialect = self.engine.dialect
        #: PostgreSQL may be shared by several instances (see ``shared`` below)
        self.shared = self.dialect == "postgresql"
        self._reactor = reactor
        self._reader_count = readers
        self._writer: ThreadPool | None = None
        self._readers: ThreadPool | None = None
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[sqlite3.Connection] = []
        self._generation = 0
        self._running = False
        self._grouped: list = []          # (fn, args, kwargs, Deferred) waiting for the next group
        self._group_running = False

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> Deferred:
        """Start the threads and apply migrations (on the writer thread)."""
        directory = os.path.dirname(self.path)
        if directory and self.dialect == "sqlite":
            os.makedirs(directory, mode=0o700, exist_ok=True)
        # Thread pools cannot be restarted once stopped: new ones each start.
        self._writer = ThreadPool(minthreads=1, maxthreads=1, name="stdaemon-db-writer")
        self._readers = ThreadPool(minthreads=1, maxthreads=self._reader_count,
                                   name="stdaemon-db-reader")
        self._writer.start()
        self._readers.start()
        self._running = True
        return deferToThreadPool(self._reactor, self._writer, self._migrate)

    def _migrate(self) -> int:
        return schema.migrate_any(self._connection())

    def stop(self) -> None:
        """Finish queued work, stop the threads, close every connection."""
        if not self._running:
            return
        self._running = False
        self._writer.stop()
        self._readers.stop()
        self._close_all()
        with self._lock:
            self._generation += 1

    def reopen(self, swap: Callable[[], None] | None = None) -> Deferred:
        """Run ``swap()`` on the writer thread (serialised with every write)
        with the writer's connection closed, then make every thread open a
        fresh connection on its next call.

        Reader threads close their own stale connection when they notice the
        new generation, so a read that is running during the swap finishes on
        the connection it started with instead of failing."""

        def on_writer() -> None:
            local = self._local
            if getattr(local, "conn", None) is not None:
                self._forget(local.conn)
                local.conn = None
            with self._lock:
                self._generation += 1
            if swap is not None:
                swap()
            schema.migrate_any(self._connection())

        self.write_epoch += 1
        return deferToThreadPool(self._reactor, self._writer, on_writer).addBoth(self._write_ended)

    def _forget(self, conn: Any) -> None:
        with self._lock:
            if conn in self._connections:
                self._connections.remove(conn)
        self.engine.close(conn)

    def _close_all(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, []
        for conn in connections:
            self.engine.close(conn)

    # -- running work -------------------------------------------------------

    def _connection(self) -> Any:
        local = self._local
        if getattr(local, "generation", None) != self._generation or local.conn is None \
                or not self.engine.usable(local.conn):
            stale = getattr(local, "conn", None)
            if stale is not None:
                self._forget(stale)
            local.conn = None
            local.conn = self.engine.connect()
            local.generation = self._generation
            with self._lock:
                self._connections.append(local.conn)
        return local.conn

    #: Whether other daemons may write to this database at the same time (several instances on one
    #: PostgreSQL, S20). The embedded SQLite file belongs to one daemon (and ``stdaemon-admin``).
    shared = False

    # -- what the daemon keeps in memory from the database ---------------------------------------
    #: Bumped when a write is submitted and when it ends, on a restore and when another process
    #: changed job rows (``saw_counter``): a value read from the database may be kept in memory
    #: while ``write_epoch`` is what it was before the read started (``JobService.get_row``).
    write_epoch = 0

    def changed(self) -> None:
        self.write_epoch += 1

    #: Polls after a counter moved during which it still counts as moved. On PostgreSQL a counter
    #: is a sequence, which moves when its trigger fires, before the transaction commits: a poll in
    #: between would read the old rows again and keep them as if they were the new ones. The
    #: polls are a second apart and stdaemon's transactions last milliseconds.
    SETTLE_POLLS = 2

    def saw_counter(self, name: str, value: int) -> bool:
        """A change counter of the database as just read (another process's writes); True when it
        moved since the last read, or at one of the ``SETTLE_POLLS`` reads after that."""
        counters = self.__dict__.setdefault("_counters", {})
        settling = self.__dict__.setdefault("_settling", {})
        if counters.get(name, value) != value:
            settling[name] = self.SETTLE_POLLS + 1
        counters[name] = value
        left = settling.get(name, 0)
        if not left:
            return False
        settling[name] = left - 1
        self.changed()
        return True

    def run_write(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        if not self._running:
            from twisted.internet.defer import fail

            return fail(DatabaseClosed("database is closed"))
        self.write_epoch += 1
        work = deferToThreadPool(self._reactor, self._writer, self._transaction,
                                 lambda conn: fn(conn, *args, **kwargs))
        return work.addBoth(self._write_ended)

    def _transaction(self, work: Callable[[Any], T]) -> T:
        """``work(conn)`` inside the engine's write transaction on the writer thread (rollback on
        any exception; retried by the engine where it must be, see :mod:`engines`)."""
        try:
            return self.engine.transaction(self._connection(), work)
        except LostBeforeCommit:
            # Nothing was committed (PostgreSQL restarted, a network blip): once more, on a new
            # connection.  A connection lost during COMMIT is not retried: its outcome is unknown.
            return self.engine.transaction(self._connection(), work)

    def _write_ended(self, outcome: Any) -> Any:
        self.write_epoch += 1
        return outcome

    #: Most writes one group transaction carries.
    GROUP_MAX = 64

    def run_write_grouped(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        """``run_write`` with group commit: writes that arrive while a group is being committed are
        applied together in the next ONE transaction (one fsync for all), each inside its own
        ``SAVEPOINT`` — one that raises is rolled back alone and its Deferred fails alone, the others
        commit. Every Deferred fires after the COMMIT (acknowledged = on disk, as ``run_write``).
        For many small independent writes arriving together (webhook deliveries)."""
        if not self._running:
            from twisted.internet.defer import fail

            return fail(DatabaseClosed("database is closed"))
        d: Deferred = Deferred()
        self._grouped.append((fn, args, kwargs, d))
        if not self._group_running:
            self._next_group()
        return d

    def _next_group(self) -> None:
        batch, self._grouped = self._grouped[:self.GROUP_MAX], self._grouped[self.GROUP_MAX:]
        if not batch:
            self._group_running = False
            return
        if not self._running:
            self._group_running = False
            for *_, d in batch:
                d.errback(DatabaseClosed("database is closed"))
            return
        self._group_running = True
        self.write_epoch += 1

        retryable = self.engine.retryable

        def each_in_a_savepoint(conn: Any) -> list:
            outcomes: list = []
            for fn, args, kwargs, _ in batch:
                conn.execute("SAVEPOINT grouped_write")
                try:
                    value = fn(conn, *args, **kwargs)
                except Exception as exc:
                    if retryable(exc):  # the whole group is run again (PostgreSQL)
                        raise
                    conn.execute("ROLLBACK TO grouped_write")
                    outcomes.append((False, Failure()))
                else:
                    outcomes.append((True, value))
                conn.execute("RELEASE grouped_write")
            return outcomes

        def committed(outcomes: list) -> None:
            for (ok, value), (*_, d) in zip(outcomes, batch):
                if ok:
                    d.callback(value)
                else:
                    d.errback(value)

        def failed(failure: Failure) -> None:
            for *_, d in batch:
                d.errback(failure)

        work = deferToThreadPool(self._reactor, self._writer, self._transaction, each_in_a_savepoint)
        work.addBoth(self._write_ended)
        work.addCallbacks(committed, failed)
        work.addBoth(lambda _: self._next_group())

    def run_read(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> "Deferred[T]":
        if not self._running:
            from twisted.internet.defer import fail

            return fail(DatabaseClosed("database is closed"))

        def read() -> T:
            conn = self._connection()
            try:
                return fn(conn, *args, **kwargs)
            except Exception:
                if self.engine.usable(conn):
                    raise
            # The connection was lost (PostgreSQL restarted, a network blip): a read is safe to
            # run once more, on a new connection.
            return fn(self._connection(), *args, **kwargs)

        return deferToThreadPool(self._reactor, self._readers, read)

    def ping(self) -> Deferred:
        """A real query, for the health check."""
        return self.run_read(lambda conn: conn.execute("SELECT count(*) FROM schema_migrations").fetchone()[0])
