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
settings).  Both are recorded in the audit log when the audit writer offers a
direct entry point (``stdaemon.audit.service.append_from_tool``).

Exit codes: 0 done, 1 failed, 2 bad usage or configuration, 3 restore refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

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


def _audit(config: Any, store: Any, event_type: str, target: str, action: str, details: dict) -> None:
    """Append through the audit module's tool entry point, with the daemon's key.

    The key is ``AUDIT_HMAC_KEY`` from the same secrets chain as the daemon
    (else the audit module's key file).  When a secrets store cannot answer,
    no entry is written (a guessed key would break the chain): say so."""
    try:
        from stdaemon.audit import service as audit_module
    except ImportError:
        return
    append = getattr(audit_module, "append_from_tool", None)
    if append is None:
        return
    from stdaemon.secrets.service import resolve_blocking

    value, problems = resolve_blocking(config, "AUDIT_HMAC_KEY")
    if value is None and problems:
        print("stdaemon-admin: warning: audit entry not written: a secrets store holding "
              f"AUDIT_HMAC_KEY may be down ({'; '.join(problems)})", file=sys.stderr)
        return
    actor = f"cli:{os.environ.get('USER') or os.getuid()}"
    try:
        append(config, str(store.path), event_type, actor=actor, ip=None, target=target,
               action=action, details=details, now=store.clock.seconds(),
               key=value.encode("utf-8") if value else None)
    except Exception as exc:  # the operation is done; say so and report the audit problem
        print(f"stdaemon-admin: warning: could not write the audit entry ({type(exc).__name__}: {exc})",
              file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from stdaemon.config import load_config
    from stdaemon.invalid import InvalidValue
    from stdaemon.backup.store import BackupError, JobStore, RestoreRefused, backup_entry

    try:
        result = load_config(args.config)
    except InvalidValue as exc:
        print(f"stdaemon-admin: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"stdaemon-admin: cannot read {args.config}: {exc.strerror}", file=sys.stderr)
        return EXIT_USAGE
    config = result.config
    for warning in result.warnings:
        print(f"stdaemon-admin: warning: {warning}", file=sys.stderr)
    store = JobStore(config=config)

    try:
        if args.command == "backup":
            written = store.backup(args.path, compress=args.compress)
            entry = backup_entry(written)
            _audit(config, store, "backup.created", entry["path"], "create",
                   {"name": entry["name"], "size_bytes": entry["size_bytes"], "via": "cli"})
            _emit(args, entry, f"Backup created: {entry['path']} ({entry['size_bytes']} bytes)")
        elif args.command == "restore":
            source = store.resolve_backup(args.source)
            store.restore(source)
            summary = {"restored_from": str(source), **store.last_restore}
            _audit(config, store, "backup.restored", str(source), "restore",
                   {"safety_copy": summary.get("safety_copy"), "job_count": summary.get("job_count"),
                    "via": "cli"})
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
        print(f"stdaemon-admin: restore refused ({exc.code}): {exc.detail}", file=sys.stderr)
        return EXIT_REFUSED
    except BackupError as exc:
        print(f"stdaemon-admin: {args.command} failed ({exc.code}): {exc.detail}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"stdaemon-admin: {args.command} failed: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
