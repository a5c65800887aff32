"""The jobs table helpers on a real database of each engine (migrated schema)."""

from __future__ import annotations

import pytest

from stdaemon.jobs import store
from tests.postgres_fixture import migrated_connection


@pytest.fixture(params=["sqlite", "postgresql"])
def conn(request, tmp_path):
    """A migrated connection on each engine in turn."""
    return migrated_connection(request.param, tmp_path, request)


def job(job_id, **extra):
    row = {"job_id": job_id, "provider": "replicate", "status": "pending", "created_at": 1000.0,
           "cost_usd": 0.0, "hardware_type": "h100", "user_id": 1, "metadata": {"a": 1}}
    row.update(extra)
    return row


def test_idempotency_key_is_per_user_within_24_hours(conn):
    first, created = store.create_or_get(conn, job("j1", idempotency_key="k"), now=1000.0)
    assert created
    again, created = store.create_or_get(conn, job("j2", idempotency_key="k"), now=1000.0 + 86399)
    assert not created and again["job_id"] == "j1"
    other_user, created = store.create_or_get(conn, job("j3", idempotency_key="k", user_id=2), now=1001.0)
    assert created and other_user["job_id"] == "j3"
    later, created = store.create_or_get(conn, job("j4", idempotency_key="k", created_at=1000.0 + 86401),
                                         now=1000.0 + 86401)
    assert created and later["job_id"] == "j4"
    assert store.get_job(conn, "j1")["idempotency_key"] is None  # the key moved to the new job


def test_transition_guards_and_timestamps(conn):
    store.insert_job(conn, job("j1"))
    result = store.transition(conn, "j1", "queued", 1010.0, external_id="p1")
    assert result.accepted and result.job["external_id"] == "p1"
    result = store.transition(conn, "j1", "running", 1020.0)
    assert result.accepted and result.job["started_at"] == 1020.0
    result = store.transition(conn, "j1", "queued", 1025.0)
    assert not result.accepted and result.reason == "out_of_order" and result.job["status"] == "running"
    result = store.transition(conn, "j1", "running", 1030.0, cost_usd=1.5)
    assert result.reason == "unchanged" and result.job["cost_usd"] == 1.5  # new metrics still apply
    result = store.transition(conn, "j1", "completed", 1100.0, cost_usd=3.0, output_url="https://x/y")
    assert result.accepted and result.job["completed_at"] == 1100.0 and result.job["cost_usd"] == 3.0
    for late in ("running", "failed", "cancelled"):
        result = store.transition(conn, "j1", late, 1200.0, cost_usd=99.0, error_message="late")
        assert not result.accepted and result.reason == "terminal"
    final = store.get_job(conn, "j1")
    assert final["status"] == "completed" and final["cost_usd"] == 3.0 and final["error_message"] is None
    assert store.transition(conn, "missing", "running", 1.0).reason == "missing"


def test_metadata_merge_and_removal(conn):
    store.insert_job(conn, job("j1", metadata={"request": {"config": {}}, "keep": True}))
    result = store.transition(conn, "j1", "queued", 1.0, metadata={"request": None, "urls": {"get": "u"}})
    assert result.job["metadata"] == {"keep": True, "urls": {"get": "u"}}


def test_list_spent_active_delete_and_stats(conn):
    for i, (status, cost, created) in enumerate([("completed", 2.0, 10.0), ("running", 0.5, 20.0),
                                                 ("failed", 0.0, 30.0), ("queued", 0.0, 5.0)]):
        store.insert_job(conn, job(f"j{i}", status=status, cost_usd=cost, created_at=created,
                                   external_id=f"p{i}", started_at=created,
                                   completed_at=created + 60 if status in ("completed", "failed") else None))
    rows, total = store.list_jobs(conn, limit=2)
    assert total == 4 and [r["job_id"] for r in rows] == ["j2", "j1"]
    rows, total = store.list_jobs(conn, status="running")
    assert total == 1 and rows[0]["job_id"] == "j1"
    assert store.spent_since(conn, "replicate", 10.0) == 2.5
    assert {r["job_id"] for r in store.active_jobs(conn, "replicate")} == {"j1", "j3"}
    stats = store.stats(conn)
    assert stats["by_status"]["completed"] == 1 and stats["cost_usd_total"] == 2.5
    assert stats["durations"] == 2 and stats["duration_seconds_total"] == 120.0
    assert store.delete_job(conn, "j2") and not store.delete_job(conn, "j2")
    with pytest.raises(ValueError):
        store.update_job(conn, "j1", created_at=5.0)
