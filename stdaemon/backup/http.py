"""Admin endpoints for backups and the database (S13).  Admin only; audited.

- ``POST /api/admin/backups`` body ``{"path"?, "compress"?}`` -> 201 ``{name, path, size_bytes, created_at}``
- ``GET /api/admin/backups`` -> ``{"backups": [...], "backup_dir"}`` (newest first)
- ``POST /api/admin/backups/restore`` body ``{"name"}`` or ``{"path"}`` -> the restore summary
- ``GET /api/admin/database`` -> the ``get_database_info()`` dict (+ scheduled backup state)

SimpleTuner's ``simpletuner backup …`` and ``simpletuner database …`` paths
answer the same data (admin only, audited the same way):

- ``GET /api/backup?limit=`` (list; ``id`` is the file name), ``POST /api/backup``
  ``{"name"?, "description"?, "components"?}`` (``name`` becomes
  ``jobs_backup_<name>.db``), ``GET /api/backup/{id}``,
  ``POST /api/backup/{id}/restore`` ``{"dry_run"?}`` (a dry run validates
  without swapping), ``DELETE /api/backup/{id}``.  A backup always holds the
  whole database: ``components`` is ``["database"]``.
- ``GET /api/database/health``, ``/verify/{database}`` (``PRAGMA
  integrity_check`` and ``foreign_key_check``), ``/migrations``,
  ``POST /migrations/run`` (migrations run at start: nothing is pending),
  ``GET /api/database/stats``.  Jobs, users and approvals share one SQLite
  database, so ``jobs``, ``auth`` and ``approvals`` name the same file;
  ``POST /api/database/vacuum/{database}`` is refused (409): a VACUUM would
  hold the write lock for as long as it runs.
"""

from __future__ import annotations

import os
import re
from typing import Annotated, Optional

from klein import Klein
from pydantic import Field

from stdaemon.http.errors import ApiError, invalid_field, not_found
from stdaemon.http.surface import ADMIN, Response, Surface, route
from stdaemon.http.validation import BodyModel, QueryModel
from stdaemon.audit.service import request_actor
from stdaemon.backup.service import BackupService
from stdaemon.store import inspect
from stdaemon.backup.store import BACKUP_PREFIX, NOT_SUPPORTED, BackupError, RestoreRefused

_REFUSED_STATUS = {"not_found": 404, "invalid_name": 400, "invalid_path": 400}
_BACKUP_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# The names SimpleTuner gives its databases; in stdaemon these tables share one file.
_SHARED_DATABASES = ("jobs", "auth", "approvals")
COMPONENTS = ["database"]

# A file name (255 bytes on Linux) and a path (4096) no file system accepts past these.
MAX_NAME = 255
MAX_PATH = 4096
PATH_TEXT = r"^[^\x00]*$"


# -- request models (stdaemon.http.validation) -----------------------------------------------

class CreateBackup(BodyModel):
    path: Optional[str] = Field(None, min_length=1, max_length=MAX_PATH, pattern=PATH_TEXT)
    compress: bool = False


class RestoreBackup(BodyModel):
    name: Optional[str] = Field(None, min_length=1, max_length=MAX_NAME, pattern=PATH_TEXT)
    path: Optional[str] = Field(None, min_length=1, max_length=MAX_PATH, pattern=PATH_TEXT)


# SimpleTuner's ``simpletuner backup …`` / ``database …`` requests.
Names = Annotated[list[Annotated[str, Field(max_length=64)]], Field(max_length=32)]


class CliListBackups(QueryModel):
    limit: int = Field(50, ge=1, le=10000)


class CliCreateBackup(BodyModel):
    name: Optional[str] = Field(None, max_length=100)
    description: Optional[str] = Field(None, max_length=1000)
    components: Optional[Names] = None


class CliRestoreBackup(BodyModel):
    backup_id: Optional[str] = Field(None, max_length=MAX_NAME)
    dry_run: bool = False
    components: Optional[Names] = None


class DatabaseQuery(QueryModel):
    database: str = Field("jobs", max_length=64)
    dry_run: bool = False


class AdminBackupsSurface(Surface):
    app = Klein()
    prefixes = ("/api/admin/backups", "/api/admin/database", "/api/backup", "/api/database")

    @property
    def backups(self) -> BackupService:
        return self.ctx.backups

    @route(app, "/api/admin/backups", methods=("POST",), access=ADMIN, body=CreateBackup, body_required=False)
    async def create(self, request, body: CreateBackup):
        """Take a backup now (SQLite online backup)."""
        path = body.path
        compress = body.compress
        if path is not None:
            path = self._check_target(path)
        entry = await self._create(request, path, compress)
        return Response(entry, status=201)

    async def _create(self, request, path: Optional[str], compress: bool) -> dict:
        try:
            entry = await self.backups.create(path, compress=compress)
        except BackupError as exc:
            raise ApiError(500 if exc.code == "sqlite_error" else 409, exc.code, exc.detail) from None
        except OSError as exc:
            raise ApiError(409, "backup_failed", f"Cannot write the backup: {exc.strerror or type(exc).__name__}") from None
        await self.ctx.audit.record("backup.created", **request_actor(request), target=entry["path"],
                                    action="create",
                                    details={"name": entry["name"], "size_bytes": entry["size_bytes"]})
        return entry

    @route(app, "/api/admin/backups", access=ADMIN)
    async def list_backups(self, request):
        """Backups, newest first."""
        return {"backups": await self._list(), "backup_dir": str(self.backups.store.backup_dir)}

    async def _list(self) -> list[dict]:
        try:
            return await self.backups.list()
        except BackupError as exc:  # PostgreSQL: backed up with pg_dump, not here
            raise ApiError(409, exc.code, exc.detail) from None

    @route(app, "/api/admin/backups/restore", methods=("POST",), access=ADMIN, body=RestoreBackup)
    async def restore(self, request, body: RestoreBackup):
        """Restore the database from a backup (checked first; a safety copy is kept)."""
        name, path = body.name, body.path
        if (name is None) == (path is None):
            raise ApiError(400, "invalid_request", 'Give exactly one of "name" or "path"')
        for field, value in (("name", name), ("path", path)):
            if value is not None:
                _check_components(field, value)
        return await self._restore(request, name=name, path=path)

    async def _restore(self, request, name: Optional[str] = None, path: Optional[str] = None,
                       dry_run: bool = False) -> dict:
        try:
            self.backups.store.refuse_on_postgresql()
            source = self.backups.resolve(name=name, path=path)
            if dry_run:
                return await self.backups.check(source)
            result = await self.backups.restore(source)
        except RestoreRefused as exc:
            raise ApiError(_REFUSED_STATUS.get(exc.code, 422), exc.code, exc.detail) from None
        except BackupError as exc:
            raise ApiError(409 if exc.code == NOT_SUPPORTED else 500, exc.code, exc.detail) from None
        await self.ctx.audit.record("backup.restored", **request_actor(request),
                                    target=result["restored_from"], action="restore",
                                    details={"safety_copy": result["safety_copy"],
                                             "job_count": result["job_count"],
                                             "schema_version": result["schema_version"]})
        return result

    # -- SimpleTuner's ``simpletuner backup …`` paths ------------------------------------

    @staticmethod
    def _cli_entry(entry: dict) -> dict:
        return dict(entry, id=entry["name"], components=list(COMPONENTS))

    async def _entry(self, backup_id: str) -> dict:
        entries = await self._list()
        try:
            source = self.backups.resolve(name=backup_id)
        except RestoreRefused:
            raise not_found(f"Backup {backup_id[:100]} not found") from None
        for entry in entries:
            if entry["path"] == str(source):
                return entry
        raise not_found(f"Backup {backup_id[:100]} not found")

    @route(app, "/api/backup", access=ADMIN, query=CliListBackups)
    async def cli_list(self, request, query: CliListBackups):
        """SimpleTuner's ``backup list``: the backup files (``id`` is the file name)."""
        limit = query.limit
        entries = await self._list()
        return {"backups": [self._cli_entry(e) for e in entries[:limit]], "total": len(entries),
                "total_size_bytes": sum(e["size_bytes"] for e in entries),
                "backup_dir": str(self.backups.store.backup_dir)}

    @route(app, "/api/backup", methods=("POST",), access=ADMIN, body=CliCreateBackup, body_required=False)
    async def cli_create(self, request, body: CliCreateBackup):
        """SimpleTuner's ``backup create``: a backup now (``name`` → ``jobs_backup_<name>.db``)."""
        name = body.name
        path = None
        try:
            self.backups.store.refuse_on_postgresql()
        except BackupError as exc:
            raise ApiError(409, exc.code, exc.detail) from None
        if name is not None:
            if not _BACKUP_NAME.match(name):
                raise invalid_field("name", "must be 1-100 letters, digits, '.', '_' or '-'")
            stem = name[:-3] if name.endswith(".db") else name
            target = self.backups.store.backup_dir / f"{BACKUP_PREFIX}{stem}.db"
            if target.exists():
                raise ApiError(409, "conflict", f"A backup named {target.name} already exists", field="name")
            os.makedirs(target.parent, mode=0o700, exist_ok=True)
            path = str(target)
        entry = await self._create(request, path, False)
        return dict(self._cli_entry(entry), success=True, backup_id=entry["name"])

    @route(app, "/api/backup/<backup_id>", access=ADMIN)
    async def cli_get(self, request, backup_id):
        """SimpleTuner's ``backup get``: one backup file."""
        return self._cli_entry(await self._entry(backup_id))

    @route(app, "/api/backup/<backup_id>/restore", methods=("POST",), access=ADMIN, body=CliRestoreBackup,
           body_required=False)
    async def cli_restore(self, request, backup_id, body: CliRestoreBackup):
        """SimpleTuner's ``backup restore`` (``dry_run`` validates without swapping)."""
        dry_run = body.dry_run
        entry = await self._entry(backup_id)
        result = await self._restore(request, name=entry["name"], dry_run=dry_run)
        return dict(result, success=True, dry_run=dry_run, restored_components=list(COMPONENTS),
                    warnings=[])

    @route(app, "/api/backup/<backup_id>", methods=("DELETE",), access=ADMIN)
    async def cli_delete(self, request, backup_id):
        """SimpleTuner's ``backup delete``: remove a backup file."""
        try:
            entry = await self.backups.delete(backup_id)
        except RestoreRefused as exc:
            raise ApiError(_REFUSED_STATUS.get(exc.code, 422), exc.code, exc.detail) from None
        except BackupError as exc:
            raise ApiError(409, exc.code, exc.detail) from None
        await self.ctx.audit.record("backup.deleted", **request_actor(request), target=entry["path"],
                                    action="delete",
                                    details={"name": entry["name"], "size_bytes": entry["size_bytes"]})
        return {"success": True, "backup_id": entry["name"]}

    # -- SimpleTuner's ``simpletuner database …`` paths ----------------------------------

    @staticmethod
    def _database_name(database: str) -> str:
        if database not in _SHARED_DATABASES:
            raise not_found(f"stdaemon has no {database[:40]!r} database: jobs, users (auth) and approvals "
                            "share one SQLite database")
        return database

    @route(app, "/api/database/health", access=ADMIN)
    async def db_health(self, request):
        """SimpleTuner's ``database health``: size, tables, a quick integrity check."""
        info = await self.backups.info()
        check = await self.ctx.db.run_read(inspect.quick_check)
        issues = [] if check == "ok" else [f"PRAGMA quick_check: {check}"]
        scheduled = info.get("scheduled") or {}
        if scheduled.get("consecutive_failures"):
            issues.append(f"scheduled backups failing: {scheduled.get('last_error')}")
        databases = [dict(name=name, path=info["path"], exists=info["exists"], size_bytes=info["size_bytes"],
                          table_count=await self.ctx.db.run_read(inspect.table_count), shared=True)
                     for name in _SHARED_DATABASES]
        return {"healthy": check == "ok", "total_size_bytes": info["size_bytes"] + info["wal_size_bytes"],
                "databases": databases, "issues": issues, "info": info}

    @route(app, "/api/database/verify/<database>", access=ADMIN)
    async def db_verify(self, request, database):
        """SimpleTuner's ``database verify``: integrity and foreign-key checks."""
        name = self._database_name(database)
        integrity, foreign = await self.ctx.db.run_read(inspect.verify)
        return {"database": name, "valid": integrity == ["ok"] and not foreign,
                "integrity_check": "; ".join(integrity), "foreign_key_check": foreign, "issues": []}

    @route(app, "/api/database/vacuum/<database>", methods=("POST",), access=ADMIN)
    async def db_vacuum(self, request, database):
        """SimpleTuner's ``database vacuum``: refused while the daemon serves."""
        self._database_name(database)
        if self.backups.store.database_url:
            raise ApiError(409, "not_supported", "The database is PostgreSQL: its autovacuum keeps it "
                           "compact; run VACUUM with psql when an operator decides to.")
        raise ApiError(409, "not_supported", "stdaemon does not VACUUM its live database: it would hold the "
                       "write lock for as long as it runs. Stop the daemon and run sqlite3 <db> VACUUM, "
                       "or restore a fresh backup.")

    @route(app, "/api/database/migrations", access=ADMIN, query=DatabaseQuery)
    async def db_migrations(self, request, query: DatabaseQuery):
        """SimpleTuner's ``database migrations``: the applied schema migrations."""
        name = self._database_name(query.database)
        applied = await self.ctx.db.run_read(inspect.applied_migrations)
        return {"database": name, "current_version": applied[-1]["name"] if applied else None,
                "schema_version": len(applied), "applied_migrations": applied, "pending_migrations": []}

    @route(app, "/api/database/migrations/run", methods=("POST",), access=ADMIN, query=DatabaseQuery)
    async def db_migrate(self, request, query: DatabaseQuery):
        """SimpleTuner's ``database migrate``: nothing is ever pending (migrations run at start)."""
        self._database_name(query.database)
        dry_run = query.dry_run
        # Migrations run at start-up, before the daemon serves: none is ever pending here.
        return {"success": True, "dry_run": dry_run, "pending": [], "migrations_run": []}

    @route(app, "/api/database/stats", access=ADMIN)
    async def db_stats(self, request):
        """SimpleTuner's ``database stats``: pages and row counts per table."""
        info = await self.backups.info()
        tables = await self.ctx.db.run_read(inspect.row_counts)
        stats = {"exists": info["exists"], "path": info["path"], "size_bytes": info["size_bytes"],
                 "wal_size_bytes": info["wal_size_bytes"], "page_count": info.get("page_count", 0),
                 "page_size": info.get("page_size", 0), "freelist_count": info.get("freelist_count", 0),
                 "tables": tables}
        return {"jobs": stats}

    @route(app, "/api/admin/database", access=ADMIN)
    async def database(self, request):
        """Database information."""
        return await self.backups.info()

    def _check_target(self, path: str) -> str:
        """A custom backup path: absolute, in an existing directory, named like a
        database, never the live database or a non-regular file."""
        _check_components("path", path)
        path = os.path.expanduser(path)
        if not os.path.isabs(path):
            raise invalid_field("path", "must be an absolute path")
        if not path.endswith((".db", ".db.gz", ".sqlite", ".sqlite3")):
            raise invalid_field("path", "must end in .db, .db.gz, .sqlite or .sqlite3")
        if not os.path.isdir(os.path.dirname(path)):
            raise invalid_field("path", "its directory does not exist")
        live = os.path.realpath(self.backups.store.path)
        if os.path.realpath(path) in (live, live + "-wal", live + "-shm"):
            raise invalid_field("path", "must not be the live database")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise invalid_field("path", "exists and is not a regular file")
        return path


def _check_components(field: str, path: str) -> None:
    """No file system has names longer than 255 bytes: say so instead of failing in the OS."""
    if any(len(part.encode("utf-8", "surrogatepass")) > MAX_NAME for part in path.split("/")):
        raise invalid_field(field, f"a path component is longer than {MAX_NAME} bytes")

