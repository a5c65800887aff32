"""The audit log's SQL: the only place ``audit_log`` and ``audit_anchor`` are touched.

Functions take ``conn`` first and run through ``db.run_read``/``db.run_write`` (or a
tool's own transaction); hashing and verification themselves are in :mod:`chain`.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Iterable, Optional, Sequence

from stdaemon.store.engines import is_postgres, lock_audit_chain
from stdaemon.audit.chain import (
    COLUMNS,
    GENESIS,
    anchor_hash,
    anchor_ok,
    check_rows,
    new_row,
    row_to_dict,
)

# Append-only tables that a restore must not roll back: the backup engine carries their
# live rows into the restored database (the composition root hands it this list).
PRESERVED_TABLES = ("audit_log", "audit_anchor")


def chain_head(conn: sqlite3.Connection) -> tuple[int, str]:
    """``(last id, last hash)`` the next entry links to."""
    row = conn.execute("SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    if row is not None:
        return int(row[0]), row[1]
    anchor = conn.execute("SELECT last_id, last_hash FROM audit_anchor WHERE id = 1").fetchone()
    if anchor is not None:
        return int(anchor[0]), anchor[1]
    return 0, GENESIS


def high_water(conn: sqlite3.Connection) -> int:
    """The highest id the chain ever gave (SQLite's AUTOINCREMENT sequence; on PostgreSQL the
    ``audit_sequence`` row written with each append), 0 before the first."""
    if is_postgres(conn):
        row = conn.execute("SELECT seq FROM audit_sequence WHERE id = 1").fetchone()
    else:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
    return int(row[0]) if row else 0


def append_entry(conn: sqlite3.Connection, key: bytes, now: float, event_type: str,
                 actor: Any = "system", ip: Any = None, target: Any = None, action: Any = None,
                 details: Any = None) -> dict:
    """Append one entry inside the caller's write transaction; returns the row.

    Must run on the writer (inside ``BEGIN IMMEDIATE``) so that reading the
    chain head and inserting are one step; on PostgreSQL it first takes the
    chain's advisory lock, so other instances' appenders wait their turn."""
    if not event_type or not isinstance(event_type, str):
        raise ValueError("audit event_type must be a non-empty string")
    lock_audit_chain(conn)
    last_id, previous = chain_head(conn)
    next_id = max(last_id, high_water(conn)) + 1
    row = new_row(key, next_id, previous, now, event_type, actor, ip, target, action, details)
    conn.execute(
        f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        tuple(row[c] for c in COLUMNS),
    )
    if is_postgres(conn):
        conn.execute("UPDATE audit_sequence SET seq = ? WHERE id = 1", (next_id,))
    return row


def append_aggregates(conn: sqlite3.Connection, key: bytes, aggregates: Iterable[dict],
                      now: float) -> list[dict]:
    """One ``aggregate`` entry per closed sampling window (see :mod:`sampler`)."""
    rows = []
    for agg in aggregates:
        rows.append(append_entry(
            conn, key, now, agg["event_type"], "system", agg["ip"] or None,
            agg["sample"].get("target") if agg.get("sample") else None, "aggregate",
            {"suppressed": agg["suppressed"], "window_start": agg["window_start"],
             "window_end": agg["window_end"], "reasons": agg["reasons"]},
        ))
    return rows


def newest_entry(conn: sqlite3.Connection) -> Optional[dict]:
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    return dict(row) if row is not None else None


def query_entries(conn: sqlite3.Connection, *, event_type: Optional[str] = None,
                  actor: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 100, offset: int = 0,
                  target: Optional[str] = None, event_types: Optional[Sequence[str]] = None,
                  actor_or_target: Optional[tuple[str, str]] = None) -> dict:
    """Newest first, with the real number of matching entries.  ``target``
    matches exactly; ``event_types`` is a set of types (any of them);
    ``actor_or_target`` = (actor, target) matches entries by that actor or
    about that target (a user's own trail)."""
    where, args = [], []
    if event_type:
        where.append("event_type = ?")
        args.append(event_type)
    if event_types is not None:
        where.append(f"event_type IN ({', '.join('?' for _ in event_types) or 'NULL'})")
        args.extend(event_types)
    if actor:
        where.append("actor = ?")
        args.append(actor)
    if target:
        where.append("target = ?")
        args.append(target)
    if actor_or_target is not None:
        where.append("(actor = ? OR target = ?)")
        args.extend(actor_or_target)
    if since is not None:
        where.append("timestamp >= ?")
        args.append(float(since))
    if until is not None:
        where.append("timestamp <= ?")
        args.append(float(until))
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute(f"SELECT count(*) FROM audit_log{clause}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM audit_log{clause} ORDER BY id DESC LIMIT ? OFFSET ?",
        [*args, int(limit), int(offset)],
    ).fetchall()
    return {"entries": [row_to_dict(r) for r in rows], "total": int(total),
            "limit": int(limit), "offset": int(offset)}


def summary(conn: sqlite3.Connection) -> dict:
    """Counts by event type and the first/last entry (for ``/api/audit/stats``)."""
    by_type = {row[0]: row[1] for row in conn.execute(
        "SELECT event_type, count(*) FROM audit_log GROUP BY event_type")}
    first, last, low, high = conn.execute(
        "SELECT min(timestamp), max(timestamp), min(id), max(id) FROM audit_log").fetchone()
    return {"by_type": by_type, "first_timestamp": first, "last_timestamp": last,
            "first_id": low, "last_id": high}


def seen_event_types(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT DISTINCT event_type FROM audit_log")]


def verify_start(conn: sqlite3.Connection, key: bytes) -> dict:
    """Where the chain starts: the anchor (checked) or genesis, and the head."""
    anchor = conn.execute(
        "SELECT last_id, last_hash, pruned_total, anchor_hash FROM audit_anchor WHERE id = 1"
    ).fetchone()
    head = conn.execute("SELECT max(id), count(*) FROM audit_log").fetchone()
    state = {"after_id": 0, "previous_hash": GENESIS, "anchor_ok": True, "anchor": None,
             "max_id": int(head[0] or 0), "count": int(head[1]), "sequence": high_water(conn)}
    if anchor is not None:
        state.update(after_id=int(anchor[0]), previous_hash=anchor[1],
                     anchor={"last_id": int(anchor[0]), "pruned_total": int(anchor[2])},
                     anchor_ok=anchor_ok(key, anchor[0], anchor[1], anchor[2], anchor[3]))
    return state


def verify_batch(conn: sqlite3.Connection, key: bytes, after_id: int, previous_hash: str,
                 upto_id: int, batch: int = 1000) -> dict:
    """Check the entries with ``after_id < id <= upto_id`` (at most ``batch``).

    Returns ``{"checked", "last_id", "previous_hash", "broken"}`` where
    ``broken`` is ``None`` or ``{"id", "reason"}`` for the first bad entry."""
    rows = conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM audit_log WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
        (after_id, upto_id, batch),
    ).fetchall()
    result = check_rows(key, rows, after_id, previous_hash)
    if result["broken"] is None:
        result["done"] = len(rows) < batch
    return result


def prune_before(conn: sqlite3.Connection, key: bytes, cutoff: float, now: float) -> int:
    """Delete the oldest entries up to the last one older than ``cutoff`` and
    move the anchor to the last deleted entry; returns how many were deleted.

    Deletes a prefix of the chain (by id), so the remaining entries still link
    to the anchor.  Runs inside the caller's write transaction."""
    row = conn.execute(
        "SELECT id, entry_hash FROM audit_log WHERE id = "
        "(SELECT max(id) FROM audit_log WHERE timestamp < ?)", (cutoff,)
    ).fetchone()
    if row is None:
        return 0
    last_id, last_hash = int(row[0]), row[1]
    deleted = conn.execute("DELETE FROM audit_log WHERE id <= ?", (last_id,)).rowcount
    previous = conn.execute("SELECT pruned_total FROM audit_anchor WHERE id = 1").fetchone()
    pruned_total = (int(previous[0]) if previous else 0) + deleted
    conn.execute(
        "INSERT INTO audit_anchor (id, last_id, last_hash, pruned_total, updated_at, anchor_hash) "
        "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET last_id = excluded.last_id, "
        "last_hash = excluded.last_hash, pruned_total = excluded.pruned_total, "
        "updated_at = excluded.updated_at, anchor_hash = excluded.anchor_hash",
        (last_id, last_hash, pruned_total, now, anchor_hash(key, last_id, last_hash, pruned_total)),
    )
    return deleted


def minute_counts(conn: sqlite3.Connection, since: float) -> tuple[int, dict[int, int]]:
    total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    # the minute of each entry: SQLite's CAST truncates, PostgreSQL's would round
    minute = "floor(timestamp / 60)" if is_postgres(conn) else "CAST(timestamp / 60 AS INTEGER)"
    buckets = {
        int(m): int(n)
        for m, n in conn.execute(
            f"SELECT {minute} AS m, count(*) FROM audit_log WHERE timestamp >= ? GROUP BY m",
            (since,)
        )
    }
    return int(total), buckets
