"""The database engines (stdaemon/store/engines.py): every store's SQL on SQLite and on a real
PostgreSQL, the write guarantees when two ``Database`` objects race on one PostgreSQL, start-up
migrations of two instances at once, and ``database.url`` in the configuration."""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import threading

import pytest
import pytest_twisted
from twisted.internet import defer, reactor

from stdaemon.approvals import store as approvals
from stdaemon.audit import store as audit_store
from stdaemon.config import load_config
from stdaemon.invalid import InvalidValue
from stdaemon.jobs import store as jobs
from stdaemon.jobs import updates as job_updates
from stdaemon.metrics import store as metrics_store
from stdaemon.s3 import store as s3_store
from stdaemon.store import engines, inspect, schema, settings
from stdaemon.store.database import Database
from stdaemon.users import store as users
from stdaemon.webhooks import store as webhooks

KEY = b"k" * 64


def job(job_id, **extra):
    row = {"job_id": job_id, "provider": "replicate", "status": "queued", "created_at": 1000.0,
           "cost_usd": 0.0, "hardware_type": "h100", "user_id": 1, "metadata": {}}
    row.update(extra)
    return row


# -- every store on both engines ---------------------------------------------------------------


def test_users_keys_sessions_and_change_counters(engine_conn):
    conn = engine_conn
    before = users.change_counters(conn)
    admin = users.create_user(conn, "alice", "a@example.com", "hash", "admin", 10.0, "Alice")
    bob = users.create_user(conn, "bob", None, None, "operator", 11.0)
    assert admin["id"] != bob["id"] and admin["display_name"] == "Alice" and bob["email"] == ""
    with pytest.raises(InvalidValue):
        users.create_user(conn, "alice", None, None, "viewer", 12.0)
    assert users.ids_by_username(conn, {"alice", "nobody"}) == {"alice": admin["id"]}
    assert users.find_login(conn, "A@example.com")["username"] == "alice"
    # the last enabled admin is never demoted; a demotion lowers the user's keys
    with pytest.raises(InvalidValue):
        users.update_user(conn, admin["id"], {"role": "viewer"})
    key_id, key = users.create_key(conn, bob["id"], "ci", "operator", 20.0, expires_at=1000.0)
    assert users.lookup(conn, key, 30.0).user_id == bob["id"]
    assert users.lookup(conn, key, 1000.0) is None  # expired
    assert users.update_user(conn, bob["id"], {"role": "viewer", "disabled": False})["role"] == "viewer"
    assert users.get_key(conn, key_id)["role"] == "viewer"
    session = users.create_session(conn, bob["id"], 40.0, 100.0, ip="127.0.0.1", key_id=key_id)
    info = users.lookup_session(conn, session.token, 50.0)
    assert info.principal.username == "bob" and info.principal.role == "viewer"
    assert users.count_sessions(conn) == 1 and users.sweep_sessions(conn, 200.0) == 1
    assert users.revoke_key(conn, key_id, 60.0) and not users.revoke_key(conn, key_id, 61.0)
    assert [k["id"] for k in users.list_keys(conn, bob["id"])] == [key_id]
    after = users.change_counters(conn)
    assert after["auth"] > before["auth"]   # the triggers bumped the counter
    assert users.delete_user(conn, bob["id"], 70.0) and users.get_user(conn, bob["id"]) is None
    # first start: the admin key file and the one-time setup link
    conn.execute("UPDATE users SET password_hash = NULL")
    issued = users.issue_setup_token(conn, 80.0, 600.0)
    assert issued is not None and issued[1] == "alice"
    assert users.consume_setup_token(conn, issued[0], "new-hash", 90.0)["password_hash"] == "new-hash"
    assert users.consume_setup_token(conn, issued[0], "again", 91.0) is None


def test_admin_key_file_on_first_start(engine_conn, tmp_path):
    path = str(tmp_path / "keys" / "admin.key")
    assert users.ensure_admin_key(engine_conn, path, 1.0) == path
    key = open(path).read().strip()
    assert users.lookup(engine_conn, key, 2.0).role == "admin"
    assert users.ensure_admin_key(engine_conn, path, 3.0) is None


def test_approvals_rules_requests_and_quotas(engine_conn):
    conn = engine_conn
    rule = approvals.add_rule(conn, "big", "cost_exceeds", 50, 1.0, "admin")
    assert [r.name for r in approvals.rules(conn)] == ["big"]
    request = approvals.create_request(conn, "j1", "replicate", 1, "alice", rule["id"], "big",
                                       "over budget", 75.5, 2.0, 100.0, {"config_name": "c"})
    assert request["status"] == "pending" and request["config_name"] == "c"
    assert approvals.due_for_expiry(conn, 100.0) == [request["id"]]
    decided = approvals.decide(conn, request["id"], "approved", "bob", "ok", 3.0)
    assert decided["status"] == "approved"
    assert approvals.decide(conn, request["id"], "rejected", "eve", None, 4.0) is None  # decided once
    rows, total = approvals.list_requests(conn, status="approved")
    assert total == 1 and rows[0]["decided_by"] == "bob"
    assert approvals.counts_by_status(conn)["approved"] == 1
    quota = approvals.add_quota(conn, {"quota_type": "daily_cost_usd", "limit": 10.5,
                                       "action": "require_approval", "user_id": None, "role": "viewer"},
                                5.0, "admin")
    assert quota["is_global"] is False and approvals.quotas(conn)[0].limit == 10.5
    with pytest.raises(LookupError):
        approvals.add_quota(conn, {"quota_type": "concurrent_jobs", "limit": 1, "action": "block",
                                   "user_id": 999, "role": None}, 6.0, "admin")
    assert approvals.delete_quota(conn, quota["id"]) and approvals.delete_rule(conn, rule["id"])


def test_settings_credentials_deliveries_and_metrics(engine_conn):
    conn = engine_conn
    settings.write_changes(conn, "metrics", {"a": {"x": 1}, "b": [1, 2], "c": None}, 1.0)
    settings.write_key(conn, "metrics", "a", "100%", 2.0)    # a literal % survives the driver
    assert settings.read_namespace(conn, "metrics") == {"a": "100%", "b": [1, 2]}
    settings.write_changes(conn, "metrics", {"a": None}, 3.0)
    assert settings.read_key(conn, "metrics", "a") is None
    jobs.insert_job(conn, job("j1", status="running", started_at=1000.0, cost_usd=2.5))
    secret = bytes(range(256))
    s3_store.insert(conn, "AKID1", "j1", "outputs", "j1/", secret, "digest1", 10.0, 50.0)
    found = s3_store.find(conn, "secret_hash", "digest1")
    assert found[0] == "AKID1" and bytes(found[4]) == secret and found[7] == "running"
    assert s3_store.job_metadata(conn, "j1") == ("{}",)
    assert s3_store.expire(conn, 60.0) == ["AKID1"] and s3_store.revoke(conn, "j1", 61.0) == 0
    webhooks.record_delivery(conn, "replicate", "msg-1", 5.0, "j1", "applied")
    assert tuple(webhooks.find_delivery(conn, "replicate", "msg-1")) == ("applied", "j1")
    assert webhooks.last_delivery(conn, "replicate") == 5.0
    assert [tuple(r) for r in webhooks.deliveries(conn, None, 10)] == [("replicate", "msg-1", 5.0, "j1", "applied")]
    assert webhooks.sweep(conn, 6.0) == 1
    jobs.transition(conn, "j1", "completed", 1100.0)
    assert metrics_store.job_aggregates(conn)["completed"] == (1, 2.5, 100.0, 1)
    assert metrics_store.provider_spend(conn, "replicate", 0.0) == 2.5
    metrics_store.save_settings(conn, {"prometheus_enabled": True}, 7.0)
    assert metrics_store.load_settings(conn) == {"b": [1, 2], "prometheus_enabled": True}


def test_job_summaries_audit_counts_and_database_checks(engine_conn):
    conn = engine_conn
    jobs.insert_job(conn, job("j1", status="running", started_at=1000.0, cost_usd=1.0))
    jobs.insert_job(conn, job("j2", status="completed", started_at=1010.0, completed_at=1005.0,
                              cost_usd=2.0, user_id=None))
    summary = jobs.period_summary(conn, 0.0, 1100.0)
    # GREATEST/MAX: a finish before the start counts 0 s, a running job runs until now
    assert summary["by_profile"]["h100"]["run_seconds"] == 100.0
    assert summary["by_provider"] == {"replicate": 3.0}
    assert jobs.user_usage(conn, 1, 1100.0)["concurrent_jobs"] == 1
    assert jobs.find_idempotent(conn, None, "none", 1100.0) is None
    for i in range(3):
        audit_store.append_entry(conn, KEY, 119.0 + i * 30, "job.submitted")
    total, buckets = audit_store.minute_counts(conn, 0.0)
    assert total == 3 and buckets == {1: 1, 2: 2}   # minutes truncated, never rounded
    assert inspect.quick_check(conn) == "ok"
    assert inspect.verify(conn) == (["ok"], [])
    counts = inspect.row_counts(conn)
    assert counts["jobs"] == {"row_count": 2} and counts["audit_log"] == {"row_count": 3}
    assert inspect.table_count(conn) >= 13
    applied = inspect.applied_migrations(conn)
    assert [m["name"] for m in applied] == schema.known_migrations()
    assert applied[0]["applied_at"].endswith("Z")


def test_both_engines_have_the_same_tables_and_columns(tmp_path, request):
    from tests.postgres_fixture import migrated_connection

    lite = migrated_connection("sqlite", tmp_path, request)
    pg = migrated_connection("postgresql", tmp_path, request)
    assert set(inspect.row_counts(pg)) - set(inspect.row_counts(lite)) == {"audit_sequence"}
    for table in inspect.row_counts(lite):
        lite_columns = [r[1] for r in lite.execute(f'PRAGMA table_info("{table}")')]
        pg_columns = [r[0] for r in pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?"
            " ORDER BY ordinal_position", (table,))]
        assert pg_columns == lite_columns, table
    # timestamps are 8-byte floats on PostgreSQL, never the 4-byte REAL
    types = {r[0] for r in pg.execute("SELECT data_type FROM information_schema.columns WHERE"
                                      " table_schema = current_schema()")}
    assert "real" not in types and "double precision" in types


# -- PostgreSQL: the writer's guarantees ---------------------------------------------------------


def pg_database(url: str) -> Database:
    return Database("/nonexistent/jobs.db", reactor, engine=engines.engine_for(url, ""))


@pytest_twisted.ensureDeferred
async def test_two_instances_migrate_an_empty_database_at_once(postgres_url):
    first, second = pg_database(postgres_url), pg_database(postgres_url)
    try:
        versions = await defer.gatherResults([first.start(), second.start()])
        assert versions == [len(schema.MIGRATIONS)] * 2
        assert await first.ping() == len(schema.MIGRATIONS)
    finally:
        first.stop()
        second.stop()


@pytest_twisted.ensureDeferred
async def test_group_commit_on_postgresql_rolls_back_a_failing_write_alone(postgres_url):
    db = pg_database(postgres_url)
    await db.start()
    try:
        await db.run_write(lambda conn: conn.execute("CREATE TABLE t (v INTEGER UNIQUE)"))

        def insert(conn, value):
            assert conn.in_transaction
            conn.execute("INSERT INTO t (v) VALUES (?)", (value,))
            if value == 3:
                conn.execute("INSERT INTO t (v) VALUES (?)", (value,))   # UNIQUE: raises
            return value

        results = await defer.DeferredList([db.run_write_grouped(insert, n) for n in range(8)],
                                           consumeErrors=True)
        assert [ok for ok, _ in results] == [n != 3 for n in range(8)]
        rows = await db.run_read(lambda conn: [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")])
        assert rows == [0, 1, 2, 4, 5, 6, 7]
    finally:
        db.stop()


class Meet:
    """Makes two writer threads meet between their reads and their writes, once per round: both
    have read before either writes (a retry after a serialization failure does not wait again)."""

    def __init__(self):
        self.barriers: dict = {}
        self.passed: set = set()
        self.lock = threading.Lock()

    def __call__(self, who: str, round_: object) -> None:
        with self.lock:
            if (who, round_) in self.passed:
                return
            self.passed.add((who, round_))
            barrier = self.barriers.setdefault(round_, threading.Barrier(2, timeout=10))
        barrier.wait()


@pytest_twisted.ensureDeferred
async def test_two_databases_racing_keep_keys_unique_guards_and_one_audit_chain(postgres_url):
    one, two = pg_database(postgres_url), pg_database(postgres_url)
    await defer.gatherResults([one.start(), two.start()])
    pair = ((one, "a"), (two, "b"))
    try:
        # the same idempotency key submitted to both at once: one job
        meet = Meet()

        def submit(conn, who, row):
            found = jobs.find_idempotent(conn, row["user_id"], row["idempotency_key"], 1000.0)
            meet(who, row["idempotency_key"])
            return (found, False) if found else jobs.create_or_get(conn, row, now=1000.0)

        rounds = 10
        calls = [db.run_write(submit, who, job(f"{who}-{n}", idempotency_key=f"key-{n}"))
                 for n in range(rounds) for db, who in pair]
        outcomes = await defer.gatherResults(calls)
        for n in range(rounds):
            (first, made_a), (second, made_b) = outcomes[2 * n], outcomes[2 * n + 1]
            assert first["job_id"] == second["job_id"] and made_a != made_b
        count = await one.run_read(lambda c: c.execute("SELECT count(*) FROM jobs").fetchone()[0])
        assert count == rounds

        # both finish the same queued job at once, differently: exactly one transition is accepted
        meet = Meet()

        def finish(conn, who, job_id, status):
            row = jobs.get_job(conn, job_id)
            meet(who, job_id)
            return jobs.apply_plan(conn, row, job_updates.guard(row, status, 2000.0, {}))

        ids = sorted({j["job_id"] for j, _ in outcomes})
        races = [db.run_write(finish, who, job_id, "completed" if who == "a" else "failed")
                 for job_id in ids for db, who in pair]
        results = await defer.gatherResults(races)
        for i, job_id in enumerate(ids):
            both = results[2 * i: 2 * i + 2]
            assert sorted(r.accepted for r in both) == [False, True], job_id
            winner = next(r for r in both if r.accepted)
            assert (await two.run_read(jobs.get_job, job_id))["status"] == winner.job["status"]

        # both append to the audit chain at once: one chain, no id given twice, and it verifies
        meet = Meet()

        def append(conn, who, n):
            conn.execute("SELECT count(*) FROM audit_log").fetchone()   # an older snapshot...
            meet(who, n)                                              # ...then both append
            return audit_store.append_entry(conn, KEY, 3000.0 + n, "job.submitted", target=who)

        rows = await defer.gatherResults([db.run_write(append, who, n) for n in range(20) for db, who in pair])
        assert sorted(r["id"] for r in rows) == list(range(1, 41))
        start = await one.run_read(audit_store.verify_start, KEY)
        step = await one.run_read(audit_store.verify_batch, KEY, start["after_id"], start["previous_hash"],
                                  start["max_id"], 1000)
        assert step["broken"] is None and step["checked"] == 40 and start["sequence"] == 40
    finally:
        one.stop()
        two.stop()


@pytest_twisted.ensureDeferred
async def test_a_read_survives_a_lost_connection(postgres_url, postgres_server):
    db = pg_database(postgres_url)
    await db.start()
    try:
        assert await db.ping() == len(schema.MIGRATIONS)
        name = postgres_url.rsplit("/", 1)[1]
        postgres_server.admin("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                              f" WHERE datname = '{name}' AND pid <> pg_backend_pid()")
        assert await db.ping() == len(schema.MIGRATIONS)
        assert await db.run_write(lambda c: c.execute("SELECT 1").fetchone()[0]) == 1
    finally:
        db.stop()


# -- configuration --------------------------------------------------------------------------------


def test_database_url_is_checked_at_load_and_never_shows_the_password(tmp_path):
    assert load_config(None, environ={}).config.database.url == ""
    env = {"SIMPLETUNER_DATABASE_URL": "postgresql://st:s3cret@db.example:5432/stdaemon?sslmode=require"}
    config = load_config(None, environ=env).config
    assert config.database.url.startswith("postgresql://") and config.sources["database.url"] == "env"
    for bad in ("mysql://st:s3cret@db/x", "sqlite:///tmp/x.db", "postgresql://st:s3cret@db:99999/x"):
        with pytest.raises(InvalidValue) as error:
            load_config(None, environ={"SIMPLETUNER_DATABASE_URL": bad})
        assert error.value.path == "database.url" and "s3cret" not in str(error.value)
    with pytest.raises(InvalidValue) as error:
        load_config(None, environ={"SIMPLETUNER_DATABASE_URL": "postgresql://st:x@h/d"},
                    overrides={"database.pool_size": 0})
    assert error.value.path == "database.pool_size"
    assert engines.redact("postgresql://st:s3cret@db:5432/x") == "postgresql://st:***@db:5432/x"
    assert engines.redact("postgresql://db/x?passfile=/p") == "postgresql://db/x?passfile=/p"
    assert isinstance(engines.engine_for("", str(tmp_path / "j.db")), engines.SqliteEngine)


def test_placeholders_become_the_drivers_and_quoted_text_is_kept():
    assert engines.to_pyformat("SELECT '?', a FROM t WHERE b = ? AND c LIKE 'x%'") == \
        "SELECT '?', a FROM t WHERE b = %s AND c LIKE 'x%%'"


# -- a daemon on PostgreSQL ---------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_daemon_on_postgresql_serves_a_submission_a_webhook_and_the_job(
        make_daemon, tmp_path, monkeypatch, postgres_url):
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.postgres_fixture import PASSWORD
    from tests.replicate_env import start_env
    from tests.test_webhooks import post, signed_headers

    secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("REPLICATE_WEBHOOK_SECRET", secret)
    logged: list[str] = []

    def observe(event):
        logged.append(formatEvent(event) + repr(event.get("where", "")))

    globalLogPublisher.addObserver(observe)
    try:
        env = await start_env(make_daemon, tmp_path, settings={
            "database": {"url": postgres_url}, "backup": {"enabled": True}})
    finally:
        globalLogPublisher.removeObserver(observe)
    try:
        assert env.ctx.db.dialect == "postgresql"
        response, body = await env.submit(idempotency_key="once")
        assert response.code == 200, body
        job_id = body["job_id"]
        again, body = await env.submit(idempotency_key="once")
        assert again.code == 200 and body["job_id"] == job_id
        response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
        assert response.code == 200 and body["job"]["status"] == "queued"

        prediction = env.fake.state.set_status(body["job"]["external_id"], "succeeded", predict_time=10.0)
        raw = json.dumps(prediction).encode()
        code, answer = await post(env.daemon, raw, signed_headers(raw, "msg-pg-1", secret))
        assert code == 200 and answer["job_status"] == "completed", answer
        code, answer = await post(env.daemon, raw, signed_headers(raw, "msg-pg-1", secret))
        assert (code, answer["status"]) == (200, "duplicate")
        response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
        assert body["job"]["status"] == "completed" and body["job"]["cost_usd"] > 0

        # the rows are in PostgreSQL (no SQLite file), and the audit chain there verifies
        assert not os.path.exists(env.ctx.database_path)
        conn = engines.PostgresEngine(postgres_url).connect()
        try:
            assert conn.execute("SELECT status FROM jobs WHERE job_id = ?", (job_id,)).fetchone()[0] == "completed"
            assert conn.execute("SELECT count(*) FROM audit_log").fetchone()[0] >= 2
        finally:
            conn.close()
        assert (await env.ctx.audit.verify())["valid"] is True

        # backups do not pretend: 409 with the S-style body, pointing at pg_dump
        for method, path, payload in (("POST", "/api/admin/backups", {}), ("GET", "/api/admin/backups", None),
                                      ("POST", "/api/admin/backups/restore", {"name": "x.db"}),
                                      ("GET", "/api/backup", None), ("POST", "/api/backup", {}),
                                      ("DELETE", "/api/backup/x.db", None)):
            response, body = await env.call(method, path, payload)
            assert response.code == 409, (path, body)
            assert body["error"] == "not_supported" and "pg_dump" in body["detail"], body
        response, health = await env.call("GET", "/api/cloud/health")
        backup = next(c for c in health["components"] if c["name"] == "backup")
        assert backup["status"] == "healthy" and "pg_dump" in backup["message"]
        assert next(c for c in health["components"] if c["name"] == "database")["status"] == "healthy"
        response, info = await env.call("GET", "/api/admin/database")
        assert response.code == 200 and info["engine"] == "postgresql" and info["job_count"] == 1
        response, db_health = await env.call("GET", "/api/database/health")
        assert response.code == 200 and db_health["healthy"] is True
        response, body = await env.call("POST", "/api/database/vacuum/jobs")
        assert response.code == 409 and "autovacuum" in body["detail"]
        response, verify = await env.call("GET", "/api/database/verify/jobs")
        assert response.code == 200 and verify["valid"] is True
        response, migrations = await env.call("GET", "/api/database/migrations?database=jobs")
        assert migrations["schema_version"] == len(schema.MIGRATIONS)
        response, stats = await env.call("GET", "/api/database/stats")
        assert stats["jobs"]["tables"]["jobs"]["row_count"] == 1
    finally:
        await env.fake.stop()
    text = "\n".join(logged)
    assert "pg_dump" in text and "postgresql://stdaemon:***@" in text   # said once, at start
    assert PASSWORD not in text


def test_admin_cli_on_postgresql_reports_the_database_and_refuses_backups(postgres_url, tmp_path, capsys):
    from stdaemon import admin_cli
    from tests.postgres_fixture import PASSWORD

    engine = engines.PostgresEngine(postgres_url)
    conn = engine.connect()
    try:
        schema.migrate_any(conn)
        jobs.insert_job(conn, job("j1"))
    finally:
        conn.close()
    path = tmp_path / "stdaemon.yaml"
    path.write_text(f"server:\n  state_dir: {tmp_path / 'state'}\ndatabase:\n  url: '{postgres_url}'\n")
    assert admin_cli.main(["--config", str(path), "--json", "db-info"]) == admin_cli.EXIT_OK
    info = json.loads(capsys.readouterr().out)
    assert info["engine"] == "postgresql" and info["job_count"] == 1
    assert info["schema_version"] == len(schema.MIGRATIONS) and PASSWORD not in info["path"]
    for command in (["backup"], ["list-backups"], ["restore", "x.db"]):
        assert admin_cli.main(["--config", str(path), *command]) == admin_cli.EXIT_FAILED
        assert "pg_dump" in capsys.readouterr().err


#: sha256 of each migration's SQLite text: SQLite databases have applied these, so they never change
#: (a schema change is a new migration). PostgreSQL's texts may be fixed until a release ships them.
SQLITE_MIGRATION_DIGESTS = {
    "0001_core": "c0fec0e22ed17dee",
    "0009_sessions_approvals_quotas": "366c2cd010730cf2",
    "0020_upload_credentials": "76665da315dec6dc",
    "0030_audit": "ab5d3cd99f21e402",
    "0031_webhook_deliveries": "624de058e2e5108c",
    "0042_users_display_name": "577ce50c99496312",
    "0043_session_api_key": "106fb10ad507315e",
    "0044_quota_require_approval": "576f33feade071a3",
    "0045_change_counters": "90d663fa13a7c6b1",
}


def test_the_sqlite_text_of_applied_migrations_never_changes():
    import hashlib

    digests = {m.name: hashlib.sha256(m.sql.encode()).hexdigest()[:16] for m in schema.MIGRATIONS}
    assert {name: digests[name] for name in SQLITE_MIGRATION_DIGESTS} == SQLITE_MIGRATION_DIGESTS
    assert len(set(digests)) == len(schema.MIGRATIONS)


def test_a_tool_appends_to_the_audit_chain_of_a_postgresql_database(postgres_url, tmp_path):
    from stdaemon.audit.service import append_from_tool

    config = load_config(None, environ={"SIMPLETUNER_DATABASE_URL": postgres_url,
                                        "SIMPLETUNER_STATE_DIR": str(tmp_path)}).config
    engine = engines.PostgresEngine(postgres_url)
    conn = engine.connect()
    try:
        schema.migrate_any(conn)
        ids = [append_from_tool(config, str(tmp_path / "unused.db"), "backup.created", actor="cli:root",
                                now=1000.0 + i, key=KEY) for i in range(2)]
        assert ids == [1, 2]
        start = audit_store.verify_start(conn, KEY)
        assert audit_store.verify_batch(conn, KEY, 0, start["previous_hash"], 2)["broken"] is None
    finally:
        conn.close()
    assert not (tmp_path / "unused.db").exists()


def test_every_change_counter_moves_on_both_engines(engine_conn):
    """Jobs, settings and rights changes each move their counter, whoever writes (triggers)."""
    conn = engine_conn
    before = users.change_counters(conn)
    assert set(before) == {"auth", "jobs", "settings"}
    jobs.insert_job(conn, job("counted"))
    settings.write_key(conn, "provider:replicate", "hardware_profile", "h100", 1.0)
    after = users.change_counters(conn)
    assert after["jobs"] > before["jobs"] and after["settings"] > before["settings"]
    assert after["auth"] == before["auth"]


def test_job_writes_of_two_instances_do_not_conflict_over_the_counters(postgres_url):
    """On PostgreSQL the counters are sequences: two serializable transactions changing different
    jobs both commit (a counter row would make one of them fail and retry)."""
    engine = engines.PostgresEngine(postgres_url)
    first, second = engine.connect(), engine.connect()
    try:
        schema.migrate_any(first)
        jobs.insert_job(first, job("left"))
        jobs.insert_job(first, job("right"))
        second.execute("SET lock_timeout = '2s'")  # a counter row lock would fail here, not hang
        for conn in (first, second):
            conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        jobs.update_job(first, "left", error_message="a")
        jobs.update_job(second, "right", error_message="b")
        first.execute("COMMIT")
        second.execute("COMMIT")  # no serialization failure
        assert jobs.get_job(first, "right")["error_message"] == "b"
    finally:
        first.close()
        second.close()


def test_the_password_may_come_from_a_passfile_instead_of_the_url(postgres_server, postgres_url, tmp_path):
    import psycopg

    from tests.postgres_fixture import PASSWORD, SUPERUSER

    dbname = postgres_url.rsplit("/", 1)[1]
    passfile = tmp_path / "pgpass"
    passfile.write_text(f"127.0.0.1:{postgres_server.port}:{dbname}:{SUPERUSER}:{PASSWORD}\n")
    passfile.chmod(0o600)
    base = f"postgresql://{SUPERUSER}@127.0.0.1:{postgres_server.port}/{dbname}"
    conn = engines.PostgresEngine(f"{base}?passfile={passfile}").connect()
    try:
        assert conn.execute("SELECT current_user").fetchone()[0] == SUPERUSER
    finally:
        conn.close()
    with pytest.raises(psycopg.OperationalError):
        engines.PostgresEngine(f"{base}?passfile={tmp_path / 'none'}").connect().close()


def test_a_connection_error_never_shows_the_password():
    import psycopg

    with pytest.raises(InvalidValue) as error:
        load_config(None, environ={"SIMPLETUNER_DATABASE_URL": "postgresql://st:se%zzcret@db/x"})
    assert error.value.path == "database.url" and "cret" not in str(error.value)
    # a URL built by hand (not through the configuration): libpq quotes what it cannot parse
    engine = engines.PostgresEngine.__new__(engines.PostgresEngine)
    engine.url, engine._dumper = "postgresql://st:se%zzcret@127.0.0.1:1/x", None
    with pytest.raises(psycopg.Error) as failure:
        engine.connect()
    assert "cret" not in str(failure.value)


def test_a_commit_waits_for_the_wal_even_where_the_server_would_not(postgres_server, postgres_url):
    dbname = postgres_url.rsplit("/", 1)[1]
    postgres_server.admin(f'ALTER DATABASE "{dbname}" SET synchronous_commit = off')
    conn = engines.PostgresEngine(postgres_url).connect()
    try:
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "on"
    finally:
        conn.close()
    postgres_server.admin(f'ALTER DATABASE "{dbname}" SET synchronous_commit = remote_apply')
    conn = engines.PostgresEngine(postgres_url).connect()
    try:   # a durable choice of the operator's is kept
        assert conn.execute("SHOW synchronous_commit").fetchone()[0] == "remote_apply"
    finally:
        conn.close()


class _CountingConnection:
    """A SQLite connection that counts the COMMITs sent through it."""

    def __init__(self, conn):
        self.conn = conn
        self.commits = 0

    def execute(self, sql, *args):
        if sql.strip().upper() == "COMMIT":
            self.commits += 1
        return self.conn.execute(sql, *args)


def _sqlite_schema(conn):
    return sorted(tuple(row) for row in conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master WHERE name != 'sqlite_sequence'"))


def test_a_new_sqlite_database_is_migrated_in_one_transaction_and_an_old_one_step_by_step(tmp_path):
    """A fresh database: every migration and its ledger row in one commit.  A database with some
    migrations applied: each remaining one in its own transaction, as before.  Both end with the
    same schema and ledger as applying every migration one by one."""
    from stdaemon.store.database import connect

    fresh = _CountingConnection(connect(str(tmp_path / "fresh.db")))
    assert schema.migrate(fresh) == len(schema.MIGRATIONS)
    assert fresh.commits == 1
    assert [m["name"] for m in inspect.applied_migrations(fresh.conn)] == schema.known_migrations()

    # an old database: the first three migrations applied one by one, as an older stdaemon did
    old = connect(str(tmp_path / "old.db"))
    old.execute("CREATE TABLE schema_migrations ("
                " name TEXT PRIMARY KEY, applied_at TEXT NOT NULL DEFAULT (datetime('now')))")
    for name, sql, _ in schema.MIGRATIONS[:3]:
        old.execute("BEGIN IMMEDIATE")
        for statement in schema._split(sql):
            old.execute(statement)
        old.execute("INSERT INTO schema_migrations (name) VALUES (?)", (name,))
        old.execute("COMMIT")
    upgraded = _CountingConnection(old)
    assert schema.migrate(upgraded) == len(schema.MIGRATIONS)
    assert upgraded.commits == len(schema.MIGRATIONS) - 3
    assert _sqlite_schema(old) == _sqlite_schema(fresh.conn)
    assert [m["name"] for m in inspect.applied_migrations(old)] == schema.known_migrations()
    # and nothing is left to do the next time
    again = _CountingConnection(old)
    assert schema.migrate(again) == len(schema.MIGRATIONS) and again.commits == 0


def test_a_failing_migration_of_a_new_sqlite_database_leaves_nothing(tmp_path, monkeypatch):
    from stdaemon.store.database import connect

    broken = schema.Migration("9999_broken", "CREATE TABLE oops (x INTEGER);\nSELECT * FROM no_such_table;")
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, broken])
    conn = connect(str(tmp_path / "fresh.db"))
    with pytest.raises(sqlite3.OperationalError):
        schema.migrate(conn)
    assert schema.schema_version(conn) == 0
    assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name IN ('jobs', 'oops')").fetchone()[0] == 0
