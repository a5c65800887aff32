"""The SQL of metrics (S10): saved settings (``settings`` table, namespace
``metrics``, through :mod:`stdaemon.store.settings`) and the job figures read
from the ``jobs`` table (one aggregate query; the provider spend of the current
cost period).  Functions take ``conn`` first and run through
``db.run_read``/``db.run_write``.
"""

from __future__ import annotations

from typing import Any, Mapping

from stdaemon.jobs import status as st
from stdaemon.store import settings as settings_table

SETTINGS_NAMESPACE = "metrics"


def load_settings(conn) -> dict[str, Any]:
    return settings_table.read_namespace(conn, SETTINGS_NAMESPACE)


def save_settings(conn, changes: Mapping[str, Any], now: float) -> None:
    """A ``None`` value returns its key to the configuration file's value."""
    settings_table.write_changes(conn, SETTINGS_NAMESPACE, changes, now)


_TERMINAL_SQL = ", ".join(f"'{s}'" for s in sorted(st.TERMINAL))

JOB_AGGREGATE_SQL = (
    "SELECT status, COUNT(*), COALESCE(SUM(cost_usd), 0), "
    "COALESCE(SUM(CASE WHEN started_at IS NOT NULL AND completed_at IS NOT NULL "
    f"AND status IN ({_TERMINAL_SQL}) THEN completed_at - started_at END), 0), "
    "COUNT(CASE WHEN started_at IS NOT NULL AND completed_at IS NOT NULL "
    f"AND status IN ({_TERMINAL_SQL}) THEN 1 END) "
    "FROM jobs GROUP BY status"
)


def job_aggregates(conn) -> dict[str, tuple[int, float, float, int]]:
    """ONE aggregate query: status → (count, cost sum, duration sum, durations)."""
    return {row[0]: (int(row[1]), float(row[2]), float(row[3]), int(row[4]))
            for row in conn.execute(JOB_AGGREGATE_SQL)}


def provider_spend(conn, provider: str, since: float) -> float:
    row = conn.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM jobs WHERE provider = ? AND created_at >= ?",
                       (provider, since)).fetchone()
    return float(row[0])
