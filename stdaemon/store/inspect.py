"""Checks over the whole database (``simpletuner database health|verify|migrations|stats``):
integrity, foreign keys, applied migrations, row counts. Functions take ``conn`` first and run
through ``Database.run_read``."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from stdaemon.timestamps import iso


def quick_check(conn: sqlite3.Connection) -> str:
    rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    return "; ".join(rows[:3])


def table_count(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]


def verify(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    foreign = [f"{r[0]} row {r[1]} -> {r[2]}" for r in conn.execute("PRAGMA foreign_key_check").fetchall()]
    return integrity[:20], foreign[:100]


def applied_migrations(conn: sqlite3.Connection) -> list[dict]:
    out = []
    for number, (name, applied_at) in enumerate(conn.execute(
            "SELECT name, applied_at FROM schema_migrations ORDER BY name"), start=1):
        try:  # SQLite's datetime('now'): "YYYY-MM-DD HH:MM:SS" in UTC
            moment = datetime.strptime(applied_at, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            applied_at = iso(moment.timestamp())
        except (TypeError, ValueError):
            pass
        out.append({"version": number, "name": name, "applied_at": applied_at})
    return out


def row_counts(conn: sqlite3.Connection) -> dict:
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
    # Table names come from sqlite_master itself; quoted as identifiers.
    return {name: {"row_count": conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]} for name in names}
