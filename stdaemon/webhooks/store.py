"""The ``webhook_deliveries`` table (S6): SQL helpers taking ``conn`` first, run through
``db.run_read``/``db.run_write`` (or inside the caller's write transaction)."""

from __future__ import annotations

import sqlite3
from typing import Optional


def find_delivery(conn: sqlite3.Connection, provider: str, webhook_id: str) -> Optional[tuple]:
    """``(outcome, job_id)`` of a recorded delivery, or None."""
    return conn.execute(
        "SELECT outcome, job_id FROM webhook_deliveries WHERE provider = ? AND webhook_id = ?",
        (provider, webhook_id)).fetchone()


def record_delivery(conn: sqlite3.Connection, provider: str, webhook_id: str, now: float,
                    job_id: str, outcome: str) -> None:
    conn.execute(
        "INSERT INTO webhook_deliveries (provider, webhook_id, received_at, job_id, outcome) "
        "VALUES (?, ?, ?, ?, ?)", (provider, webhook_id, now, job_id, outcome))


def sweep(conn: sqlite3.Connection, horizon: float) -> int:
    """Forget deliveries received before ``horizon``; how many."""
    return conn.execute("DELETE FROM webhook_deliveries WHERE received_at < ?", (horizon,)).rowcount


def deliveries(conn: sqlite3.Connection, provider: Optional[str], limit: int) -> list[tuple]:
    """``(provider, webhook_id, received_at, job_id, outcome)`` rows, newest first."""
    sql = "SELECT provider, webhook_id, received_at, job_id, outcome FROM webhook_deliveries"
    args: tuple = ()
    if provider is not None:
        sql += " WHERE provider = ?"
        args = (provider,)
    return conn.execute(sql + " ORDER BY received_at DESC LIMIT ?", (*args, limit)).fetchall()


def last_delivery(conn: sqlite3.Connection, provider: str) -> Optional[float]:
    return conn.execute("SELECT max(received_at) FROM webhook_deliveries WHERE provider = ?",
                        (provider,)).fetchone()[0]
