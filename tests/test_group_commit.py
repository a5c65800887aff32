"""Group commit: writes arriving together share one transaction, each acknowledged after the commit,
one that fails rolled back alone; concurrent webhook deliveries go through it."""

from __future__ import annotations

import json

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from stdaemon.store.database import Database, connect
from tests.postgres_fixture import engine_settings
from tests.test_webhooks import add_job, audit_rows, get_job, post, prediction, signed_headers, start_daemon


@pytest_twisted.ensureDeferred
async def test_grouped_writes_commit_together_and_a_failing_one_alone_is_rolled_back(tmp_path):
    db = Database(str(tmp_path / "g.db"), reactor)
    await db.start()
    try:
        await db.run_write(lambda conn: conn.execute("CREATE TABLE t (v INTEGER UNIQUE)"))
        transactions, statements = [], []

        def insert(conn, value):
            conn.set_trace_callback(statements.append)
            transactions.append(conn.in_transaction)
            conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
            if value == 3:
                conn.execute("INSERT INTO t (v) VALUES (?)", (value,))   # UNIQUE: raises
            return value

        calls = [db.run_write_grouped(insert, n) for n in range(8)]
        results = await defer.DeferredList(calls, consumeErrors=True)
        assert [ok for ok, _ in results] == [n != 3 for n in range(8)]
        assert results[3][1].check(Exception)
        assert [value for ok, value in results if ok] == [0, 1, 2, 4, 5, 6, 7]
        conn = connect(str(tmp_path / "g.db"))
        try:
            # every acknowledged write is on disk (read from another connection); the failed one
            # left nothing, not even its first insert
            assert [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")] == [0, 1, 2, 4, 5, 6, 7]
        finally:
            conn.close()
        assert all(transactions)
        # the first write went alone; the seven that arrived while it ran shared one transaction
        # (a savepoint each): one BEGIN after the first write's, not seven
        assert statements.count("BEGIN IMMEDIATE") == 1
        assert statements.count("SAVEPOINT grouped_write") == 7
        assert statements.count("COMMIT") == 2
    finally:
        await db.run_write(lambda conn: conn.set_trace_callback(None))
        db.stop()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_concurrent_deliveries_for_different_jobs_all_apply(make_daemon, tmp_path, engine, request):
    daemon = await start_daemon(make_daemon, tmp_path, settings=engine_settings(request, engine))
    for n in range(6):
        await add_job(daemon, job_id=f"job-{n}", external_id=f"pred-{n}")
    posts = []
    for n in range(6):
        raw = json.dumps(prediction("succeeded", predict_time=10.0, pid=f"pred-{n}")).encode()
        posts.append(defer.ensureDeferred(post(daemon, raw, signed_headers(raw, f"msg-{n}"))))
    results = await defer.gatherResults(posts)
    assert [(code, body["status"]) for code, body in results] == [(200, "applied")] * 6
    for n in range(6):
        assert (await get_job(daemon, f"job-{n}"))["status"] == "completed"
    assert len(audit_rows(daemon, "job.status_changed")) == 6
    # a replay of a committed delivery is answered from memory, the table stays the truth
    raw = json.dumps(prediction("succeeded", predict_time=10.0, pid="pred-0")).encode()
    code, body = await post(daemon, raw, signed_headers(raw, "msg-0"))
    assert (code, body) == (200, {"status": "duplicate", "job_id": "job-0"})
    daemon.ctx.webhooks._recent.clear()
    code, body = await post(daemon, raw, signed_headers(raw, "msg-0"))
    assert (code, body["status"]) == (200, "duplicate")
    assert daemon.ctx.webhooks.counters["duplicates"] == 2
