"""Backups and restore of the jobs database (spec S13).

:class:`JobStore` is the guide's blocking Python API (also used by
``stdaemon-admin``)::

    store = JobStore()                    # the daemon's database (config/env)
    path = store.backup()                 # <backup dir>/jobs_backup_YYYYMMDD_HHMMSS.db
    store.backup("/backup/custom.db")     # any path; ``.gz`` is compressed
    for b in store.list_backups(): ...    # Paths, newest first
    store.get_database_info()             # {path, size_mb, job_count, wal_size_bytes, ...}
    store.restore(Path("/backup/jobs_backup_20240115_103000.db"))   # True

How it stays trustworthy:

- ``backup`` uses SQLite's online backup API in one step: a read transaction
  on a WAL database, so the copy is a consistent snapshot while the daemon
  keeps writing.  The copy is written under a temporary name, checked with
  ``PRAGMA integrity_check``, fsynced and renamed (then optionally gzipped
  the same way), mode 0600.
- ``restore`` first validates the candidate (SQLite header,
  ``integrity_check``, stdaemon's schema: ``schema_migrations`` with no
  migration this version does not know, and the ``jobs`` table), copies it to
  a staging file, keeps a safety copy of the current database
  (``jobs_pre_restore_*.db``), then writes the staging pages into the live
  database with the backup API -- one write transaction, so it is applied
  completely or not at all, and every connection (the daemon's, other
  processes') sees the restored data at once.  Older backups are migrated
  forward.  Any failure before that transaction leaves the current database
  untouched.  The append-only tables named by ``preserved_tables`` (the daemon
  and ``stdaemon-admin`` pass the audit log's, ``stdaemon.audit.store.PRESERVED_TABLES``)
  keep their live rows: a restore cannot erase history.

With PostgreSQL (``database.url``) none of this pretends to work: ``backup``,
``restore`` and ``list_backups`` raise :class:`BackupError` (``not_supported``,
answered 409) saying that PostgreSQL is backed up with ``pg_dump`` and restored
with ``pg_restore`` (README, "Backup and restore"); ``get_database_info``
reports the PostgreSQL database's facts.

Size: over 500 lines: backup, validation, restore with carried-over tables and
retention form one procedure over one file, best read in one place.

Everything here blocks: in the daemon it runs in the backup service's own
thread (validation, copies) and on the database's writer thread (the swap,
through ``Database.reopen``), see ``stdaemon/backup/service.py``.
"""

from __future__ import annotations

import gzip
import os
import shutil
import sqlite3
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

from stdaemon.config import load_config, state_path
from stdaemon.timestamps import iso
from stdaemon.store import schema
from stdaemon.store.files import fsync_dir, fsync_path

BACKUP_PREFIX = "jobs_backup_"
SAFETY_PREFIX = "jobs_pre_restore_"
SQLITE_HEADER = b"SQLite format 3\x00"
REQUIRED_JOB_COLUMNS = {"job_id", "provider", "status", "created_at"}
BUSY_TIMEOUT_MS = 10000
_COPY_CHUNK = 1024 * 1024
NOT_SUPPORTED = "not_supported"
POSTGRESQL_DETAIL = ("stdaemon's database is PostgreSQL (database.url): back it up with pg_dump and "
                     "restore it with pg_restore (see the README, Backup and restore); stdaemon's own "
                     "backups copy the embedded SQLite file only")


class BackupError(Exception):
    """A backup could not be made.  ``code`` is a stable machine-readable reason."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code = code
        self.detail = detail


class RestoreRefused(BackupError):
    """The candidate file is not a sound stdaemon database; nothing was changed."""


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).strftime("%Y%m%d_%H%M%S")


def _connect(path: Path | str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        uri = f"file:{quote(str(path))}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
    else:
        conn = sqlite3.connect(str(path), timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    return conn


def _is_backup_name(name: str) -> bool:
    return (name.startswith(BACKUP_PREFIX) or name.startswith(SAFETY_PREFIX)) and (
        name.endswith(".db") or name.endswith(".db.gz")
    )


def backup_entry(path: Path) -> dict:
    """The API shape of one backup file: ``{name, path, size_bytes, created_at}``."""
    st = path.stat()
    return {
        "name": path.name,
        "path": str(path),
        "size_bytes": st.st_size,
        "created_at": iso(st.st_mtime),
        "compressed": path.name.endswith(".gz"),
        "kind": "safety" if path.name.startswith(SAFETY_PREFIX) else "backup",
    }


def check_database(conn: sqlite3.Connection, origin: str) -> dict:
    """Integrity and schema checks of an open database; raises :class:`RestoreRefused`."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        raise RestoreRefused("corrupt", f"{origin} is not a readable SQLite database ({exc})") from None
    if rows != ["ok"]:
        raise RestoreRefused("corrupt", f"{origin} failed PRAGMA integrity_check: {'; '.join(rows[:3])}")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "schema_migrations" not in tables or "jobs" not in tables:
        raise RestoreRefused("foreign_database", f"{origin} is not a stdaemon jobs database (no jobs/schema tables)")
    applied = [r[0] for r in conn.execute("SELECT name FROM schema_migrations ORDER BY name")]
    known = schema.known_migrations()
    unknown = sorted(set(applied) - set(known))
    if unknown:
        raise RestoreRefused(
            "newer_schema",
            f"{origin} has migrations this version does not know ({', '.join(unknown)}); upgrade stdaemon first",
        )
    columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    missing = REQUIRED_JOB_COLUMNS - columns
    if missing:
        raise RestoreRefused("foreign_database", f"{origin}: jobs table lacks {', '.join(sorted(missing))}")
    job_count = conn.execute("SELECT count(*) FROM jobs").fetchone()[0]
    return {"schema_version": len(applied), "migrations": applied, "job_count": job_count}


class JobStore:
    """Blocking backup/restore/info API over one SQLite jobs database.

    ``preserved_tables``: append-only tables whose live rows a restore keeps
    (same columns required), e.g. ``stdaemon.audit.store.PRESERVED_TABLES``."""

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        *,
        backup_dir: str | os.PathLike | None = None,
        config: Any = None,
        clock: Any = None,
        preserved_tables: Sequence[str] = (),
        database_url: str | None = None,
    ):
        self.preserved_tables = tuple(preserved_tables)
        if database_url is None and config is not None:
            database_url = config.database.url
        #: the PostgreSQL database the daemon uses instead of the SQLite file ("" = none)
        self.database_url = database_url or ""
        if path is None:
            # The daemon's database: same config file/env resolution as the daemon.
            if config is None:
                config = load_config(None).config
            path = state_path(config, "config", "cloud", "jobs.db")
        self.path = Path(os.path.expanduser(str(path)))
        if backup_dir is None:
            # ``backup.dir``, else ``<state dir>/backups``; a bare path: next to it.
            if config is not None:
                configured = config.backup.dir
                backup_dir = os.path.expanduser(configured) if configured else state_path(config, "backups")
            else:
                backup_dir = self.path.parent / "backups"
        self.backup_dir = Path(backup_dir)
        if clock is None:
            # The guide's API is used from scripts: the reactor's clock is the
            # wall clock and needs no running reactor.  Imported here: importing
            # the global reactor installs it, which a module import must not do.
            from twisted.internet import reactor as clock  # type: ignore[no-redef]
        self.clock = clock

    # -- backup --------------------------------------------------------------

    def refuse_on_postgresql(self) -> None:
        """:class:`BackupError` ``not_supported`` when the daemon's database is PostgreSQL."""
        if self.database_url:
            raise BackupError(NOT_SUPPORTED, POSTGRESQL_DETAIL)

    def default_backup_path(self, prefix: str = BACKUP_PREFIX) -> Path:
        stamp = _timestamp(self.clock.seconds())
        candidate = self.backup_dir / f"{prefix}{stamp}.db"
        n = 1
        while candidate.exists() or candidate.with_name(candidate.name + ".gz").exists():
            candidate = self.backup_dir / f"{prefix}{stamp}_{n}.db"
            n += 1
        return candidate

    def backup(self, path: str | os.PathLike | None = None, *, compress: bool = False,
               prefix: str = BACKUP_PREFIX, source: sqlite3.Connection | None = None) -> Path:
        """Copy the database with SQLite's online backup API; return the file written.

        ``path`` ending in ``.gz`` (or ``compress=True``) writes a gzip file.
        ``source`` lets the caller pass an open connection to the live database.
        """
        self.refuse_on_postgresql()
        if source is None and not self.path.exists():
            raise BackupError("no_database", f"database {self.path} does not exist")
        if path is None:
            target = self.default_backup_path(prefix)
            if compress:
                target = target.with_name(target.name + ".gz")
        else:
            target = Path(os.path.expanduser(str(path)))
            compress = compress or target.name.endswith(".gz")
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        db_target = target.with_name(target.name[: -len(".gz")]) if target.name.endswith(".gz") else target
        partial = target.with_name(f".{db_target.name}.partial-{os.getpid()}")
        try:
            self._copy_to(partial, source)
            if compress:
                zipped = target.with_name(f".{target.name}.partial-{os.getpid()}")
                try:
                    fd = os.open(zipped, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                    with open(partial, "rb") as src, os.fdopen(fd, "wb") as raw, gzip.GzipFile(
                        filename=db_target.name, mode="wb", fileobj=raw, compresslevel=6
                    ) as dst:
                        shutil.copyfileobj(src, dst, _COPY_CHUNK)
                    fsync_path(zipped)
                    os.replace(zipped, target)
                finally:
                    if zipped.exists():
                        zipped.unlink()
            else:
                os.replace(partial, target)
            fsync_dir(target.parent)
        finally:
            if partial.exists():
                partial.unlink()
        return target

    def _copy_to(self, partial: Path, source: sqlite3.Connection | None) -> None:
        if partial.exists():
            partial.unlink()
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.close(fd)
        own = source is None
        src = _connect(self.path) if own else source
        dst = _connect(partial)
        try:
            # One step (pages=-1): a single read transaction, so the copy is one
            # consistent snapshot; in WAL mode writers are not blocked meanwhile.
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode=DELETE")
            rows = [r[0] for r in dst.execute("PRAGMA integrity_check").fetchall()]
            if rows != ["ok"]:
                raise BackupError("corrupt_copy", f"backup copy failed integrity_check: {'; '.join(rows[:3])}")
        except sqlite3.Error as exc:
            raise BackupError("sqlite_error", f"backup of {self.path} failed: {exc}") from None
        finally:
            dst.close()
            if own:
                src.close()
        fsync_path(partial)

    # -- listing and info ----------------------------------------------------

    def list_backups(self) -> list[Path]:
        """Backup files in the backup directory (including safety copies), newest first."""
        self.refuse_on_postgresql()
        if not self.backup_dir.is_dir():
            return []
        found = []
        for entry in os.scandir(self.backup_dir):
            if entry.is_file() and _is_backup_name(entry.name):
                found.append((entry.stat().st_mtime_ns, entry.name, Path(entry.path)))
        found.sort(reverse=True)
        return [p for _, _, p in found]

    def get_database_info(self, conn: sqlite3.Connection | None = None) -> dict:
        if self.database_url:
            return self._postgresql_info(conn)
        wal = Path(str(self.path) + "-wal")
        info: dict[str, Any] = {
            "path": str(self.path),
            "exists": self.path.exists(),
            "size_bytes": self.path.stat().st_size if self.path.exists() else 0,
            "wal_size_bytes": wal.stat().st_size if wal.exists() else 0,
            "backup_dir": str(self.backup_dir),
        }
        info["size_mb"] = round(info["size_bytes"] / (1024 * 1024), 3)
        backups = self.list_backups()
        info["backup_count"] = len(backups)
        info["latest_backup"] = backup_entry(backups[0]) if backups else None
        if not info["exists"] and conn is None:
            info.update(job_count=0, schema_version=0, jobs_by_status={})
            return info
        own = conn is None
        c = _connect(self.path, readonly=True) if own else conn
        try:
            applied = [r[0] for r in c.execute("SELECT name FROM schema_migrations ORDER BY name")]
            info["schema_version"] = len(applied)
            info["latest_migration"] = applied[-1] if applied else None
            info["job_count"] = c.execute("SELECT count(*) FROM jobs").fetchone()[0]
            info["jobs_by_status"] = {
                r[0]: r[1] for r in c.execute("SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")
            }
            info["page_size"] = c.execute("PRAGMA page_size").fetchone()[0]
            info["page_count"] = c.execute("PRAGMA page_count").fetchone()[0]
            info["freelist_count"] = c.execute("PRAGMA freelist_count").fetchone()[0]
            info["journal_mode"] = c.execute("PRAGMA journal_mode").fetchone()[0]
            info["sqlite_version"] = sqlite3.sqlite_version
        finally:
            if own:
                c.close()
        return info

    def _postgresql_info(self, conn: Any = None) -> dict:
        from stdaemon.store.engines import PostgresEngine

        engine = PostgresEngine(self.database_url)
        own = conn is None
        c = engine.connect() if own else conn
        try:
            applied = [r[0] for r in c.execute("SELECT name FROM schema_migrations ORDER BY name")]
            size = c.execute("SELECT pg_database_size(current_database())").fetchone()[0]
            info: dict[str, Any] = {
                "engine": "postgresql", "path": engine.description, "exists": True,
                "size_bytes": int(size), "size_mb": round(int(size) / (1024 * 1024), 3),
                "wal_size_bytes": 0, "backup_dir": str(self.backup_dir), "backup_count": 0,
                "latest_backup": None, "backups": POSTGRESQL_DETAIL,
                "schema_version": len(applied), "latest_migration": applied[-1] if applied else None,
                "job_count": c.execute("SELECT count(*) FROM jobs").fetchone()[0],
                "jobs_by_status": {r[0]: r[1] for r in c.execute(
                    "SELECT status, count(*) FROM jobs GROUP BY status ORDER BY status")},
                "server_version": c.execute("SHOW server_version").fetchone()[0],
            }
        finally:
            if own:
                c.close()
        return info

    # -- restore -------------------------------------------------------------

    def resolve_backup(self, name_or_path: str) -> Path:
        """A backup by bare name (in the backup dir) or by path."""
        if os.sep not in name_or_path and "/" not in name_or_path:
            if name_or_path in ("", ".", "..") or "\x00" in name_or_path:
                raise RestoreRefused("not_found", "invalid backup name")
            return self.backup_dir / name_or_path
        return Path(os.path.expanduser(name_or_path))

    def prepare_restore(self, path: str | os.PathLike) -> tuple[Path, dict]:
        """Validate ``path`` and copy it to a staging file next to the database.

        Returns ``(staging, facts)``; the caller removes the staging file.
        Raises :class:`RestoreRefused` for anything unsound.
        """
        self.refuse_on_postgresql()
        candidate = Path(os.path.expanduser(str(path)))
        if not candidate.is_file():
            raise RestoreRefused("not_found", f"backup {candidate} does not exist")
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        stamp = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        unpacked: Path | None = None
        staging = self.path.with_name(f".{self.path.name}.restore-{stamp}")
        try:
            source = candidate
            if candidate.name.endswith(".gz"):
                unpacked = self.path.with_name(f".{self.path.name}.unpack-{stamp}")
                try:
                    with gzip.open(candidate, "rb") as src, open(unpacked, "wb") as dst:
                        shutil.copyfileobj(src, dst, _COPY_CHUNK)
                except (OSError, EOFError, gzip.BadGzipFile) as exc:
                    raise RestoreRefused("corrupt", f"{candidate} is not a readable gzip file ({exc})") from None
                source = unpacked
            with open(source, "rb") as fh:
                if fh.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
                    raise RestoreRefused("not_sqlite", f"{candidate} is not an SQLite database")
            try:
                conn = _connect(source, readonly=True)
            except sqlite3.Error as exc:
                raise RestoreRefused("corrupt", f"{candidate} cannot be opened ({exc})") from None
            try:
                facts = check_database(conn, str(candidate))
                stage = _connect(staging)
                try:
                    conn.backup(stage, pages=-1)
                    stage.execute("PRAGMA journal_mode=DELETE")
                    live_page_size = self._live_page_size()
                    if live_page_size and stage.execute("PRAGMA page_size").fetchone()[0] != live_page_size:
                        # A WAL database cannot change its page size through the
                        # backup API: rewrite the staging copy with the live size.
                        stage.execute(f"PRAGMA page_size={int(live_page_size)}")
                        stage.execute("VACUUM")
                finally:
                    stage.close()
            except sqlite3.DatabaseError as exc:
                raise RestoreRefused("corrupt", f"{candidate} cannot be read ({exc})") from None
            finally:
                conn.close()
            fsync_path(staging)
            return staging, facts
        except BaseException:
            if staging.exists():
                staging.unlink()
            raise
        finally:
            if unpacked is not None and unpacked.exists():
                unpacked.unlink()

    def _live_page_size(self) -> int | None:
        if not self.path.exists():
            return None
        conn = _connect(self.path, readonly=True)
        try:
            return conn.execute("PRAGMA page_size").fetchone()[0]
        finally:
            conn.close()

    def swap_in(self, staging: Path, keep_safety_copy: bool = True) -> dict:
        """Write ``staging`` into the live database in one transaction.

        Keeps a safety copy of the current database first (in the backup dir).
        Runs where it may block: on the daemon's writer thread (inside
        ``Database.reopen``) or in a tool.
        """
        self.refuse_on_postgresql()
        result: dict[str, Any] = {"safety_copy": None}
        live = _connect(self.path)
        try:
            live.execute("PRAGMA journal_mode=WAL")
            if keep_safety_copy:
                safety = self.backup(prefix=SAFETY_PREFIX, source=live)
                result["safety_copy"] = str(safety)
            result["preserved_tables"] = self._carry_over(staging)
            stage = _connect(staging, readonly=True)
            try:
                stage.backup(live, pages=-1)
            except sqlite3.Error as exc:
                raise BackupError("swap_failed", f"restore into {self.path} failed: {exc}") from None
            finally:
                stage.close()
            result["schema_version"] = schema.migrate(live)
            result["job_count"] = live.execute("SELECT count(*) FROM jobs").fetchone()[0]
            try:
                live.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # readers still active: the checkpoint happens later
        finally:
            live.close()
        return result

    def _carry_over(self, staging: Path) -> list[str]:
        """Copy the append-only tables named by ``preserved_tables`` from the live
        database into the staging copy, so the swap keeps them.

        Only when the table exists in both with the same columns; otherwise the
        backup's version stays (the safety copy has the live one)."""
        if not self.preserved_tables or not self.path.exists():
            return []
        kept = []
        stage = _connect(staging)
        try:
            stage.execute("ATTACH DATABASE ? AS cur", (str(self.path),))
            for table in sorted(set(self.preserved_tables)):
                quoted = '"' + table.replace('"', '""') + '"'
                mine = [tuple(r[1:3]) for r in stage.execute(f"PRAGMA main.table_info({quoted})")]
                live = [tuple(r[1:3]) for r in stage.execute(f"PRAGMA cur.table_info({quoted})")]
                if not mine or mine != live:
                    continue
                stage.execute("BEGIN IMMEDIATE")
                try:
                    stage.execute(f"DELETE FROM main.{quoted}")
                    stage.execute(f"INSERT INTO main.{quoted} SELECT * FROM cur.{quoted}")
                    self._carry_sequence(stage, table)
                except BaseException:
                    stage.execute("ROLLBACK")
                    raise
                stage.execute("COMMIT")
                kept.append(table)
            stage.execute("DETACH DATABASE cur")
        finally:
            stage.close()
        return kept

    @staticmethod
    def _carry_sequence(stage: sqlite3.Connection, table: str) -> None:
        """Keep an AUTOINCREMENT table's high-water mark too (it tells truncation apart)."""
        has = "SELECT 1 FROM {0}.sqlite_master WHERE type = 'table' AND name = 'sqlite_sequence'"
        if not (stage.execute(has.format("main")).fetchone() and stage.execute(has.format("cur")).fetchone()):
            return
        row = stage.execute("SELECT seq FROM cur.sqlite_sequence WHERE name = ?", (table,)).fetchone()
        if row is None:
            return
        stage.execute("DELETE FROM main.sqlite_sequence WHERE name = ?", (table,))
        stage.execute("INSERT INTO main.sqlite_sequence (name, seq) VALUES (?, ?)", (table, row[0]))

    def restore(self, path: str | os.PathLike) -> bool:
        """Restore ``path`` over the live database; ``True`` on success.

        Raises :class:`RestoreRefused` when the file is unsound (nothing
        changed).  The daemon does the same in two steps (``prepare_restore``
        in its backup thread, ``swap_in`` inside ``Database.reopen``); this is
        the tools' and scripts' form, safe while the daemon runs.
        """
        staging, _facts = self.prepare_restore(path)
        try:
            self.last_restore = self.swap_in(staging)
        finally:
            if staging.exists():
                staging.unlink()
        return True

    last_restore: dict = {}

    # -- retention -----------------------------------------------------------

    def prune(self, keep_days: float, keep_count: int, now: float | None = None) -> list[Path]:
        """Delete backups older than ``keep_days`` and scheduled backups beyond the
        newest ``keep_count`` (0 = no limit).  Files elsewhere are never touched."""
        self.refuse_on_postgresql()
        now = self.clock.seconds() if now is None else now
        doomed = []
        index = 0
        for p in self.list_backups():
            scheduled = p.name.startswith(BACKUP_PREFIX)
            too_many = scheduled and keep_count > 0 and index >= keep_count
            too_old = keep_days > 0 and now - p.stat().st_mtime > keep_days * 86400
            index += scheduled
            if too_many or too_old:
                doomed.append(p)
        for p in doomed:
            try:
                p.unlink()
            except FileNotFoundError:
                pass
        return doomed
