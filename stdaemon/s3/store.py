"""The SQL of the S3 capability: the ``upload_credentials`` table (the only place it is touched).

Functions take ``conn`` first and run on the database's threads (``db.run_read``/``db.run_write``),
or inside a caller's transaction (a job reaching a terminal status revokes its credentials in the
same transaction as the status change).
"""

from __future__ import annotations

import sqlite3
from typing import Optional


def insert(conn: sqlite3.Connection, access_key_id: str, job_id: str, bucket: str, prefix: str,
           secret_enc: bytes, digest: str, now: float, expires_at: float) -> None:
    conn.execute(
        "INSERT INTO upload_credentials (access_key_id, job_id, bucket, prefix, secret_enc, secret_hash,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (access_key_id, job_id, bucket, prefix, secret_enc, digest, now, expires_at),
    )


def revoke(conn: sqlite3.Connection, job_id: str, now: float) -> int:
    return conn.execute(
        "UPDATE upload_credentials SET revoked_at = ? WHERE job_id = ? AND revoked_at IS NULL", (now, job_id)
    ).rowcount


def expire(conn: sqlite3.Connection, now: float) -> list[str]:
    rows = conn.execute(
        "SELECT access_key_id FROM upload_credentials WHERE revoked_at IS NULL AND expires_at <= ?", (now,)
    ).fetchall()
    conn.execute("UPDATE upload_credentials SET revoked_at = ? WHERE revoked_at IS NULL AND expires_at <= ?",
                 (now, now))
    return [row[0] for row in rows]


def find(conn: sqlite3.Connection, column: str, value: str) -> Optional[tuple]:
    assert column in ("access_key_id", "secret_hash")
    row = conn.execute(
        "SELECT c.access_key_id, c.job_id, c.bucket, c.prefix, c.secret_enc, c.expires_at, c.revoked_at,"
        " j.status FROM upload_credentials c LEFT JOIN jobs j ON j.job_id = c.job_id"
        f" WHERE c.{column} = ?",
        (value,),
    ).fetchone()
    return tuple(row) if row is not None else None


def job_metadata(conn: sqlite3.Connection, job_id: str) -> Optional[tuple]:
    row = conn.execute("SELECT metadata FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return tuple(row) if row is not None else None


