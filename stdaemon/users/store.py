"""Users, passwords and browser sessions (S12).

API keys are created, looked up and revoked here too (making a key and its
hash is :mod:`stdaemon.users.api_keys`); :func:`change_counters` reads the
counters triggers bump when keys, users or jobs change.

Pure SQL helpers take ``conn`` first so they run through the Database API
(``run_read``/``run_write``) or on a plain connection in tests.

- Passwords are hashed with Argon2id (argon2-cffi).  Hashing and verifying
  are CPU- and memory-hard: callers run :func:`hash_password` and
  :func:`verify_password` on a thread pool, never on the reactor thread.
- Session tokens and CSRF tokens are random; only their SHA-256 hashes are
  stored, so a copy of the database does not hand out live sessions.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any, Optional

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from stdaemon.store import settings
from stdaemon.timestamps import iso
from stdaemon.users.api_keys import KEY_PREFIX, Principal, hash_key, new_key
from stdaemon.invalid import InvalidValue

ROLES = ("viewer", "operator", "admin")
ROLE_RANK = {role: rank for rank, role in enumerate(ROLES)}

USERNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]{0,63}$")
EMAIL_RE = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}$")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024

# Argon2id with argon2-cffi's RFC 9106 "low memory" profile: 64 MiB, 3 passes.
_hasher = PasswordHasher()
# Verified against when the user does not exist, so an unknown username costs
# the same time as a wrong password (no user enumeration by timing).
_DUMMY_HASH: Optional[str] = None


def hash_password(password: str) -> str:
    """Argon2id hash (blocking: call from a thread)."""
    return _hasher.hash(password)


def verify_password(password_hash: Optional[str], password: str) -> bool:
    """Constant-work check (blocking: call from a thread).  A missing hash
    still costs one verification."""
    global _DUMMY_HASH
    if not password_hash:
        if _DUMMY_HASH is None:
            _DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))
        password_hash = _DUMMY_HASH
        password = password + "\x00never"
    try:
        return _hasher.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


# -- validation (pure) ---------------------------------------------------------

def check_username(value: Any) -> str:
    if not isinstance(value, str) or not USERNAME_RE.match(value):
        raise InvalidValue("username", "must be 1-64 letters, digits, '.', '_' or '-', "
                                    "starting with a letter or digit", show_path=False)
    return value


def check_email(value: Any) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not EMAIL_RE.match(value) or len(value) > 320:
        raise InvalidValue("email", "must be an email address", show_path=False)
    return value.lower()


def check_password(value: Any) -> str:
    if not isinstance(value, str) or not (MIN_PASSWORD <= len(value) <= MAX_PASSWORD):
        raise InvalidValue("password", f"must be a string of {MIN_PASSWORD} to {MAX_PASSWORD} characters", show_path=False)
    return value


def check_role(value: Any, field: str = "role") -> str:
    if value not in ROLES:
        raise InvalidValue(field, f"must be one of {', '.join(ROLES)}", show_path=False)
    return value


def role_at_most(role: str, ceiling: str) -> bool:
    return ROLE_RANK.get(role, 99) <= ROLE_RANK.get(ceiling, -1)


# -- users ---------------------------------------------------------------------

def user_dict(row: sqlite3.Row) -> dict:
    """The API shape of a user.  Besides stdaemon's own fields it carries the
    ones SimpleTuner's CLI reads (``email`` always a string, ``is_admin``,
    ``is_active``, ``display_name``, ``email_verified``, ``auth_provider``);
    ``created_at`` is ISO 8601 UTC (S18)."""
    keys = row.keys()
    display_name = row["display_name"] if "display_name" in keys else None
    return {
        "id": row["id"],
        "username": row["username"],
        "email": row["email"] or "",
        "display_name": display_name,
        "role": row["role"],
        "is_admin": row["role"] == "admin",
        "is_active": not row["disabled"],
        "email_verified": False,
        "auth_provider": "local",
        "created_at": iso(row["created_at"]),
        "disabled": bool(row["disabled"]),
        "has_password": bool(row["password_hash"]),
    }


_USER_COLUMNS = "id, username, email, password_hash, role, created_at, disabled, display_name"


def list_users(conn: sqlite3.Connection) -> list[dict]:
    rows = conn.execute(f"SELECT {_USER_COLUMNS} FROM users ORDER BY id").fetchall()
    return [user_dict(r) for r in rows]


def ids_by_username(conn: sqlite3.Connection, names: set) -> dict:
    """``{username: id}`` of the users among ``names`` (audit entries name their actor)."""
    if not names:
        return {}
    marks = ", ".join("?" for _ in names)
    return {row[1]: row[0] for row in conn.execute(
        f"SELECT id, username FROM users WHERE username IN ({marks})", tuple(names))}


def username_of(conn: sqlite3.Connection, user_id: int) -> Optional[str]:
    row = conn.execute("SELECT username FROM users WHERE id = ?", (user_id,)).fetchone()
    return row[0] if row else None


def get_user(conn: sqlite3.Connection, user_id: int) -> Optional[dict]:
    row = conn.execute(f"SELECT {_USER_COLUMNS} FROM users WHERE id = ?", (user_id,)).fetchone()
    return user_dict(row) if row else None


def find_login(conn: sqlite3.Connection, login: str) -> Optional[sqlite3.Row]:
    """The user row (with its hash) for a username or email."""
    return conn.execute(
        f"SELECT {_USER_COLUMNS} FROM users WHERE username = ? OR email = ?",
        (login, login.lower())).fetchone()


def create_user(conn: sqlite3.Connection, username: str, email: Optional[str],
                password_hash: Optional[str], role: str, now: float,
                display_name: Optional[str] = None) -> dict:
    taken = conn.execute("SELECT username, email FROM users WHERE username = ? OR"
                         " (email IS NOT NULL AND email = ?)", (username, email)).fetchone()
    if taken is not None:
        field = "username" if taken["username"] == username else "email"
        raise InvalidValue(field, "is already taken", show_path=False)
    user_id = conn.execute(
        "INSERT INTO users (username, email, password_hash, role, created_at, display_name)"
        " VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
        (username, email, password_hash, role, now, display_name)).fetchone()[0]
    return get_user(conn, user_id)


def _active_admins(conn: sqlite3.Connection, excluding: int) -> int:
    return conn.execute("SELECT count(*) FROM users WHERE role = 'admin' AND disabled = 0"
                        " AND id != ?", (excluding,)).fetchone()[0]


def update_user(conn: sqlite3.Connection, user_id: int, changes: dict) -> Optional[dict]:
    """Apply validated ``changes`` (username, email, password_hash, role,
    disabled).  Refuses to leave the daemon without an enabled admin.  A role
    lowered below a key's role lowers the key too; disabling or a new
    password ends the user's sessions."""
    current = get_user(conn, user_id)
    if current is None:
        return None
    demoting = "role" in changes and changes["role"] != "admin"
    disabling = bool(changes.get("disabled"))
    if current["role"] == "admin" and (demoting or disabling) and _active_admins(conn, user_id) == 0:
        raise InvalidValue("role" if demoting else "disabled", "the last enabled admin cannot be "
                                                            "demoted or disabled", show_path=False)
    if "username" in changes or "email" in changes:
        taken = conn.execute(
            "SELECT username FROM users WHERE id != ? AND (username = ? OR (email IS NOT NULL AND email = ?))",
            (user_id, changes.get("username", current["username"]),
             changes.get("email", current["email"]))).fetchone()
        if taken is not None:
            field = "username" if taken["username"] == changes.get("username") else "email"
            raise InvalidValue(field, "is already taken", show_path=False)
    columns = {k: v for k, v in changes.items()
               if k in ("username", "email", "password_hash", "role", "disabled", "display_name")}
    if columns:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        conn.execute(f"UPDATE users SET {assignments} WHERE id = ?", (*columns.values(), user_id))
    if "role" in changes:
        ceiling = ROLE_RANK[changes["role"]]
        for role, rank in ROLE_RANK.items():
            if rank > ceiling:
                conn.execute("UPDATE api_keys SET role = ? WHERE user_id = ? AND role = ?",
                             (changes["role"], user_id, role))
    if disabling or "password_hash" in changes or "role" in changes:
        conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
    return get_user(conn, user_id)


def delete_user(conn: sqlite3.Connection, user_id: int, now: float) -> bool:
    current = get_user(conn, user_id)
    if current is None:
        return False
    if current["role"] == "admin" and _active_admins(conn, user_id) == 0:
        raise InvalidValue("id", "the last enabled admin cannot be deleted", show_path=False)
    conn.execute("DELETE FROM sessions WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM api_keys WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM quotas WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM users WHERE id = ?", (user_id,))
    return True


# -- sessions ------------------------------------------------------------------

@dataclass(frozen=True)
class NewSession:
    token: str
    csrf: str
    expires_at: float


def create_session(conn: sqlite3.Connection, user_id: int, now: float, ttl: float,
                   ip: Optional[str] = None, user_agent: Optional[str] = None,
                   key_id: Optional[int] = None) -> NewSession:
    """A new session; ``key_id`` when it was opened with an API key (the key's
    role is then its ceiling and revoking the key ends it)."""
    token = secrets.token_urlsafe(32)
    csrf = secrets.token_urlsafe(32)
    expires_at = now + ttl
    conn.execute(
        "INSERT INTO sessions (user_id, token_hash, csrf_hash, created_at, expires_at, ip, user_agent,"
        " key_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (user_id, token_hash(token), token_hash(csrf), now, expires_at, ip,
         (user_agent or "")[:256] or None, key_id))
    return NewSession(token, csrf, expires_at)


@dataclass(frozen=True)
class SessionInfo:
    principal: Principal
    csrf_hash: str
    expires_at: float


def lookup_session(conn: sqlite3.Connection, token: str, now: float) -> Optional[SessionInfo]:
    if not token or len(token) > 200:
        return None
    row = conn.execute(
        "SELECT s.id, s.csrf_hash, s.expires_at, s.key_id, u.id AS user_id, u.username, u.role,"
        " u.disabled, k.role AS key_role, k.revoked_at AS key_revoked_at,"
        " k.expires_at AS key_expires_at"
        " FROM sessions s JOIN users u ON u.id = s.user_id"
        " LEFT JOIN api_keys k ON k.id = s.key_id WHERE s.token_hash = ?",
        (token_hash(token),)).fetchone()
    if row is None or row["disabled"] or row["expires_at"] <= now:
        return None
    role = row["role"]
    if row["key_id"] is not None:  # opened with an API key: that key must still be valid
        if row["key_role"] is None or row["key_revoked_at"] is not None or \
                (row["key_expires_at"] is not None and row["key_expires_at"] <= now):
            return None
        if ROLE_RANK.get(row["key_role"], -1) < ROLE_RANK.get(role, -1):
            role = row["key_role"]
    principal = Principal(user_id=row["user_id"], username=row["username"], role=role,
                          key_id=None, via="session")
    return SessionInfo(principal, row["csrf_hash"], row["expires_at"])


def delete_session(conn: sqlite3.Connection, token: str) -> int:
    return conn.execute("DELETE FROM sessions WHERE token_hash = ?", (token_hash(token),)).rowcount


def sweep_sessions(conn: sqlite3.Connection, now: float) -> int:
    return conn.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount


def count_sessions(conn: sqlite3.Connection) -> int:
    return conn.execute("SELECT count(*) FROM sessions").fetchone()[0]


# -- API keys ------------------------------------------------------------------

def create_key(conn: sqlite3.Connection, user_id: int, name: str, role: str, now: float,
               expires_at: Optional[float] = None) -> tuple[int, str]:
    """Insert a new key; return ``(id, key)``. The key is never stored."""
    key = new_key()
    key_id = conn.execute(
        "INSERT INTO api_keys (user_id, name, key_hash, prefix, role, created_at, expires_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (user_id, name, hash_key(key), key[:7], role, now, expires_at)).fetchone()[0]
    return key_id, key


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
            "INSERT INTO users (username, role, created_at) VALUES ('admin', 'admin', ?) RETURNING id",
            (now,)).fetchone()[0]
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



def key_dict(row: sqlite3.Row) -> dict:
    return {
        "id": row["id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "role": row["role"],
        "user_id": row["user_id"],
        "username": row["username"],
        "created_at": iso(row["created_at"]),
        "expires_at": iso(row["expires_at"]),
        "revoked_at": iso(row["revoked_at"]),
    }


def list_keys(conn: sqlite3.Connection, user_id: Optional[int] = None) -> list[dict]:
    sql = ("SELECT k.id, k.name, k.prefix, k.role, k.user_id, u.username, k.created_at,"
           " k.expires_at, k.revoked_at FROM api_keys k JOIN users u ON u.id = k.user_id")
    args: tuple = ()
    if user_id is not None:
        sql += " WHERE k.user_id = ?"
        args = (user_id,)
    return [key_dict(r) for r in conn.execute(sql + " ORDER BY k.id", args).fetchall()]


def get_key(conn: sqlite3.Connection, key_id: int) -> Optional[dict]:
    row = conn.execute(
        "SELECT k.id, k.name, k.prefix, k.role, k.user_id, u.username, k.created_at,"
        " k.expires_at, k.revoked_at FROM api_keys k JOIN users u ON u.id = k.user_id"
        " WHERE k.id = ?", (key_id,)).fetchone()
    return key_dict(row) if row else None


def revoke_key(conn: sqlite3.Connection, key_id: int, now: float) -> bool:
    return conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                        (now, key_id)).rowcount == 1


# -- first sign-in: the one-time setup link --------------------------------------

SETUP_NAMESPACE = "auth"
SETUP_KEY = "setup_token"


def issue_setup_token(conn: sqlite3.Connection, now: float, ttl: float) -> Optional[tuple[str, str]]:
    """``(token, username)`` of a new one-time link that sets the first admin's
    password, or None once any user has a password (setup is over).  Only the
    token's SHA-256 is stored; a new link replaces an older one."""
    if conn.execute("SELECT 1 FROM users WHERE password_hash IS NOT NULL LIMIT 1").fetchone():
        settings.delete_key(conn, SETUP_NAMESPACE, SETUP_KEY)
        return None
    admin = conn.execute("SELECT id, username FROM users WHERE role = 'admin' AND disabled = 0"
                         " ORDER BY id LIMIT 1").fetchone()
    if admin is None:
        return None
    token = secrets.token_urlsafe(32)
    settings.write_key(conn, SETUP_NAMESPACE, SETUP_KEY,
                {"sha256": token_hash(token), "expires_at": now + ttl, "user_id": admin["id"]}, now)
    return token, admin["username"]


def setup_token_user(conn: sqlite3.Connection, token: str, now: float) -> Optional[sqlite3.Row]:
    """The user a valid, unexpired setup token is for (no change)."""
    record = settings.read_key(conn, SETUP_NAMESPACE, SETUP_KEY)
    if not isinstance(record, dict) or not isinstance(token, str) or not token or len(token) > 200:
        return None
    if not hmac.compare_digest(str(record.get("sha256", "")), token_hash(token)):
        return None
    if float(record.get("expires_at", 0)) <= now:
        return None
    return conn.execute("SELECT * FROM users WHERE id = ? AND disabled = 0",
                        (record.get("user_id"),)).fetchone()


def consume_setup_token(conn: sqlite3.Connection, token: str, password_hash: str,
                        now: float) -> Optional[sqlite3.Row]:
    """Writer transaction: check the token again, spend it (single use) and set
    the password.  Returns the user row, or None when the token is not valid."""
    user = setup_token_user(conn, token, now)
    if user is None:
        return None
    settings.delete_key(conn, SETUP_NAMESPACE, SETUP_KEY)
    conn.execute("UPDATE users SET password_hash = ? WHERE id = ?", (password_hash, user["id"]))
    return conn.execute("SELECT * FROM users WHERE id = ?", (user["id"],)).fetchone()
