"""Checks over the whole database (``simpletuner database health|verify|migrations|stats``):
integrity, foreign keys, applied migrations, row counts. Functions take ``conn`` first and run
through ``Database.run_read``; each works on both engines (:mod:`stdaemon.store.engines`).
PostgreSQL checks its pages and foreign keys itself, so its integrity answer is a real query
that must succeed."""

from __future__ import annotations

import sqlite3
from datetime import datetime, timezone

from stdaemon.store.engines import is_postgres
from stdaemon.timestamps import iso

_PG_TABLES = ("SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
              " AND table_type = 'BASE TABLE' ORDER BY table_name")


def quick_check(conn: sqlite3.Connection) -> str:
    if is_postgres(conn):
        conn.execute("SELECT count(*) FROM schema_migrations").fetchone()
        return "ok"
    rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    return "; ".join(rows[:3])


def _tables(conn: sqlite3.Connection) -> list[str]:
    if is_postgres(conn):
        return [r[0] for r in conn.execute(_PG_TABLES)]
    return [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]


def table_count(conn: sqlite3.Connection) -> int:
    if is_postgres(conn):
        return len(_tables(conn))
    return conn.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0]


def verify(conn: sqlite3.Connection) -> tuple[list[str], list[str]]:
    if is_postgres(conn):  # PostgreSQL enforces foreign keys on every write
        return [quick_check(conn)], []
    integrity = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
    foreign = [f"{r[0]} row {r[1]} -> {r[2]}" for r in conn.execute("PRAGMA foreign_key_check").fetchall()]
    return integrity[:20], foreign[:100]


def applied_migrations(conn: sqlite3.Connection) -> list[dict]:
    out = []
    for number, (name, applied_at) in enumerate(conn.execute(
            "SELECT name, applied_at FROM schema_migrations ORDER BY name"), start=1):
        try:  # "YYYY-MM-DD HH:MM:SS" in UTC on both engines
            moment = datetime.strptime(applied_at, "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc)
            applied_at = iso(moment.timestamp())
        except (TypeError, ValueError):
            pass
        out.append({"version": number, "name": name, "applied_at": applied_at})
    return out


def row_counts(conn: sqlite3.Connection) -> dict:
    # Table names come from the catalogue itself; quoted as identifiers.
    return {name: {"row_count": conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0]}
            for name in _tables(conn)}
