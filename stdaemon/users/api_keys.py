"""API keys: ``st_…`` tokens stored only as SHA-256 hashes.

The first start creates an ``admin`` user and an admin key, and writes the key
once to ``<state>/config/cloud/admin.key`` (mode 0600); only the path is
logged.  Keys may expire and can be revoked.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Optional

KEY_PREFIX = "st_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a user acting with a role (from a key or a session)."""

    user_id: int
    username: str
    role: str
    key_id: Optional[int] = None
    via: str = "api_key"      # api_key | session

    @property
    def actor(self) -> str:
        return self.username


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(conn: sqlite3.Connection, user_id: int, name: str, role: str, now: float,
               expires_at: Optional[float] = None) -> tuple[int, str]:
    """Insert a new key; return ``(id, key)``. The key is never stored."""
    key = new_key()
    cur = conn.execute(
        "INSERT INTO api_keys (user_id, name, key_hash, prefix, role, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (user_id, name, hash_key(key), key[:7], role, now, expires_at))
    return cur.lastrowid, key


def lookup(conn: sqlite3.Connection, key: str, now: float) -> Optional[Principal]:
    """The principal for a presented key, or None (unknown, revoked, expired,
    disabled user).  Lookup is by hash, so no timing oracle on key bytes."""
    return lookup_with_expiry(conn, key, now)[0]


def lookup_with_expiry(conn: sqlite3.Connection, key: str,
                       now: float) -> tuple[Optional[Principal], Optional[float]]:
    """``lookup`` and the key's ``expires_at`` (for a cache that must stop at the expiry)."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None, None
    row = conn.execute(
        "SELECT k.id, k.role, k.expires_at, k.revoked_at, u.id AS user_id, u.username,"
        " u.disabled FROM api_keys k JOIN users u ON u.id = k.user_id WHERE k.key_hash = ?",
        (hash_key(key),)).fetchone()
    if row is None or row["revoked_at"] is not None or row["disabled"]:
        return None, None
    if row["expires_at"] is not None and row["expires_at"] <= now:
        return None, None
    return Principal(user_id=row["user_id"], username=row["username"], role=row["role"],
                     key_id=row["id"]), row["expires_at"]


def change_counters(conn: sqlite3.Connection) -> dict:
    """``{name: value}`` of the counters triggers bump (migration ``0045_change_counters``):
    ``auth`` on every change to keys or users that can withdraw rights, ``jobs`` on every job row
    change."""
    return {name: int(value) for name, value in conn.execute("SELECT name, value FROM change_counters")}


def auth_generation(conn: sqlite3.Connection) -> int:
    return change_counters(conn).get("auth", 0)


def ensure_admin_key(conn: sqlite3.Connection, key_path: str, now: float) -> Optional[str]:
    """On first start: create the admin user and key and write the key file.

    Returns the path written, or None when an admin already exists.  Runs in
    the writer transaction; the file is created with O_EXCL and mode 0600
    before the transaction commits, so a crash cannot leave a key nobody
    knows."""
    has_admin = conn.execute(
        "SELECT 1 FROM api_keys WHERE role = 'admin' AND revoked_at IS NULL LIMIT 1").fetchone()
    if has_admin:
        return None
    row = conn.execute("SELECT id FROM users WHERE username = 'admin'").fetchone()
    if row is None:
        user_id = conn.execute(
            "INSERT INTO users (username, role, created_at) VALUES ('admin', 'admin', ?)",
            (now,)).lastrowid
    else:
        user_id = row["id"]
    _, key = create_key(conn, user_id, "initial admin key", "admin", now)
    directory = os.path.dirname(key_path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    if os.path.exists(key_path):
        os.replace(key_path, key_path + ".old")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return key_path
