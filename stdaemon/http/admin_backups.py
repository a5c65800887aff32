"""Admin endpoints for backups and the database (S13).  Admin only; audited.

- ``POST /api/admin/backups`` body ``{"path"?, "compress"?}`` -> 201 ``{name, path, size_bytes, created_at}``
- ``GET /api/admin/backups`` -> ``{"backups": [...], "backup_dir"}`` (newest first)
- ``POST /api/admin/backups/restore`` body ``{"name"}`` or ``{"path"}`` -> the restore summary
- ``GET /api/admin/database`` -> the ``get_database_info()`` dict (+ scheduled backup state)
"""

from __future__ import annotations

import os
from typing import Any, Optional

from klein import Klein
from pydantic import Field

from stdaemon.http.errors import ApiError, invalid_field
from stdaemon.http.surface import ADMIN, Response, Surface, route
from stdaemon.http.validation import BodyModel
from stdaemon.logs import get_logger
from stdaemon.store.backup import BackupError, RestoreRefused

log = get_logger("stdaemon.http.admin_backups")

_REFUSED_STATUS = {"not_found": 404, "invalid_name": 400, "invalid_path": 400}

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


class AdminBackupsSurface(Surface):
    app = Klein()
    prefixes = ("/api/admin/backups", "/api/admin/database")

    @property
    def backups(self) -> Any:
        svc = getattr(self.ctx, "backups", None)
        if svc is None:
            raise ApiError(503, "backups_unavailable", "The backup service is not running")
        return svc

    @route(app, "/api/admin/backups", methods=("POST",), access=ADMIN, body=CreateBackup, body_required=False)
    async def create(self, request, body: CreateBackup):
        """Take a backup now (SQLite online backup)."""
        path = body.path
        compress = body.compress
        if path is not None:
            path = self._check_target(path)
        try:
            entry = await self.backups.create(path, compress=compress)
        except BackupError as exc:
            raise ApiError(500 if exc.code == "sqlite_error" else 409, exc.code, exc.detail) from None
        except OSError as exc:
            raise ApiError(409, "backup_failed", f"Cannot write the backup: {exc.strerror or type(exc).__name__}") from None
        await _audit(self.ctx, request, "backup.created", entry["path"], "create",
                     {"name": entry["name"], "size_bytes": entry["size_bytes"]})
        return Response(entry, status=201)

    @route(app, "/api/admin/backups", access=ADMIN)
    async def list_backups(self, request):
        """Backups, newest first."""
        return {"backups": await self.backups.list(), "backup_dir": str(self.backups.store.backup_dir)}

    @route(app, "/api/admin/backups/restore", methods=("POST",), access=ADMIN, body=RestoreBackup)
    async def restore(self, request, body: RestoreBackup):
        """Restore the database from a backup (checked first; a safety copy is kept)."""
        name, path = body.name, body.path
        if (name is None) == (path is None):
            raise ApiError(400, "invalid_request", 'Give exactly one of "name" or "path"')
        for field, value in (("name", name), ("path", path)):
            if value is not None:
                _check_components(field, value)
        try:
            source = self.backups.resolve(name=name, path=path)
            result = await self.backups.restore(source)
        except RestoreRefused as exc:
            raise ApiError(_REFUSED_STATUS.get(exc.code, 422), exc.code, exc.detail) from None
        except BackupError as exc:
            raise ApiError(500, exc.code, exc.detail) from None
        await _audit(self.ctx, request, "backup.restored", result["restored_from"], "restore",
                     {"safety_copy": result["safety_copy"], "job_count": result["job_count"],
                      "schema_version": result["schema_version"]})
        return result

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


async def _audit(ctx: Any, request: Any, event_type: str, target: str, action: str, details: dict) -> None:
    """Through the one audit writer (``ctx.audit.record``, S7)."""
    from stdaemon.store.audit import request_actor

    writer = getattr(ctx, "audit", None)
    actor = request_actor(request)
    if writer is None:
        log.warning("Audit writer not installed; {event_type} not recorded", event_type=event_type)
        return
    from twisted.internet import defer

    await defer.maybeDeferred(writer.record, event_type, actor=actor, ip=getattr(request, "client_ip", None),
                              target=target, action=action, details=details)
