"""The ``jobs`` table (S4): pure SQL helpers taking ``conn`` first.

Run them with ``ctx.db.run_write`` / ``ctx.db.run_read``; the writer runs
each call inside ``BEGIN IMMEDIATE … COMMIT`` on the single writer thread, so
:func:`create_or_get` is atomic: concurrent submissions with one idempotency
key create exactly one job.

Status changes go through :func:`transition`, which applies the guards of
:mod:`stdaemon.jobs.status` (a terminal job never changes; out-of-order
updates are ignored).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from typing import Any, Iterable, Optional

from stdaemon.jobs import updates as job_updates
from stdaemon.jobs import status as st
from stdaemon.jobs.costs import period_start
from stdaemon.store.engines import is_postgres

IDEMPOTENCY_WINDOW = 24 * 3600.0

COLUMNS = ("job_id", "provider", "status", "config_name", "created_at", "started_at",
           "completed_at", "cost_usd", "hardware_type", "error_message", "output_url", "user_id",
           "metadata", "external_id", "idempotency_key")
_UPDATABLE = frozenset(COLUMNS) - {"job_id", "created_at"}
_TERMINAL_SQL = "('completed', 'failed', 'cancelled')"  # st.TERMINAL as an SQL list


def row_to_dict(row: sqlite3.Row | None) -> Optional[dict]:
    if row is None:
        return None
    job = {name: row[name] for name in COLUMNS}
    try:
        job["metadata"] = json.loads(job["metadata"] or "{}")
    except ValueError:
        job["metadata"] = {}
    return job


def _one(conn, sql: str, args: Iterable[Any]) -> Optional[dict]:
    conn.row_factory = sqlite3.Row
    return row_to_dict(conn.execute(sql, tuple(args)).fetchone())


def get_job(conn, job_id: str) -> Optional[dict]:
    return _one(conn, "SELECT * FROM jobs WHERE job_id = ?", (job_id,))


def find_by_external(conn, provider: str, external_id: str) -> Optional[dict]:
    return _one(conn, "SELECT * FROM jobs WHERE provider = ? AND external_id = ?", (provider, external_id))


def _by_idempotency_key(conn, user_id: Optional[int], key: str) -> Optional[dict]:
    return _one(conn, "SELECT * FROM jobs WHERE idempotency_key = ? AND user_id IS NOT DISTINCT FROM ?",
                (key, user_id))


def find_idempotent(conn, user_id: Optional[int], key: str, now: float) -> Optional[dict]:
    """The job ``user_id`` submitted with idempotency ``key`` within the window, or None."""
    job = _by_idempotency_key(conn, user_id, key)
    if job is not None and job["created_at"] >= now - IDEMPOTENCY_WINDOW:
        return job
    return None


def insert_job(conn, job: dict) -> dict:
    values = dict(job)
    values["metadata"] = json.dumps(values.get("metadata") or {})
    names = [c for c in COLUMNS if c in values]
    conn.execute(f"INSERT INTO jobs ({', '.join(names)}) VALUES ({', '.join('?' for _ in names)})",
                 tuple(values[c] for c in names))
    return get_job(conn, job["job_id"])


def create_or_get(conn, job: dict, now: float, window: float = IDEMPOTENCY_WINDOW) -> tuple[dict, bool]:
    """Insert ``job`` unless the same user used its idempotency key in the last ``window`` s.

    Returns ``(job, created)``.  An older job holding the key gives it up (its
    ``idempotency_key`` is cleared) so the unique index allows the new one.
    """
    key = job.get("idempotency_key")
    user_id = job.get("user_id")
    if key:
        existing = _by_idempotency_key(conn, user_id, key)
        if existing is not None:
            if existing["created_at"] >= now - window:
                return existing, False
            conn.execute("UPDATE jobs SET idempotency_key = NULL WHERE job_id = ?", (existing["job_id"],))
    return insert_job(conn, job), True


def update_job(conn, job_id: str, **fields: Any) -> Optional[dict]:
    """Update columns of a job (no status guard: use :func:`transition` for status)."""
    unknown = set(fields) - _UPDATABLE
    if unknown:
        raise ValueError(f"not job columns: {sorted(unknown)}")
    if "metadata" in fields:
        fields["metadata"] = json.dumps(fields["metadata"] or {})
    if fields:
        assignments = ", ".join(f"{name} = ?" for name in fields)
        conn.execute(f"UPDATE jobs SET {assignments} WHERE job_id = ?", (*fields.values(), job_id))
    return get_job(conn, job_id)


@dataclass
class TransitionResult:
    job: Optional[dict]
    accepted: bool
    reason: str            # see stdaemon.jobs.status.Transition; "missing" if no such job
    previous: Optional[str] = None
    before: Optional[dict] = None   # the row before the change


def apply_plan(conn, job: dict, plan: job_updates.Plan) -> TransitionResult:
    """Write a :class:`stdaemon.jobs.updates.Plan` made for ``job`` (the row
    as read in this same transaction)."""
    if not plan.accepted and not plan.changes:
        return TransitionResult(job, False, plan.reason, job["status"], job)
    updated = update_job(conn, job["job_id"], **plan.changes) if plan.changes else job
    return TransitionResult(updated, plan.accepted, plan.reason, job["status"], job)


def transition(conn, job_id: str, new_status: str, now: float, **fields: Any) -> TransitionResult:
    """Move a job to ``new_status`` if the guards allow it, with extra column updates.

    Extra ``fields`` (cost, output URL, error, external id…) are applied with an
    accepted change, and also when the status is unchanged and the job is not
    terminal (a repeated ``processing`` carrying new metrics).  Nothing changes
    on a terminal job or an out-of-order update (rules:
    :func:`stdaemon.jobs.updates.guard`).
    """
    job = get_job(conn, job_id)
    if job is None:
        return TransitionResult(None, False, "missing")
    return apply_plan(conn, job, job_updates.guard(job, new_status, now, fields))


def apply_provider_update(conn, job: dict, kind: str, payload: Any, prices: Any,
                          now: float) -> tuple[job_updates.Plan, TransitionResult]:
    """Apply a provider payload (Replicate prediction or trainer event) to
    ``job`` through the one mapping (:func:`stdaemon.jobs.updates.plan`)."""
    plan = job_updates.plan(kind, payload, job, prices, now)
    return plan, apply_plan(conn, job, plan)


def list_jobs(conn, *, status: Optional[str] = None, provider: Optional[str] = None,
              user_id: Optional[int] = None, limit: int = 50, offset: int = 0) -> tuple[list[dict], int]:
    """A page of jobs (newest first) and the real total matching the filters."""
    rows, total = page(conn, "jobs", "created_at DESC, job_id DESC", limit, offset,
                       status=status, provider=provider, user_id=user_id)
    return [row_to_dict(r) for r in rows], total


def page(conn, table: str, order: str, limit: int, offset: int, **equal: Any) -> tuple[list, int]:
    """A page of ``table``'s rows in ``order`` whose columns equal the values in ``equal`` (None or
    "" filters nothing), and the real total of matching rows."""
    given = [(name, value) for name, value in equal.items() if value is not None and value != ""]
    clause = (" WHERE " + " AND ".join(f"{name} = ?" for name, _ in given)) if given else ""
    args = [value for _, value in given]
    conn.row_factory = sqlite3.Row
    total = conn.execute(f"SELECT count(*) FROM {table}{clause}", args).fetchone()[0]
    rows = conn.execute(f"SELECT * FROM {table}{clause} ORDER BY {order} LIMIT ? OFFSET ?",
                        (*args, limit, offset)).fetchall()
    return rows, total


def active_jobs(conn, provider: str, limit: int = 100) -> list[dict]:
    """Jobs the poller should refresh: submitted to the provider and not finished."""
    conn.row_factory = sqlite3.Row
    marks = ", ".join("?" for _ in st.ACTIVE)
    rows = conn.execute(
        f"SELECT * FROM jobs WHERE provider = ? AND external_id IS NOT NULL AND status IN ({marks}) "
        "ORDER BY created_at LIMIT ?", (provider, *sorted(st.ACTIVE), limit)).fetchall()
    return [row_to_dict(r) for r in rows]


def spent_since(conn, provider: str, since: float) -> float:
    """Cost of the provider's jobs created since ``since`` (USD)."""
    row = conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM jobs WHERE provider = ? AND created_at >= ?",
                       (provider, since)).fetchone()
    return float(row[0])


def delete_job(conn, job_id: str) -> bool:
    return conn.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,)).rowcount > 0


def stats(conn) -> dict:
    """Counts and sums the jobs metrics start from (one pass at start-up)."""
    by_status = {status: 0 for status in st.STATUSES}
    cost = 0.0
    for status, count, total in conn.execute(
            "SELECT status, count(*), COALESCE(SUM(cost_usd), 0) FROM jobs GROUP BY status"):
        by_status[status] = count
        cost += total
    row = conn.execute("SELECT count(*), COALESCE(SUM(completed_at - started_at), 0) FROM jobs "
                       "WHERE completed_at IS NOT NULL AND started_at IS NOT NULL").fetchone()
    return {"by_status": by_status, "cost_usd_total": cost, "created_total": sum(by_status.values()),
            "durations": row[0], "duration_seconds_total": float(row[1])}


def period_summary(conn, since: float, now: float, recent: int = 10) -> dict:
    """Costs and usage of the jobs created since ``since`` (SimpleTuner's
    ``metrics costs`` / ``metrics usage``): totals by provider and hardware
    profile, GPU-seconds run, counts by status, the most recent costs."""
    conn.row_factory = sqlite3.Row
    larger = "GREATEST" if is_postgres(conn) else "MAX"   # the larger of two values
    by_provider: dict[str, float] = {}
    by_profile: dict[str, dict] = {}
    by_status: dict[str, int] = {}
    for row in conn.execute(
            "SELECT provider, hardware_type, status, count(*) AS n, COALESCE(SUM(cost_usd), 0) AS cost,"
            " COALESCE(SUM(CASE WHEN started_at IS NOT NULL"
            f"   THEN {larger}(0, COALESCE(completed_at, ?) - started_at) END), 0) AS seconds"
            " FROM jobs WHERE created_at >= ? GROUP BY provider, hardware_type, status", (now, since)):
        by_provider[row["provider"]] = by_provider.get(row["provider"], 0.0) + float(row["cost"])
        profile = by_profile.setdefault(row["hardware_type"] or "unknown",
                                        {"cost_usd": 0.0, "run_seconds": 0.0, "jobs": 0})
        profile["cost_usd"] += float(row["cost"])
        profile["run_seconds"] += float(row["seconds"])
        profile["jobs"] += row["n"]
        by_status[row["status"]] = by_status.get(row["status"], 0) + row["n"]
    latest = [{"job_id": r["job_id"], "cost": float(r["cost_usd"] or 0.0), "status": r["status"],
               "created_at": r["created_at"]}
              for r in conn.execute("SELECT job_id, cost_usd, status, created_at FROM jobs"
                                    " WHERE created_at >= ? ORDER BY created_at DESC LIMIT ?",
                                    (since, recent))]
    return {"by_provider": by_provider, "by_profile": by_profile, "by_status": by_status,
            "recent_jobs": latest}


def user_usage(conn, user_id: int, now: float) -> dict:
    """What ``user_id``'s jobs use now (quotas, S4): active jobs, cost today and this month."""
    active = conn.execute(
        f"SELECT count(*) FROM jobs WHERE user_id = ? AND status NOT IN {_TERMINAL_SQL}",
        (user_id,)).fetchone()[0]
    day = period_start(now, "daily")
    month = period_start(now, "monthly")
    row = conn.execute(
        "SELECT COALESCE(SUM(CASE WHEN created_at >= ? THEN cost_usd END), 0),"
        " COALESCE(SUM(cost_usd), 0) FROM jobs WHERE user_id = ? AND created_at >= ?",
        (day, user_id, month)).fetchone()
    return {"concurrent_jobs": active, "daily_cost_usd": float(row[0]),
            "monthly_cost_usd": float(row[1])}
