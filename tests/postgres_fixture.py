"""A real PostgreSQL server for the tests: ``initdb`` in a temp dir, ``postgres`` on 127.0.0.1 with
a random free port and its socket in that dir, started once per session and stopped afterwards.

PostgreSQL refuses to run as root: as root, ``initdb`` and ``postgres`` run as the ``postgres``
system user (``runuser``), the temp dir chowned to it.  Debian's binaries are in
``/usr/lib/postgresql/<version>/bin`` (package ``postgresql``, in ``scripts/test``).

``postgres_url`` gives each test a fresh, empty database (``CREATE DATABASE`` on the session's
server) as a ``postgresql://`` URL with a password, as an operator would configure it.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import time

import pytest

from tests.services import free_port, missing

SUPERUSER = "stdaemon"
PASSWORD = "pg-test-secret"


def _bindir() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"),
                        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return os.path.dirname(candidates[-1])
    found = shutil.which("postgres")
    return os.path.dirname(found) if found else None


class PostgresServer:
    def __init__(self, bindir: str):
        self.bindir = bindir
        self.port = free_port()
        self.root = tempfile.mkdtemp(prefix="stdaemon-pg-")
        self.data = os.path.join(self.root, "data")
        self.sockets = os.path.join(self.root, "sockets")
        self.log_path = os.path.join(self.root, "postgres.log")
        self.as_user: list[str] = []
        self.proc: subprocess.Popen | None = None
        self._names = itertools.count(1)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}:{PASSWORD}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *argv: str) -> None:
        subprocess.run([*self.as_user, *argv], check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        os.makedirs(self.sockets)
        pwfile = os.path.join(self.root, "pwfile")
        with open(pwfile, "w") as fh:
            fh.write(PASSWORD + "\n")
        if os.geteuid() == 0:
            try:
                entry = pwd.getpwnam("postgres")
            except KeyError:
                missing("running as root and there is no 'postgres' user to run PostgreSQL as")
            for path in (self.root, self.sockets, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
            self.as_user = ["runuser", "-u", "postgres", "--"]
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", SUPERUSER,
                  "--pwfile", pwfile, "--auth-local=trust", "--auth-host=scram-sha-256",
                  "-E", "UTF8", "--locale=C", "--no-sync")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.as_user, os.path.join(self.bindir, "postgres"), "-D", self.data,
                 "-p", str(self.port), "-k", self.sockets, "-c", "listen_addresses=127.0.0.1",
                 # a test server: no fsync of data files (commits are still acknowledged only
                 # once PostgreSQL considers them durable, which is what stdaemon relies on)
                 "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "max_connections=200",
                 "-c", "shared_buffers=32MB"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log_path, "rb") as fh:
                    raise RuntimeError(f"postgres did not start: {fh.read()[-2000:]!r}")
            time.sleep(0.05)

    def _ready(self) -> bool:
        result = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-q", "-h", "127.0.0.1",
                                 "-p", str(self.port)], capture_output=True)
        return result.returncode == 0

    def admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def new_database(self) -> str:
        """A fresh empty database; its URL."""
        name = f"t{os.getpid()}_{next(self._names)}"
        self.admin(f'CREATE DATABASE "{name}" TEMPLATE template0 STRATEGY FILE_COPY')
        return self.url(name)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            try:
                self._run(os.path.join(self.bindir, "pg_ctl"), "stop", "-D", self.data, "-m", "fast",
                          "-w", "-t", "30")
            except (subprocess.SubprocessError, OSError):
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    bindir = _bindir()
    if bindir is None or not os.access(os.path.join(bindir, "initdb"), os.X_OK):
        missing("PostgreSQL is not installed (Debian package postgresql, see scripts/test)")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (./scripts/setup)")
    server = PostgresServer(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh empty database on the session's PostgreSQL server, as a URL."""
    return postgres_server.new_database()




def migrated_connection(engine_name: str, tmp_path, request):
    """A migrated connection (autocommit) on ``engine_name``, closed at teardown: SQLite in
    ``tmp_path`` or a fresh PostgreSQL database."""
    from stdaemon.store.engines import PostgresEngine, SqliteEngine
    from stdaemon.store.schema import migrate_any

    if engine_name == "sqlite":
        engine = SqliteEngine(str(tmp_path / "jobs.db"))
    else:
        engine = PostgresEngine(request.getfixturevalue("postgres_url"))
    conn = engine.connect()
    migrate_any(conn)
    request.addfinalizer(conn.close)
    return conn


@pytest.fixture(params=["sqlite", "postgresql"])
def engine_conn(request, tmp_path):
    """A migrated connection on each engine in turn (store-level tests)."""
    return migrated_connection(request.param, tmp_path, request)




@pytest.fixture(params=["sqlite", "postgresql"])
def make_database(request, tmp_path):
    """``make_database()`` → a new (not started) ``Database`` on each engine in turn; every one
    made in a test uses the same database (SQLite: ``tmp_path/jobs.db``)."""
    from twisted.internet import reactor

    from stdaemon.store.database import Database
    from stdaemon.store.engines import engine_for

    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else ""
    path = str(tmp_path / "jobs.db")
    return lambda: Database(path, reactor, engine=engine_for(url, path))


def begin(conn) -> None:
    """A write transaction on a plain connection of either engine."""
    from stdaemon.store.engines import is_postgres

    conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE" if is_postgres(conn) else "BEGIN IMMEDIATE")




def engine_settings(request, engine_name: str) -> dict:
    """Daemon settings for ``engine_name``: nothing for SQLite (the embedded default), a fresh
    PostgreSQL database's ``database.url`` otherwise."""
    if engine_name == "sqlite":
        return {}
    return {"database": {"url": request.getfixturevalue("postgres_url")}}


__all__ = ["PostgresServer", "begin", "engine_conn", "engine_settings", "make_database",
           "migrated_connection", "postgres_server", "postgres_url"]
