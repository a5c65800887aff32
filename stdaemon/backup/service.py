"""Backups inside the daemon: the async face of :class:`JobStore` (spec S13).

``app.backups`` is a :class:`BackupService`; the composition root
(``stdaemon.service.build_app``) gives it its one-thread pool (started and
stopped with the daemon) and, when ``backup.enabled``, adds the ``backup``
timer and health component.

- Copies, validation and pruning run in that one-thread pool
  (so they are also serialised); the restore's swap runs on the database's
  writer thread through ``Database.reopen``, so no write interleaves with it.
  A ``DeferredLock`` keeps a backup and a restore from overlapping.
- The scheduled backup never stops the timer: each failure is logged,
  counted (here and in ``app.timer_failures``) and shown in health until the
  next success.
- ``after_restore`` holds async callables run after a successful restore
  (reload settings, recount metrics); their failures are logged, not raised.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import LogLevel

from stdaemon.backup.store import BackupError, JobStore, RestoreRefused, backup_entry
from stdaemon.config.schema import BackupConfig
from stdaemon.health.service import DEGRADED, HEALTHY, Component
from stdaemon.logs import get_logger
from stdaemon.store.database import Database
from stdaemon.threads import BlockingPool
from stdaemon.timestamps import iso

log = get_logger("stdaemon.backup")


class BackupService:
    def __init__(self, db: Database, store: JobStore, pool: BlockingPool, config: BackupConfig,
                 clock: IReactorTime):
        self.db = db
        self.store = store
        self.pool = pool
        self.config = config
        self.clock = clock
        self.lock = defer.DeferredLock()
        self.after_restore: list[Callable[[], Awaitable[Any]]] = []
        # Scheduled-backup state, for health and metrics.
        self.runs = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.last_success_at: Optional[float] = None
        self.last_error: Optional[str] = None
        self.last_backup: Optional[dict] = None

    def _in_pool(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return self.pool.run(fn, *args, **kwargs)

    # -- operations ----------------------------------------------------------

    async def create(self, path: Optional[str] = None, compress: bool = False) -> dict:
        """Take a backup now; ``{name, path, size_bytes, created_at, ...}``."""
        await self.lock.acquire()
        try:
            written = await self._in_pool(self.store.backup, path, compress=compress)
        finally:
            self.lock.release()
        entry = await self._in_pool(backup_entry, written)
        log.info("Backup written to {path} ({size_bytes} bytes)", path=entry["path"], size_bytes=entry["size_bytes"])
        return entry

    async def list(self) -> list[dict]:
        def listing() -> list[dict]:
            out = []
            for p in self.store.list_backups():
                try:
                    out.append(backup_entry(p))
                except FileNotFoundError:  # pruned meanwhile
                    continue
            return out

        return await self._in_pool(listing)

    async def info(self) -> dict:
        if self.store.database_url:  # PostgreSQL: its facts, read on the database's own threads
            info = await self.db.run_read(self.store.get_database_info)
        else:
            info = await self._in_pool(self.store.get_database_info)
        info["scheduled"] = self.schedule_status()
        return info

    def resolve(self, name: Optional[str] = None, path: Optional[str] = None) -> Path:
        """A backup by ``name`` (a file in the backup dir, no separators) or ``path``."""
        if name is not None:
            if not isinstance(name, str) or not name or "/" in name or os.sep in name or name in (".", "..") \
                    or "\x00" in name or not _fits(name):
                raise RestoreRefused("invalid_name", "name must be a backup file name from GET /api/admin/backups")
            return self.store.backup_dir / name
        if not isinstance(path, str) or not path or "\x00" in path \
                or not all(_fits(part) for part in path.split("/")):
            raise RestoreRefused("invalid_path", "path must be a non-empty string naming a file")
        return Path(os.path.expanduser(path))

    async def check(self, source: Path) -> dict:
        """A dry run of :meth:`restore`: the same validation, nothing swapped."""
        staging, facts = await self._in_pool(self.store.prepare_restore, source)
        await self._in_pool(_unlink_quietly, staging)
        return facts

    async def delete(self, name: str) -> dict:
        """Remove one backup file of the backup directory (by ``name``); the
        entry it was.  Raises :class:`RestoreRefused` (``not_found``,
        ``invalid_name``)."""
        self.store.refuse_on_postgresql()
        path = self.resolve(name=name)

        def unlink() -> dict:
            if not path.is_file() or path.parent != self.store.backup_dir:
                raise RestoreRefused("not_found", f"backup {name} does not exist")
            entry = backup_entry(path)
            os.unlink(path)
            return entry

        await self.lock.acquire()
        try:
            return await self._in_pool(unlink)
        finally:
            self.lock.release()

    async def restore(self, source: Path) -> dict:
        """Validate, keep a safety copy, swap in on the writer thread, run hooks."""
        await self.lock.acquire()
        try:
            staging, facts = await self._in_pool(self.store.prepare_restore, source)
            box: dict = {}
            try:
                await self.db.reopen(lambda: box.update(self.store.swap_in(staging)))
            finally:
                await self._in_pool(_unlink_quietly, staging)
        finally:
            self.lock.release()
        log.warning("Database restored from {source}; safety copy of the previous database: {safety}",
                    source=str(source), safety=box.get("safety_copy"))
        for hook in list(self.after_restore):
            try:
                await hook()
            except Exception:
                log.failure("An after-restore hook failed", level=LogLevel.error)
        return {
            "restored_from": str(source),
            "safety_copy": box.get("safety_copy"),
            "job_count": box.get("job_count", facts.get("job_count")),
            "schema_version": box.get("schema_version", facts.get("schema_version")),
            "backup_schema_version": facts.get("schema_version"),
            "preserved_tables": box.get("preserved_tables", []),
        }

    # -- the timer -------------------------------------------------------------

    async def scheduled(self) -> None:
        """One scheduled run: backup (gzip per config), then retention.  Raises on
        failure so the timer logs and counts it; the timer keeps running."""
        cfg = self.config
        self.runs += 1
        try:
            entry = await self.create(compress=cfg.compress)
            removed = await self._in_pool(self.store.prune, cfg.keep_days, cfg.keep_count)
        except Exception as exc:
            self.failures += 1
            self.consecutive_failures += 1
            self.last_error = _describe(exc)
            raise
        self.consecutive_failures = 0
        self.last_error = None
        self.last_success_at = self.clock.seconds()
        self.last_backup = entry
        if removed:
            log.info("Backup retention removed {n} old backup(s)", n=len(removed))

    def schedule_status(self) -> dict:
        cfg = self.config
        return {
            "enabled": cfg.enabled,
            "interval": cfg.interval,
            "runs": self.runs,
            "failures": self.failures,
            "consecutive_failures": self.consecutive_failures,
            "last_success_at": iso(self.last_success_at),
            "last_error": self.last_error,
            "last_backup": self.last_backup["name"] if self.last_backup else None,
        }

    async def health(self) -> Component:
        """The ``backup`` health component (registered when ``backup.enabled``)."""
        if self.store.database_url:  # not a failure: PostgreSQL is backed up with pg_dump
            return Component("backup", HEALTHY, "the database is PostgreSQL: backed up with pg_dump, "
                                                "not by stdaemon")
        if self.consecutive_failures:
            return Component("backup", DEGRADED,
                             f"last scheduled backup failed ({self.consecutive_failures} in a row, "
                             f"{self.failures} total): {self.last_error}")
        if self.last_backup:
            return Component("backup", HEALTHY, f"last backup {self.last_backup['name']}")
        return Component("backup", HEALTHY, "no scheduled backup yet")


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BackupError):
        return exc.detail
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _fits(name: str) -> bool:
    """A file name the file system can hold (255 bytes): longer ones would fail in the OS."""
    return len(name.encode("utf-8", "surrogatepass")) <= 255
