"""Verified API keys and hot job rows are served from memory, and what is kept is forgotten the moment
it may have changed (revocation or a write here, a change by another process on the same database,
expiry)."""

from __future__ import annotations

import pytest
import pytest_twisted
import treq
from twisted.internet import defer

from stdaemon.users import api_keys, store as users_store
from stdaemon.jobs import store as job_store


@pytest.fixture(params=["sqlite", "postgresql"])
def any_daemon(request, make_daemon):
    """A daemon on each engine in turn (PostgreSQL: a fresh database on the test server)."""
    settings = None
    if request.param == "postgresql":
        settings = {"database": {"url": request.getfixturevalue("postgres_url")}}
    return pytest_twisted.blockon(defer.ensureDeferred(make_daemon(settings)))


def connect(daemon):
    """Another process's connection to the daemon's database (either engine)."""
    return daemon.ctx.db.engine.connect()


def count_reads(ctx):
    """Wrap ctx.db.run_read to record the functions read with; returns the list."""
    calls = []
    original = ctx.db.run_read

    def run_read(fn, *args, **kwargs):
        calls.append(getattr(fn, "__name__", repr(fn)))
        return original(fn, *args, **kwargs)

    ctx.db.run_read = run_read
    return calls


async def make_key(daemon, role="viewer", **extra):
    response = await treq.post(f"{daemon.url}/api/auth/api-keys", json={"name": "cached", "role": role, **extra},
                               headers=daemon.admin_headers)
    assert response.code == 201
    return await response.json()


async def status(daemon, key, path="/api/auth/api-keys"):
    response = await treq.get(daemon.url + path, headers={"X-API-Key": key})
    await response.content()
    return response.code


@pytest_twisted.ensureDeferred
async def test_a_known_key_reads_nothing_from_sqlite(any_daemon):
    daemon = any_daemon
    created = await make_key(daemon)
    assert await status(daemon, created["key"], "/api/cloud/health/ready") == 200
    assert await status(daemon, created["key"], "/api/cloud/metrics/config") == 403   # viewer < admin
    calls = count_reads(daemon.ctx)
    try:
        for _ in range(3):
            assert await status(daemon, created["key"], "/api/cloud/metrics/config") == 403
    finally:
        del daemon.ctx.db.run_read
    assert "lookup_with_expiry" not in calls and "lookup" not in calls


@pytest_twisted.ensureDeferred
async def test_revocation_through_the_api_is_seen_at_once(any_daemon):
    daemon = any_daemon
    created = await make_key(daemon)
    assert await status(daemon, created["key"]) == 200
    response = await treq.delete(f"{daemon.url}/api/auth/api-keys/{created['id']}", headers=daemon.admin_headers)
    assert response.code == 200
    await response.content()
    assert await status(daemon, created["key"]) == 401


@pytest_twisted.ensureDeferred
async def test_a_change_by_another_process_is_seen_at_the_next_generation_poll(any_daemon):
    daemon = any_daemon
    created = await make_key(daemon)
    demoted = await make_key(daemon, role="operator")
    assert await status(daemon, created["key"]) == 200
    assert await status(daemon, demoted["key"], "/api/approvals/rules") == 200
    # Another instance (or stdaemon-admin) on the same database: a plain connection.
    conn = connect(daemon)
    try:
        with conn:
            conn.execute("UPDATE api_keys SET revoked_at = 1 WHERE id = ?", (created["id"],))
            conn.execute("UPDATE api_keys SET role = 'viewer' WHERE id = ?", (demoted["id"],))
    finally:
        conn.close()
    # Until the poll the entries may still be served from memory; the poll (every second on the
    # daemon's clock) sees the counter the triggers bumped.
    await daemon.ctx.poll_change_counters()
    assert await status(daemon, created["key"]) == 401
    assert await status(daemon, demoted["key"], "/api/approvals/rules") == 403


@pytest_twisted.ensureDeferred
async def test_the_generation_counter_follows_every_rights_change(any_daemon):
    daemon = any_daemon
    conn = connect(daemon)
    try:
        before = users_store.auth_generation(conn)
        jobs_before = users_store.change_counters(conn)["jobs"]
        with conn:
            conn.execute("UPDATE api_keys SET last_used_at = 5")       # not a rights change
        assert users_store.auth_generation(conn) == before
        with conn:
            conn.execute("UPDATE users SET disabled = 0")
        assert users_store.auth_generation(conn) == before + 1
        with conn:
            conn.execute("UPDATE api_keys SET expires_at = NULL")
        assert users_store.auth_generation(conn) == before + 2
        assert users_store.change_counters(conn)["jobs"] == jobs_before
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_a_cached_key_stops_at_its_expiry(any_daemon):
    daemon = any_daemon
    created = await make_key(daemon, expires_days=1)
    assert await status(daemon, created["key"]) == 200
    digest = api_keys.hash_key(created["key"])
    principal, until = daemon.ctx.auth._cache[digest]
    assert until <= daemon.ctx.now() + 86400.0
    # The entry ends at the key's expiry even when that is sooner than the cache's own bound.
    daemon.ctx.auth._cache[digest] = (principal, daemon.ctx.now() - 1)
    conn = connect(daemon)
    try:
        with conn:
            conn.execute("UPDATE api_keys SET expires_at = 1 WHERE id = ?", (created["id"],))
    finally:
        conn.close()
    assert await status(daemon, created["key"]) == 401


def insert_job(daemon, job_id, status="running"):
    conn = connect(daemon)
    try:
        with conn:
            job_store.insert_job(conn, {"job_id": job_id, "provider": "replicate", "status": status,
                                        "created_at": 1_700_000_000.0, "user_id": 1, "metadata": {}})
    finally:
        conn.close()


async def get_job(daemon, job_id):
    response = await treq.get(f"{daemon.url}/api/cloud/jobs/{job_id}", headers=daemon.admin_headers)
    body = await response.json()
    assert response.code == 200, body
    return body["job"]


@pytest_twisted.ensureDeferred
async def test_a_hot_job_row_is_read_once_and_forgotten_on_any_write(daemon):
    insert_job(daemon, "hotjob")
    await daemon.ctx.poll_change_counters()
    assert (await get_job(daemon, "hotjob"))["status"] == "running"
    calls = count_reads(daemon.ctx)
    try:
        for _ in range(3):
            assert (await get_job(daemon, "hotjob"))["status"] == "running"
        assert "get_job" not in calls
        # A change through the daemon's one writer (the cancel path) is seen by the next GET.
        response = await treq.post(f"{daemon.url}/api/cloud/jobs/hotjob/cancel", headers=daemon.admin_headers)
        await response.content()
        assert (await get_job(daemon, "hotjob"))["status"] == "cancelled"
        assert "get_job" in calls
    finally:
        del daemon.ctx.db.run_read


@pytest_twisted.ensureDeferred
async def test_the_kept_answer_of_a_running_job_still_follows_the_clock(daemon, monkeypatch):
    """``get_public`` works the ISO times out once per kept row, but the duration of a running job
    is the clock's, and every answer is its caller's own dict."""
    insert_job(daemon, "timed")
    conn = connect(daemon)
    try:
        with conn:
            conn.execute("UPDATE jobs SET started_at = 1700000100.0, metadata = ? WHERE job_id = 'timed'",
                         ('{"progress": {"step": 3}, "hardware_profile": "h100"}',))
    finally:
        conn.close()
    await daemon.ctx.poll_change_counters()
    jobs = daemon.ctx.jobs
    now = [1_700_000_200.0]
    monkeypatch.setattr(jobs, "now", lambda: now[0])
    first = await jobs.get_public("timed")
    row = await jobs.get_row("timed")
    assert first == jobs.public(row)
    assert first["duration_seconds"] == 100.0 and first["progress"] == {"step": 3}
    assert first["started_at"] == "2023-11-14T22:15:00.000Z"
    first["upload_progress"] = {"changed": "by a handler"}
    now[0] += 2.5
    second = await jobs.get_public("timed")
    assert second is not first and "upload_progress" not in second
    assert second["duration_seconds"] == 102.5
    assert list(second) == list(jobs.public(row))     # same fields, same order as before
    assert await jobs.get_public("no-such-job") is None


@pytest_twisted.ensureDeferred
async def test_a_job_changed_by_another_process_is_seen_after_the_counter_poll(any_daemon):
    daemon = any_daemon
    insert_job(daemon, "elsewhere")
    await daemon.ctx.poll_change_counters()
    assert (await get_job(daemon, "elsewhere"))["status"] == "running"
    conn = connect(daemon)
    try:
        with conn:
            conn.execute("UPDATE jobs SET status = 'failed', error_message = 'x' WHERE job_id = 'elsewhere'")
    finally:
        conn.close()
    await daemon.ctx.poll_change_counters()
    assert (await get_job(daemon, "elsewhere"))["status"] == "failed"


@pytest_twisted.ensureDeferred
async def test_with_a_shared_database_a_job_changed_elsewhere_is_seen_at_once(daemon, monkeypatch):
    """Several instances on one database: no job row is kept, so a change another instance
    acknowledged is seen by the very next GET here, without waiting for the counter poll."""
    monkeypatch.setattr(daemon.ctx.db, "shared", True)
    insert_job(daemon, "shared-row")
    assert (await get_job(daemon, "shared-row"))["status"] == "running"
    conn = connect(daemon)
    try:
        with conn:
            conn.execute("UPDATE jobs SET status = 'failed', error_message = 'x' WHERE job_id = 'shared-row'")
    finally:
        conn.close()
    assert (await get_job(daemon, "shared-row"))["status"] == "failed"  # no poll in between


@pytest_twisted.ensureDeferred
async def test_with_a_shared_database_job_totals_follow_other_instances(daemon, monkeypatch):
    """The job metrics (running totals) count the jobs other instances created once the counter
    poll sees them; on the embedded database only this daemon writes, and they are kept as is."""
    ctx = daemon.ctx
    before = ctx.jobs.stats["created_total"]
    insert_job(daemon, "made-elsewhere")
    await ctx.poll_change_counters()
    assert ctx.jobs.stats["created_total"] == before  # embedded: another process is a tool, not counted
    monkeypatch.setattr(ctx.db, "shared", True)
    insert_job(daemon, "made-elsewhere-too")
    await ctx.poll_change_counters()
    assert ctx.jobs.stats["created_total"] == before + 2
    assert ctx.jobs.stats["by_status"].get("running", 0) >= 2


@pytest_twisted.ensureDeferred
async def test_settings_saved_by_another_process_are_read_at_the_next_counter_poll(any_daemon):
    """A provider setting saved through another instance's API (the same ``settings`` row) is used
    here after the next counter poll, not only after a restart."""
    from stdaemon.store import settings as settings_store

    ctx = any_daemon.ctx
    chosen = "l40s" if ctx.providers.value("replicate", "hardware_profile") != "l40s" else "h100"
    conn = connect(any_daemon)
    try:
        with conn:
            settings_store.write_key(conn, "provider:replicate", "hardware_profile", chosen, 1_700_000_000.0)
    finally:
        conn.close()
    await ctx.poll_change_counters()
    assert ctx.providers.value("replicate", "hardware_profile") == chosen


def test_a_moved_counter_counts_as_moved_for_the_settling_polls(tmp_path):
    from stdaemon.store.database import Database

    db = Database(str(tmp_path / "x.db"), None)
    assert db.saw_counter("jobs", 5) is False           # the first read: nothing to compare with
    assert db.saw_counter("jobs", 6) is True            # moved
    assert [db.saw_counter("jobs", 6) for _ in range(db.SETTLE_POLLS)] == [True] * db.SETTLE_POLLS
    assert db.saw_counter("jobs", 6) is False           # settled


@pytest_twisted.ensureDeferred
async def test_a_change_committed_after_a_poll_saw_its_counter_move_is_read(make_daemon, postgres_url):
    """PostgreSQL's counters are sequences: they move when the trigger fires, before the commit.
    A poll in that gap reads the old rows; the next polls must still read again."""
    from stdaemon.store import settings as settings_store
    from tests.postgres_fixture import begin

    daemon = await make_daemon({"database": {"url": postgres_url}})
    ctx = daemon.ctx
    chosen = "l40s" if ctx.providers.value("replicate", "hardware_profile") != "l40s" else "h100"
    conn = connect(daemon)
    try:
        begin(conn)
        settings_store.write_key(conn, "provider:replicate", "hardware_profile", chosen, 1_700_000_000.0)
        await ctx.poll_change_counters()      # the counter moved; the row is not committed yet
        assert ctx.providers.value("replicate", "hardware_profile") != chosen
        conn.execute("COMMIT")
    finally:
        conn.close()
    await ctx.poll_change_counters()
    assert ctx.providers.value("replicate", "hardware_profile") == chosen
