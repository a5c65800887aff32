"""Database engines: everything that differs between SQLite and PostgreSQL, in one place.

The stores (``<capability>/store.py``) write portable SQL in sqlite3 style: ``?`` placeholders,
rows read by name or by index, ``INSERT … RETURNING id``, ``IS NOT DISTINCT FROM``,
``ON CONFLICT … DO UPDATE``.  An engine object opens connections that accept exactly that, and
says how a write transaction begins, commits and is retried.  Where the dialects really differ
a store asks :func:`is_postgres` and keeps the branch small (scalar ``MAX`` vs ``GREATEST``…).

``database.url`` picks the engine (:func:`engine_for`):

- ``""`` → :class:`SqliteEngine`: the embedded file, exactly as before (WAL, ``synchronous=FULL``,
  one writer thread, ``BEGIN IMMEDIATE`` … ``COMMIT``: a database-wide write lock).
- ``postgresql://user:pass@host:port/dbname`` → :class:`PostgresEngine` through psycopg 3
  (imported only then).  The password may also come from libpq's usual means (``PGPASSWORD``,
  ``~/.pgpass``, ``?passfile=…``); it is never logged (:func:`redact`).

How PostgreSQL keeps the single SQLite writer's guarantees when several daemons share the
database (idempotency keys unique, guarded status transitions, one audit chain, the last admin
never removed, an approval decided once):

- Every write transaction runs at ``ISOLATION LEVEL SERIALIZABLE`` and is retried, a bounded
  number of times with a jittered back-off, when PostgreSQL reports a serialization failure or a
  deadlock.  We chose this over ``SELECT … FOR UPDATE`` because the stores' guards are
  read-then-write in many places (a job's transition, ``create_or_get``'s idempotency check, the
  last-admin check, quota and approval decisions): serializable transactions make each of them
  behave as if it ran alone, with no lock to forget in one of them, and the SQL stays the same on
  both engines.  The retry re-runs the whole transaction function, which only touches the
  database (or, like the first admin key file, does something idempotent).
- The audit hash chain is appended under ``pg_advisory_xact_lock(AUDIT_CHAIN_LOCK)``
  (:func:`lock_audit_chain`), so appenders queue instead of racing; one that waited reads the
  head in its older snapshot, collides on the primary key and is retried (:data:`RACE_CONSTRAINTS`):
  two instances never fork the chain.
- Group commit is one transaction with a savepoint per write, as on SQLite; a retryable error
  inside a savepoint retries the whole group.
- Acknowledged = committed: PostgreSQL's default ``synchronous_commit=on`` flushes the commit
  to the WAL before ``COMMIT`` returns; a connection finding it ``off`` (server, database or
  role setting) turns it on for its own session.
- Migrations run under a session advisory lock (:data:`MIGRATION_LOCK`), so two instances
  starting together against an empty database apply each migration once.
"""

from __future__ import annotations

import random
import re
import sqlite3
import time
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar
from urllib.parse import unquote, urlsplit, urlunsplit

T = TypeVar("T")

SQLITE = "sqlite"
POSTGRESQL = "postgresql"
URL_SCHEMES = ("postgresql", "postgres")

BUSY_TIMEOUT_MS = 5000

#: Advisory lock keys (one 64-bit space per database).
MIGRATION_LOCK = 0x53544D4947524154   # "STMIGRAT"
AUDIT_CHAIN_LOCK = 0x5354415544495400  # "STAUDIT"

#: Unique constraints a concurrent writer can only hit because its snapshot predates the other's
#: commit: the retry re-reads and finds the row (the audit chain head, an idempotency key, a
#: webhook delivery).  Any other unique violation is the caller's error, raised at once.
RACE_CONSTRAINTS = frozenset({"audit_log_pkey", "jobs_idempotency", "webhook_deliveries_pkey"})

#: Seconds to wait for a PostgreSQL connection unless the URL says (``?connect_timeout=``).
CONNECT_TIMEOUT = 10

#: Attempts of one PostgreSQL write transaction (the first and the retries).
WRITE_ATTEMPTS = 30


class LostBeforeCommit(Exception):
    """The connection was lost before ``COMMIT`` was sent: nothing was committed, the whole
    transaction may run again on a new connection."""


class EngineError(ValueError):
    """``database.url`` cannot be used (the reason names what is wrong, never the password)."""


def dialect(conn: Any) -> str:
    return getattr(conn, "dialect", SQLITE)


def is_postgres(conn: Any) -> bool:
    return dialect(conn) == POSTGRESQL


def redact(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and errors)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[1]}"))


def check_url(url: str) -> str:
    """``url`` if it names an engine stdaemon runs on; :class:`EngineError` otherwise."""
    url = url.strip()
    if not url:
        return ""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError as exc:
        raise EngineError(f"not a valid URL ({exc})") from None
    if parts.scheme not in URL_SCHEMES:
        shown = parts.scheme or redact(url)
        raise EngineError(f"unsupported database {shown!r}: leave it empty for the embedded SQLite "
                          "file, or give postgresql://user:password@host:port/dbname")
    if not parts.path.strip("/") and not parts.hostname:
        raise EngineError("a postgresql:// URL needs at least a host or a database name")
    if _BAD_ESCAPE.search(parts.netloc.rpartition("@")[0]):
        # libpq would refuse it too, quoting the password in its message
        raise EngineError("the user name or password holds a '%' that is not a %XX escape "
                          "(write % as %25)")
    return url


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def scrub(message: str, url: str) -> str:
    """``message`` without the password of ``url`` (as written, and decoded)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return message
    if password:
        for form in {password, unquote(password)}:
            message = message.replace(form, "***")
    return message


def check_config_url(path: str, value: str) -> str:
    """``database.url``'s validator: :func:`check_url`, its error naming the key path."""
    from stdaemon.invalid import InvalidValue

    try:
        return check_url(value)
    except EngineError as exc:
        raise InvalidValue(path, str(exc)) from None


def engine_for(url: str, sqlite_path: str) -> "Engine":
    """The engine ``database.url`` names (``""``: the embedded SQLite file at ``sqlite_path``)."""
    url = check_url(url or "")
    if not url:
        return SqliteEngine(sqlite_path)
    return PostgresEngine(url)


class Engine:
    dialect = SQLITE
    #: What the engine opens, safe to log (a file path, or a URL without its password).
    description = ""

    def connect(self, readonly: bool = False) -> Any:
        raise NotImplementedError

    def usable(self, conn: Any) -> bool:
        return True

    def close(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:
            pass

    def transaction(self, conn: Any, work: Callable[[Any], T]) -> T:
        raise NotImplementedError

    def retryable(self, exc: BaseException) -> bool:
        return False


# -- SQLite -----------------------------------------------------------------------------------

def sqlite_connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with stdaemon's pragmas (also used by tools and tests)."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                           timeout=BUSY_TIMEOUT_MS / 1000)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    if not readonly:
        conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class SqliteEngine(Engine):
    dialect = SQLITE

    def __init__(self, path: str):
        self.path = path
        self.description = path

    def connect(self, readonly: bool = False) -> sqlite3.Connection:
        return sqlite_connect(self.path, readonly)

    def transaction(self, conn: sqlite3.Connection, work: Callable[[Any], T]) -> T:
        """``work(conn)`` inside ``BEGIN IMMEDIATE … COMMIT`` (rollback on any exception)."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = work(conn)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result


# -- PostgreSQL -------------------------------------------------------------------------------

_QUOTED = re.compile(r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\")")
_converted: dict[str, str] = {}


def to_pyformat(sql: str) -> str:
    """sqlite3's ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled); quoted text
    is left alone."""
    done = _converted.get(sql)
    if done is None:
        pieces = _QUOTED.split(sql)
        for i in range(0, len(pieces), 2):   # outside quotes
            pieces[i] = pieces[i].replace("%", "%%").replace("?", "%s")
        for i in range(1, len(pieces), 2):   # inside quotes: only the % needs escaping
            pieces[i] = pieces[i].replace("%", "%%")
        done = "".join(pieces)
        if len(_converted) < 4096:
            _converted[sql] = done
    return done


class Row:
    """A result row read by index or by column name, like ``sqlite3.Row``."""

    __slots__ = ("_values", "_index")

    def __init__(self, values: Sequence[Any], index: dict[str, int]):
        self._values = tuple(values)
        self._index = index

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            try:
                return self._values[self._index[key]]
            except KeyError:
                raise IndexError(f"no such column: {key}") from None
        return self._values[key]

    def keys(self) -> list[str]:
        return list(self._index)

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other: Any) -> bool:
        if isinstance(other, Row):
            return self._values == other._values and self.keys() == other.keys()
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values)

    def __repr__(self) -> str:
        return f"Row({dict(zip(self._index, self._values))!r})"


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    description = cursor.description or ()
    index = {column.name: i for i, column in enumerate(description)}
    return lambda values: Row(values, index)


class PgConnection:
    """A psycopg connection that speaks the stores' sqlite3 style (autocommit; transactions are
    begun explicitly, as on SQLite with ``isolation_level=None``)."""

    dialect = POSTGRESQL
    row_factory: Any = None   # accepted and ignored (stores written for sqlite3 set it)

    def __init__(self, raw: Any):
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] = ()) -> Any:
        cursor = self.raw.cursor(row_factory=_row_factory)
        if params:
            cursor.execute(to_pyformat(sql), tuple(params))
        else:
            cursor.execute(sql)
        return cursor

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cursor = self.raw.cursor(row_factory=_row_factory)
        cursor.executemany(to_pyformat(sql), [tuple(r) for r in rows])
        return cursor

    def __enter__(self) -> "PgConnection":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False   # autocommit: each statement outside BEGIN … COMMIT is already committed

    @property
    def in_transaction(self) -> bool:
        from psycopg import pq

        return self.raw.info.transaction_status != pq.TransactionStatus.IDLE

    @property
    def closed(self) -> bool:
        return self.raw.closed or self.raw.broken

    def close(self) -> None:
        self.raw.close()


def _bool_dumper() -> type:
    """Python booleans are written as 0/1, as sqlite3 does (the flag columns are INTEGER)."""
    from psycopg.adapt import Dumper
    from psycopg.postgres import types

    class BoolAsInteger(Dumper):
        oid = types["int4"].oid

        def dump(self, obj: Any) -> bytes:
            return b"1" if obj else b"0"

    return BoolAsInteger


class PostgresEngine(Engine):
    dialect = POSTGRESQL

    def __init__(self, url: str):
        self.url = check_url(url)
        self.description = redact(self.url)
        self._dumper: Optional[type] = None

    def connect(self, readonly: bool = False) -> PgConnection:
        import psycopg  # imported only when PostgreSQL is configured

        # A server that does not answer makes start-up (or a reconnect) fail after 10 s instead
        # of hanging on libpq's default of waiting for ever; the URL may say otherwise.
        extra = {} if "connect_timeout=" in self.url else {"connect_timeout": CONNECT_TIMEOUT}
        try:
            raw = psycopg.connect(self.url, autocommit=True, application_name="stdaemon", **extra)
        except psycopg.Error as exc:
            # libpq may quote the part of the URL it could not parse: never the password
            raise type(exc)(scrub(str(exc), self.url)) from None
        if self._dumper is None:
            self._dumper = _bool_dumper()
        raw.adapters.register_dumper(bool, self._dumper)
        conn = PgConnection(raw)
        if conn.execute("SHOW synchronous_commit").fetchone()[0] == "off":
            # A server, database or role set to not wait for the WAL flush: stdaemon acknowledges
            # a write only once it is durable, so its own sessions wait ("local", "remote_apply"
            # and the other durable settings are kept as the operator chose them).
            conn.execute("SET synchronous_commit TO on")
        return conn

    def usable(self, conn: PgConnection) -> bool:
        return not conn.closed

    def transaction(self, conn: PgConnection, work: Callable[[Any], T]) -> T:
        """``work(conn)`` in a SERIALIZABLE transaction, retried on a serialization failure or a
        deadlock (see the module docstring)."""
        attempt = 1
        while True:
            committing = False
            try:
                conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
                result = work(conn)
                committing = True
                conn.execute("COMMIT")
                return result
            except BaseException as exc:
                if conn.closed and not committing:
                    raise LostBeforeCommit(str(exc)) from exc
                if not conn.closed and conn.in_transaction:
                    try:
                        conn.execute("ROLLBACK")
                    except Exception:
                        pass
                if attempt >= WRITE_ATTEMPTS or not self.retryable(exc) or conn.closed:
                    raise
            # Off the reactor (a database thread): a short jittered pause lets the other finish.
            time.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** attempt)))
            attempt += 1

    def retryable(self, exc: BaseException) -> bool:
        try:
            from psycopg import errors
        except ImportError:  # pragma: no cover
            return False
        if isinstance(exc, (errors.SerializationFailure, errors.DeadlockDetected)):
            return True
        return isinstance(exc, errors.UniqueViolation) and \
            getattr(exc.diag, "constraint_name", None) in RACE_CONSTRAINTS


def lock_audit_chain(conn: Any) -> None:
    """Inside a write transaction: queue behind any other appender of the audit chain
    (PostgreSQL; SQLite's writer already holds the database's only write lock)."""
    if is_postgres(conn):
        conn.execute("SELECT pg_advisory_xact_lock(?)", (AUDIT_CHAIN_LOCK,))
