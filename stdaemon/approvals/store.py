"""SQL for approval rules, approval requests and quotas (S4).

Pure helpers taking ``conn`` first (``run_read``/``run_write`` or a plain
connection in tests).  State changes of a request are guarded
(``WHERE status = 'pending'``) so a request is decided exactly once even
when an approval races the expiry timer.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any, Optional

from stdaemon.approvals.rules import Quota, Rule
from stdaemon.jobs.store import page
from stdaemon.timestamps import iso

REQUEST_STATUSES = ("pending", "approved", "rejected", "expired")


# -- rules ----------------------------------------------------------------------

def rule_dict(row: sqlite3.Row) -> dict:
    """A rule as the API shows it; ``type`` and ``enabled`` are what SimpleTuner's
    ``jobs approval rules`` prints."""
    return {"id": row["id"], "name": row["name"], "condition": row["condition"],
            "value": json.loads(row["value_json"]), "type": row["condition"], "enabled": True,
            "created_at": iso(row["created_at"]), "created_by": row["created_by"]}


def list_rules(conn: sqlite3.Connection) -> list[dict]:
    return [rule_dict(r) for r in conn.execute("SELECT * FROM approval_rules ORDER BY id")]


def rules(conn: sqlite3.Connection) -> list[Rule]:
    return [Rule(r["id"], r["name"], r["condition"], r["value"]) for r in list_rules(conn)]


def add_rule(conn: sqlite3.Connection, name: str, condition: str, value: Any, now: float,
             created_by: str) -> dict:
    rule_id = conn.execute(
        "INSERT INTO approval_rules (name, condition, value_json, created_at, created_by)"
        " VALUES (?, ?, ?, ?, ?) RETURNING id",
        (name, condition, json.dumps(value), now, created_by)).fetchone()[0]
    return rule_dict(conn.execute("SELECT * FROM approval_rules WHERE id = ?", (rule_id,)).fetchone())


def delete_rule(conn: sqlite3.Connection, rule_id: int) -> bool:
    return conn.execute("DELETE FROM approval_rules WHERE id = ?", (rule_id,)).rowcount == 1


# -- requests -------------------------------------------------------------------

def request_dict(row: sqlite3.Row) -> dict:
    """A request as the API shows it (times ISO 8601; ``requested_at`` and
    ``config_name`` are what SimpleTuner's ``jobs approval list`` prints)."""
    details = json.loads(row["details_json"])
    return {
        "id": row["id"], "job_id": row["job_id"], "provider": row["provider"],
        "user_id": row["user_id"], "username": row["username"], "rule_id": row["rule_id"],
        "rule_name": row["rule_name"], "reason": row["reason"], "estimate_usd": row["estimate_usd"],
        "status": row["status"], "created_at": iso(row["created_at"]),
        "requested_at": iso(row["created_at"]), "expires_at": iso(row["expires_at"]),
        "decided_at": iso(row["decided_at"]), "decided_by": row["decided_by"],
        "decision_reason": row["decision_reason"], "details": details,
        "config_name": details.get("config_name") if isinstance(details, dict) else None,
    }


def create_request(conn: sqlite3.Connection, job_id: str, provider: str, user_id: Optional[int],
                   username: Optional[str], rule_id: Optional[int], rule_name: Optional[str],
                   reason: str, estimate: float, now: float, expires_at: float,
                   details: dict) -> dict:
    request_id = conn.execute(
        "INSERT INTO approval_requests (job_id, provider, user_id, username, rule_id, rule_name,"
        " reason, estimate_usd, status, created_at, expires_at, details_json)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?) RETURNING id",
        (job_id, provider, user_id, username, rule_id, rule_name, reason, estimate, now, expires_at,
         json.dumps(details, default=str))).fetchone()[0]
    return get_request(conn, request_id)


def get_request(conn: sqlite3.Connection, request_id: int) -> Optional[dict]:
    row = conn.execute("SELECT * FROM approval_requests WHERE id = ?", (request_id,)).fetchone()
    return request_dict(row) if row else None


def list_requests(conn: sqlite3.Connection, status: Optional[str] = None,
                  user_id: Optional[int] = None, limit: int = 100, offset: int = 0) -> tuple[list, int]:
    rows, total = page(conn, "approval_requests", "id DESC", limit, offset, status=status,
                       user_id=user_id)
    return [request_dict(r) for r in rows], total


def decide(conn: sqlite3.Connection, request_id: int, status: str, decided_by: str,
           reason: Optional[str], now: float) -> Optional[dict]:
    """pending → status; None when the request was not pending (already decided)."""
    changed = conn.execute(
        "UPDATE approval_requests SET status = ?, decided_at = ?, decided_by = ?, decision_reason = ?"
        " WHERE id = ? AND status = 'pending'", (status, now, decided_by, reason, request_id)).rowcount
    return get_request(conn, request_id) if changed else None


def due_for_expiry(conn: sqlite3.Connection, now: float, limit: int = 500) -> list[int]:
    return [r[0] for r in conn.execute(
        "SELECT id FROM approval_requests WHERE status = 'pending' AND expires_at <= ?"
        " ORDER BY expires_at LIMIT ?", (now, limit))]


def counts_by_status(conn: sqlite3.Connection) -> dict[str, int]:
    counts = {status: 0 for status in REQUEST_STATUSES}
    for row in conn.execute("SELECT status, count(*) FROM approval_requests GROUP BY status"):
        counts[row[0]] = row[1]
    return counts


# -- quotas ---------------------------------------------------------------------

def quota_dict(row: sqlite3.Row) -> dict:
    """A quota as the API shows it (``limit_value`` is SimpleTuner's name for ``limit``)."""
    return {"id": row["id"], "quota_type": row["quota_type"], "limit": row["limit_value"],
            "limit_value": row["limit_value"], "action": row["action"], "user_id": row["user_id"],
            "role": row["role"], "is_global": row["user_id"] is None and row["role"] is None,
            "created_at": iso(row["created_at"]), "created_by": row["created_by"]}


def list_quotas(conn: sqlite3.Connection) -> list[dict]:
    return [quota_dict(r) for r in conn.execute("SELECT * FROM quotas ORDER BY id")]


def quotas(conn: sqlite3.Connection) -> list[Quota]:
    return [Quota(q["id"], q["quota_type"], q["limit"], q["action"], q["user_id"], q["role"])
            for q in list_quotas(conn)]


def add_quota(conn: sqlite3.Connection, quota: dict, now: float, created_by: str) -> dict:
    if quota["user_id"] is not None and conn.execute(
            "SELECT 1 FROM users WHERE id = ?", (quota["user_id"],)).fetchone() is None:
        raise LookupError("user_id")
    quota_id = conn.execute(
        "INSERT INTO quotas (quota_type, limit_value, action, user_id, role, created_at, created_by)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING id",
        (quota["quota_type"], quota["limit"], quota["action"], quota["user_id"], quota["role"], now,
         created_by)).fetchone()[0]
    return quota_dict(conn.execute("SELECT * FROM quotas WHERE id = ?", (quota_id,)).fetchone())


def delete_quota(conn: sqlite3.Connection, quota_id: int) -> bool:
    return conn.execute("DELETE FROM quotas WHERE id = ?", (quota_id,)).rowcount == 1
