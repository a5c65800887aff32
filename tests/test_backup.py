"""JobStore backups and restore (S13) on real SQLite files, with real concurrent writers."""

from __future__ import annotations

import gzip
import os
import re
import sqlite3
import threading

import pytest
from twisted.internet import task

from stdaemon.store import schema
from stdaemon.backup.store import SAFETY_PREFIX, JobStore, RestoreRefused
from stdaemon.store.database import connect

BATCH = 10


def make_db(path):
    conn = connect(str(path))
    schema.migrate(conn)
    return conn


def add_jobs(conn, start, count, status="completed"):
    conn.execute("BEGIN IMMEDIATE")
    for i in range(start, start + count):
        conn.execute(
            "INSERT INTO jobs (job_id, provider, status, created_at) VALUES (?, 'replicate', ?, ?)",
            (f"job-{i:06d}", status, float(i)),
        )
    conn.execute("COMMIT")


def job_ids(path):
    conn = sqlite3.connect(str(path))
    try:
        return [r[0] for r in conn.execute("SELECT job_id FROM jobs ORDER BY job_id")]
    finally:
        conn.close()


def integrity(path):
    conn = sqlite3.connect(str(path))
    try:
        return conn.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        conn.close()


@pytest.fixture
def clock():
    c = task.Clock()
    c.advance(1_700_000_000)  # 2023-11-14T22:13:20Z
    return c


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "state" / "config" / "cloud" / "jobs.db"
    path.parent.mkdir(parents=True)
    conn = make_db(path)
    add_jobs(conn, 0, 5)
    conn.close()
    return path


@pytest.fixture
def store(db, tmp_path, clock):
    return JobStore(db, backup_dir=tmp_path / "backups", clock=clock)


def test_backup_is_consistent_while_another_thread_writes(store, db):
    conn = make_db(db)
    conn.execute("PRAGMA synchronous=NORMAL")  # a fast writer, same WAL database
    stop = threading.Event()
    going = threading.Event()
    written = [5]
    errors = []

    def writer():
        try:
            n = 5
            while not stop.is_set() and n < 200_000:
                add_jobs(conn, n, BATCH)
                n += BATCH
                written[0] = n
                if n >= 2000:
                    going.set()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    copies = []
    try:
        assert going.wait(timeout=60), "the writer did not get going"
        for i in range(5):
            before = written[0]
            copies.append((before, store.backup(store.backup_dir / f"during-{i}.db")))
    finally:
        stop.set()
        thread.join(timeout=60)
        conn.close()
    assert not errors
    assert written[0] > copies[-1][0]
    for before, path in copies:
        assert integrity(path) == "ok"
        ids = job_ids(path)
        # A snapshot holds whole transactions only, with no gaps.
        assert len(ids) >= before - BATCH
        assert (len(ids) - 5) % BATCH == 0
        assert ids == [f"job-{i:06d}" for i in range(len(ids))]


def test_default_name_list_and_info(store, db, clock):
    first = store.backup()
    assert first.parent == store.backup_dir
    assert re.fullmatch(r"jobs_backup_\d{8}_\d{6}\.db", first.name)
    assert first.name == "jobs_backup_20231114_221320.db"
    assert (os.stat(first).st_mode & 0o777) == 0o600
    clock.advance(60)
    second = store.backup(compress=True)
    assert second.name.endswith(".db.gz")
    assert (os.stat(second).st_mode & 0o777) == 0o600
    os.utime(first, (1, 1))  # make the order unambiguous
    assert store.list_backups() == [second, first]
    info = store.get_database_info()
    for key in ("path", "size_mb", "job_count", "wal_size_bytes", "schema_version"):
        assert key in info
    assert info["path"] == str(db)
    assert info["job_count"] == 5
    assert info["schema_version"] == len(schema.known_migrations())
    assert info["backup_count"] == 2 and info["latest_backup"]["name"] == second.name


def test_restore_brings_back_exactly_the_backup(store, db):
    saved = store.backup()
    conn = make_db(db)
    add_jobs(conn, 5, 7, status="running")
    conn.execute("DELETE FROM jobs WHERE job_id = 'job-000000'")
    before = job_ids(db)
    assert store.restore(saved) is True
    # The open connection of "the daemon" sees the restored data at once.
    assert [r[0] for r in conn.execute("SELECT job_id FROM jobs ORDER BY job_id")] == job_ids(saved)
    conn.close()
    assert job_ids(db) == [f"job-{i:06d}" for i in range(5)]
    safety = [p for p in store.list_backups() if p.name.startswith(SAFETY_PREFIX)]
    assert len(safety) == 1 and job_ids(safety[0]) == before
    assert integrity(db) == "ok"


def test_restore_of_gzip_backup(store, db):
    saved = store.backup(store.backup_dir / "custom.db.gz")
    with gzip.open(saved) as fh:
        assert fh.read(16) == b"SQLite format 3\x00"
    conn = make_db(db)
    add_jobs(conn, 100, 3)
    conn.close()
    store.restore(saved)
    assert len(job_ids(db)) == 5


@pytest.mark.parametrize("kind", ["garbage", "truncated", "foreign", "newer", "bad_gzip", "missing"])
def test_restore_refuses_unsound_files_and_leaves_database_untouched(store, db, tmp_path, kind):
    good = store.backup()
    bad = tmp_path / f"bad-{kind}.db"
    if kind == "garbage":
        bad.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    elif kind == "truncated":
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "foreign":
        other = sqlite3.connect(str(bad))
        other.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)")
        other.execute("INSERT INTO notes (body) VALUES ('hello')")
        other.commit()
        other.close()
    elif kind == "newer":
        bad.write_bytes(good.read_bytes())
        other = sqlite3.connect(str(bad))
        other.execute("INSERT INTO schema_migrations (name) VALUES ('9999_from_the_future')")
        other.commit()
        other.close()
    elif kind == "bad_gzip":
        bad = tmp_path / "bad.db.gz"
        bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    conn = make_db(db)
    add_jobs(conn, 50, 2)
    conn.close()
    before_ids = job_ids(db)
    before_files = sorted(p.name for p in store.list_backups())
    with pytest.raises(RestoreRefused) as info:
        store.restore(bad)
    assert info.value.code in ("corrupt", "not_sqlite", "foreign_database", "newer_schema", "not_found")
    assert job_ids(db) == before_ids
    assert integrity(db) == "ok"
    assert sorted(p.name for p in store.list_backups()) == before_files  # no safety copy either
    leftovers = [n for n in os.listdir(db.parent) if ".restore-" in n or ".unpack-" in n]
    assert leftovers == []


def test_restore_with_another_page_size(store, db, tmp_path):
    other = tmp_path / "pagesize.db"
    conn = sqlite3.connect(str(other), isolation_level=None)
    conn.execute("PRAGMA page_size=8192")
    schema.migrate(conn)
    add_jobs(conn, 900, 3)
    conn.close()
    store.restore(other)
    assert job_ids(db) == [f"job-{i:06d}" for i in range(900, 903)]
    assert integrity(db) == "ok"


def test_prune_by_count_and_days(store, clock):
    made = []
    for _ in range(5):
        made.append(store.backup())
        clock.advance(3600)
    for age_days, path in zip((10, 8, 3, 2, 1), made):
        t = clock.seconds() - age_days * 86400
        os.utime(path, (t, t))
    removed = store.prune(keep_days=7, keep_count=2)
    assert sorted(removed) == sorted(made[:3])
    assert store.list_backups() == [made[4], made[3]]


def test_registered_append_only_tables_survive_a_restore(store, db):
    store.preserved_tables = ("history_test",)
    conn = make_db(db)
    conn.execute("CREATE TABLE history_test (id INTEGER PRIMARY KEY, what TEXT NOT NULL)")
    conn.execute("INSERT INTO history_test (what) VALUES ('before backup')")
    saved = store.backup()
    conn.execute("INSERT INTO history_test (what) VALUES ('after backup')")
    add_jobs(conn, 5, 3)
    store.restore(saved)
    assert len(job_ids(db)) == 5  # jobs come back as in the backup
    rows = [r[0] for r in conn.execute("SELECT what FROM history_test ORDER BY id")]
    assert rows == ["before backup", "after backup"]  # history is not rolled back
    assert store.last_restore["preserved_tables"] == ["history_test"]
    conn.close()


def test_default_locations(db, tmp_path, monkeypatch):
    # A bare path keeps its backups next to it; no path means the daemon's own database.
    assert JobStore(db).backup_dir == db.parent / "backups"
    monkeypatch.setenv("SIMPLETUNER_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("SIMPLETUNER_BACKUP_DIR", raising=False)
    store = JobStore()
    assert store.path == db
    assert store.backup_dir == tmp_path / "state" / "backups"
    assert store.get_database_info()["job_count"] == 5
