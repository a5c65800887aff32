"""``stdaemon-admin``: operator commands on the daemon's database (S13).

    stdaemon-admin [--config FILE] [--json] backup [--path P] [--compress]
    stdaemon-admin [--config FILE] [--json] restore PATH_OR_NAME
    stdaemon-admin [--config FILE] [--json] list-backups
    stdaemon-admin [--config FILE] [--json] db-info

Same configuration as the daemon: ``--config`` (or ``STDAEMON_CONFIG``) and
the same environment variables (``SIMPLETUNER_STATE_DIR``,
``SIMPLETUNER_BACKUP_DIR``, ...).  Safe while the daemon runs: backups use
SQLite's online backup API and a restore replaces the pages in one
transaction that the daemon's connections see at once (the HTTP endpoint
``POST /api/admin/backups/restore`` also reloads the daemon's cached
settings).  Both are recorded in the audit log through its tool entry point
(``stdaemon.audit.service.append_from_tool``).

With PostgreSQL (``database.url``) ``db-info`` reports that database and
``backup``, ``restore`` and ``list-backups`` fail (exit 1) saying to use
``pg_dump`` and ``pg_restore`` instead.

Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 restore refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from stdaemon.audit import store as audit_store
from stdaemon.audit.service import append_from_tool
from stdaemon.backup.store import BackupError, JobStore, RestoreRefused, backup_entry
from stdaemon.config import load_config
from stdaemon.invalid import InvalidValue
from stdaemon.secrets.service import resolve_blocking

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REFUSED = 0, 1, 2, 3


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stdaemon-admin", description="stdaemon operator commands")
    parser.add_argument("--config", default=os.environ.get("STDAEMON_CONFIG"),
                        help="the daemon's config file (YAML or INI)")
    parser.add_argument("--json", action="store_true", help="machine-readable JSON output")
    # The same two options are accepted after the command too (``list-backups --json``).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup", parents=[common], help="take an online backup now")
    b.add_argument("--path", help="write here instead of <backup dir>/jobs_backup_YYYYMMDD_HHMMSS.db")
    b.add_argument("--compress", action="store_true", help="gzip the backup")
    r = sub.add_parser("restore", parents=[common], help="restore a backup over the live database")
    r.add_argument("source", help="a backup path, or a file name in the backup directory")
    sub.add_parser("list-backups", parents=[common], help="backups, newest first")
    sub.add_parser("db-info", parents=[common], help="database facts: size, jobs, WAL, schema version")
    return parser


def _emit(args: argparse.Namespace, payload: Any, text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True, default=str))
    else:
        print(text)


def _say(message: str, status: int = EXIT_OK) -> int:
    """One line on stderr, prefixed with the program's name; returns ``status``."""
    print(f"stdaemon-admin: {message}", file=sys.stderr)
    return status


def _audit_key(config: Any) -> tuple[bool, bytes | None]:
    """``(usable, key)``: ``AUDIT_HMAC_KEY`` from the same secrets chain as the daemon
    (``None``: the audit key file).  Not usable when a secrets store that may hold it
    cannot answer: a guessed key would break the chain."""
    value, problems = resolve_blocking(config, "AUDIT_HMAC_KEY")
    if value is None and problems:
        _say("warning: audit entry not written: a secrets store holding "
             f"AUDIT_HMAC_KEY may be down ({'; '.join(problems)})")
        return False, None
    return True, value.encode("utf-8") if value else None


def _append_audit(config: Any, store: JobStore, event_type: str, target: str, action: str,
                  details: dict) -> None:
    """Record a done operation in the audit log, with the daemon's key."""
    usable, key = _audit_key(config)
    if not usable:
        return
    actor = f"cli:{os.environ.get('USER') or os.getuid()}"
    try:
        append_from_tool(config, str(store.path), event_type, actor=actor, ip=None, target=target,
                         action=action, details=details, now=store.clock.seconds(), key=key)
    except Exception as exc:  # the operation is done; say so and report the audit problem
        _say(f"warning: could not write the audit entry ({type(exc).__name__}: {exc})")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = load_config(args.config)
    except InvalidValue as exc:
        return _say(f"configuration error: {exc}", EXIT_USAGE)
    except OSError as exc:
        return _say(f"cannot read {args.config}: {exc.strerror}", EXIT_USAGE)
    config = result.config
    for warning in result.warnings:
        _say(f"warning: {warning}")
    # A restore keeps the live audit log (history is never rolled back).
    store = JobStore(config=config, preserved_tables=audit_store.PRESERVED_TABLES)

    try:
        if args.command == "backup":
            written = store.backup(args.path, compress=args.compress)
            entry = backup_entry(written)
            _append_audit(config, store, "backup.created", entry["path"], "create",
                          {"name": entry["name"], "size_bytes": entry["size_bytes"], "via": "cli"})
            _emit(args, entry, f"Backup created: {entry['path']} ({entry['size_bytes']} bytes)")
        elif args.command == "restore":
            source = store.resolve_backup(args.source)
            store.restore(source)
            summary = {"restored_from": str(source), **store.last_restore}
            _append_audit(config, store, "backup.restored", str(source), "restore",
                          {"safety_copy": summary.get("safety_copy"),
                           "job_count": summary.get("job_count"), "via": "cli"})
            _emit(args, summary,
                  f"Restored {source} ({summary.get('job_count')} jobs); "
                  f"previous database kept at {summary.get('safety_copy')}")
        elif args.command == "list-backups":
            entries = [backup_entry(p) for p in store.list_backups()]
            lines = [f"{e['name']}  {e['size_bytes'] / 1024:.1f} KB  {e['created_at']}" for e in entries]
            _emit(args, {"backup_dir": str(store.backup_dir), "backups": entries},
                  "\n".join(lines) if lines else f"No backups in {store.backup_dir}")
        elif args.command == "db-info":
            info = store.get_database_info()
            text = "\n".join(f"{k}: {v}" for k, v in info.items())
            _emit(args, info, text)
    except RestoreRefused as exc:
        return _say(f"restore refused ({exc.code}): {exc.detail}", EXIT_REFUSED)
    except BackupError as exc:
        return _say(f"{args.command} failed ({exc.code}): {exc.detail}", EXIT_FAILED)
    except OSError as exc:
        return _say(f"{args.command} failed: {exc}", EXIT_FAILED)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
