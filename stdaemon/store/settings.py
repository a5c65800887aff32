"""The ``settings`` table: runtime settings saved through the API, as JSON values.

One row per ``(namespace, key)``; namespaces in use: ``provider:<name>``
(provider settings), ``metrics`` (metrics settings), ``auth`` (the first
sign-in setup token), ``key_fingerprints`` (:mod:`stdaemon.store.key_fingerprints`).  This module is the only place the table is touched.

Functions take the connection first and run inside the caller's transaction
(``db.run_read(read_namespace, ...)``, or from within a ``db.run_write``
function): writes commit or roll back with the rest of the caller's work.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Mapping


def read_namespace(conn: sqlite3.Connection, namespace: str) -> dict[str, Any]:
    """Every ``key: value`` of ``namespace``; a row whose JSON cannot be decoded is skipped."""
    out: dict[str, Any] = {}
    for key, raw in conn.execute("SELECT key, value_json FROM settings WHERE namespace = ?",
                                 (namespace,)):
        try:
            out[key] = json.loads(raw)
        except ValueError:
            continue
    return out


def read_key(conn: sqlite3.Connection, namespace: str, key: str) -> Any:
    """The value of ``namespace``/``key``, or None when it is not set."""
    row = conn.execute("SELECT value_json FROM settings WHERE namespace = ? AND key = ?",
                       (namespace, key)).fetchone()
    return None if row is None else json.loads(row[0])


def write_key(conn: sqlite3.Connection, namespace: str, key: str, value: Any, now: float) -> None:
    """Set ``namespace``/``key`` to ``value`` (stored as JSON), replacing an older value."""
    conn.execute(
        "INSERT INTO settings (namespace, key, value_json, updated_at) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(namespace, key) DO UPDATE SET value_json = excluded.value_json, "
        "updated_at = excluded.updated_at",
        (namespace, key, json.dumps(value), now))


def delete_key(conn: sqlite3.Connection, namespace: str, key: str) -> None:
    conn.execute("DELETE FROM settings WHERE namespace = ? AND key = ?", (namespace, key))


def write_changes(conn: sqlite3.Connection, namespace: str, changes: Mapping[str, Any],
                  now: float) -> None:
    """Apply a partial update: a ``None`` value deletes its key, any other value is written."""
    for key, value in changes.items():
        if value is None:
            delete_key(conn, namespace, key)
        else:
            write_key(conn, namespace, key, value, now)
