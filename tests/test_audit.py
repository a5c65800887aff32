"""The audit writer (S7): hash chain over every column, key handling,
sampling of flood-prone events, counters, verification and retention."""

from __future__ import annotations

import json
import os
import stat

import pytest
import pytest_twisted
from twisted.internet import defer, task

from stdaemon.audit import chain, service, store
from stdaemon.audit.sampler import AuditSampler
from stdaemon.config.schema import AuditConfig
from tests.postgres_fixture import begin, migrated_connection

KEY = b"k" * 64


# -- pure chain functions on a plain connection -----------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def conn(request, tmp_path):
    """A migrated connection on each engine in turn."""
    return migrated_connection(request.param, tmp_path, request)


def _append(conn, now, event_type="job.submitted", **kw):
    begin(conn)
    row = store.append_entry(conn, KEY, now, event_type, **kw)
    conn.execute("COMMIT")
    return row


def _verify(conn, key=KEY):
    start = store.verify_start(conn, key)
    if not start["anchor_ok"]:
        return {"id": start["anchor"]["last_id"], "reason": "anchor"}
    step = store.verify_batch(conn, key, start["after_id"], start["previous_hash"],
                              start["max_id"], batch=10_000)
    return step["broken"]


def test_chain_links_each_entry_to_the_previous(conn):
    first = _append(conn, 1000.0, actor="alice", ip="10.0.0.1", target="job-1", action="submit",
                    details={"cost": 1.5})
    second = _append(conn, 1001.0, "job.cancelled", actor="bob")
    assert first["previous_hash"] == chain.GENESIS
    assert second["previous_hash"] == first["entry_hash"]
    assert second["id"] == first["id"] + 1
    assert _verify(conn) is None
    # A different key does not verify.
    assert _verify(conn, key=b"x" * 64)["id"] == first["id"]


@pytest.mark.parametrize("column,value", [
    ("timestamp", 999.0), ("event_type", "job.submitted2"), ("actor", "mallory"),
    ("ip", "10.9.9.9"), ("target", "job-2"), ("action", "other"), ("details", '{"cost":0}'),
    ("previous_hash", "1" * 64), ("entry_hash", "2" * 64),
])
def test_editing_any_column_breaks_that_entry(conn, column, value):
    rows = [_append(conn, 1000.0 + i, actor="alice", ip="10.0.0.1", target="job-1",
                    action="submit", details={"cost": i}) for i in range(5)]
    conn.execute(f"UPDATE audit_log SET {column} = ? WHERE id = ?", (value, rows[2]["id"]))
    broken = _verify(conn)
    assert broken is not None and broken["id"] == rows[2]["id"]


def test_removing_an_entry_is_reported_at_the_next_one(conn):
    rows = [_append(conn, 1000.0 + i) for i in range(4)]
    conn.execute("DELETE FROM audit_log WHERE id = ?", (rows[1]["id"],))
    assert _verify(conn)["id"] == rows[2]["id"]


def test_details_are_canonical_and_bounded(conn):
    row = _append(conn, 1.0, details={"b": 1, "a": [1, 2]}, target="x" * 5000)
    assert row["details"] == '{"a":[1,2],"b":1}'
    assert len(row["target"]) == chain.MAX_FIELD
    big = _append(conn, 2.0, details={"blob": "y" * (chain.MAX_DETAILS * 2)})
    assert len(big["details"]) <= chain.MAX_DETAILS
    assert json.loads(big["details"])["truncated"] is True
    assert _verify(conn) is None


def test_prune_keeps_the_chain_verifiable_through_an_anchor(conn):
    rows = [_append(conn, 1000.0 + i) for i in range(6)]
    begin(conn)
    deleted = store.prune_before(conn, KEY, cutoff=1003.5, now=5000.0)
    conn.execute("COMMIT")
    assert deleted == 4
    remaining = [r[0] for r in conn.execute("SELECT id FROM audit_log ORDER BY id")]
    assert remaining == [rows[4]["id"], rows[5]["id"]]
    assert _verify(conn) is None
    # New entries continue the chain and ids are never reused.
    new = _append(conn, 6000.0)
    assert new["id"] == rows[5]["id"] + 1
    assert _verify(conn) is None
    # Everything pruned: the next entry links to the anchor.
    begin(conn)
    store.prune_before(conn, KEY, cutoff=10_000.0, now=10_000.0)
    conn.execute("COMMIT")
    after = _append(conn, 10_001.0)
    assert after["previous_hash"] == new["entry_hash"]
    assert after["id"] == new["id"] + 1
    assert _verify(conn) is None


def test_a_forged_anchor_is_detected(conn):
    for i in range(3):
        _append(conn, 1000.0 + i)
    begin(conn)
    store.prune_before(conn, KEY, cutoff=1001.5, now=2000.0)
    conn.execute("COMMIT")
    conn.execute("UPDATE audit_anchor SET pruned_total = 0")
    assert _verify(conn)["reason"] == "anchor"


def test_query_filters_newest_first_with_real_total(conn):
    for i in range(30):
        _append(conn, 1000.0 + i, "job.submitted" if i % 2 else "job.cancelled",
                actor="alice" if i % 3 else "bob")
    page = store.query_entries(conn, event_type="job.submitted", limit=5, offset=0)
    assert page["total"] == 15
    assert [e["timestamp"] for e in page["entries"]] == [1029.0, 1027.0, 1025.0, 1023.0, 1021.0]
    page2 = store.query_entries(conn, event_type="job.submitted", limit=5, offset=5)
    assert page2["entries"][0]["timestamp"] == 1019.0
    both = store.query_entries(conn, actor="bob", since=1010.0, until=1020.0)
    assert both["total"] == len([i for i in range(10, 21) if i % 3 == 0])
    assert all(e["actor"] == "bob" for e in both["entries"])


# -- key file --------------------------------------------------------------------------


def test_key_file_is_created_once_with_mode_0600(tmp_path):
    path = str(tmp_path / "cloud" / "audit.key")
    key = service.load_or_create_key_file(path)
    assert len(key) >= 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert service.load_or_create_key_file(path) == key


def test_a_loose_key_file_is_tightened(tmp_path):
    path = str(tmp_path / "audit.key")
    with open(path, "w") as fh:
        fh.write("a" * 64)
    os.chmod(path, 0o644)
    assert service.load_or_create_key_file(path) == b"a" * 64
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_short_key_file_is_refused(tmp_path):
    path = str(tmp_path / "audit.key")
    with open(path, "w") as fh:
        fh.write("short")
    os.chmod(path, 0o600)
    with pytest.raises(ValueError):
        service.load_or_create_key_file(path)


# -- sampler (pure) ---------------------------------------------------------------------


def test_sampler_records_a_few_per_key_and_aggregates_the_rest():
    sampler = AuditSampler(limit=3, global_limit=100, window=60)
    decisions = [sampler.offer("webhook_rejected", "10.0.0.1", 100.0 + i * 0.01, reason="ip")[0]
                 for i in range(1000)]
    assert decisions.count(True) == 3
    # The next window closes the first one into one aggregate.
    record_it, closed = sampler.offer("webhook_rejected", "10.0.0.1", 161.0, reason="ip")
    assert record_it is True
    assert len(closed) == 1
    assert closed[0]["suppressed"] == 997
    assert closed[0]["reasons"] == {"ip": 997}


def test_sampler_bounds_entries_over_many_addresses():
    sampler = AuditSampler(limit=2, global_limit=50, window=60)
    recorded = sum(sampler.offer("rate_limited", f"10.0.{i // 250}.{i % 250}", 10.0)[0]
                   for i in range(20_000))
    assert recorded == 50
    closed = sampler.flush(71.0)
    # One aggregate per address that used its budget and was then suppressed,
    # plus one "*" aggregate for everything over the global cap.
    assert sum(a["suppressed"] for a in closed) == 20_000 - 50
    assert len(closed) <= 50 // 2 + 1
    assert len(sampler) == 0


def test_sampler_forgets_keys_beyond_its_bound():
    sampler = AuditSampler(limit=1, global_limit=10**9, window=60, max_keys=100)
    closed = []
    for i in range(1000):
        closed += sampler.offer("rate_limited", f"ip{i}", 1.0)[1]
    assert len(sampler) == 100
    assert closed == []  # forgotten keys had nothing suppressed


# -- the service on a real database and an injected clock -------------------------------


class _Secrets:
    def __init__(self, values):
        self.values = values

    def get(self, name):
        return defer.succeed(self.values.get(name))


async def _audit_log(tmp_path, make_database, secrets=None, retention_days=365, **kw):
    from twisted.internet import reactor

    clock = task.Clock()
    clock.advance(1_700_000_000)
    db = make_database()
    await db.start()
    log = service.AuditLog(db, clock, reactor, AuditConfig(retention_days=retention_days),
                           os.path.join(str(tmp_path), "config", "cloud", "audit.key"), secrets, **kw)
    await log.start()
    return log


@pytest_twisted.ensureDeferred
async def test_record_returns_ids_and_counts(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database)
    try:
        assert log.key_source == "file"
        assert os.path.exists(tmp_path / "config" / "cloud" / "audit.key")
        first = await log.record("job.submitted", actor="alice", ip="127.0.0.1", target="j1",
                                 action="submit", details={"provider": "replicate"})
        second = await log.record("job.cancelled")
        assert second == first + 1
        assert log.total == 2 and log.count_last_24h() == 2
        log.clock.advance(25 * 3600)
        await log.record("job.submitted")
        assert log.total == 3 and log.count_last_24h() == 1
        await log.refresh_counts()
        assert log.total == 3 and log.count_last_24h() == 1
        page = await log.query(limit=10)
        assert page["total"] == 3
        assert page["entries"][-1]["details"] == {"provider": "replicate"}
        assert page["entries"][-1]["actor"] == "alice"
        result = await log.verify(batch=2)
        assert result["valid"] is True and result["checked"] == 3
    finally:
        log.db.stop()


@pytest_twisted.ensureDeferred
async def test_key_from_secrets_is_preferred(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database, secrets=_Secrets({"AUDIT_HMAC_KEY": "s" * 40}))
    try:
        assert log.key_source == "secrets"
        assert not os.path.exists(tmp_path / "config" / "cloud" / "audit.key")
        await log.record("backup.created")
        row = await log.db.run_read(lambda c: dict(c.execute("SELECT * FROM audit_log").fetchone()))
        assert chain.entry_hash(b"s" * 40, row) == row["entry_hash"]
    finally:
        log.db.stop()


@pytest_twisted.ensureDeferred
async def test_verify_names_the_edited_entry_and_a_truncated_tail(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database)
    try:
        ids = [await log.record("job.submitted", target=f"j{i}") for i in range(7)]
        assert (await log.verify(batch=3))["valid"] is True

        def tamper(conn):
            conn.execute("UPDATE audit_log SET target = 'jX' WHERE id = ?", (ids[4],))

        await log.db.run_write(tamper)
        result = await log.verify(batch=3)
        assert result["valid"] is False and result["first_broken_id"] == ids[4]

        def truncate(conn):
            conn.execute("DELETE FROM audit_log WHERE id >= ?", (ids[4],))

        await log.db.run_write(truncate)
        result = await log.verify(batch=3)
        assert result["valid"] is False and result["first_broken_id"] == ids[4]
    finally:
        log.db.stop()


@pytest_twisted.ensureDeferred
async def test_sampled_flood_writes_a_bounded_number_of_entries(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database, sample_limit=3, sample_global_limit=20)
    try:
        for i in range(300):
            await log.sampled("webhook_rejected", ip="203.0.113.9", target="replicate",
                              details={"reason": "ip_not_allowed", "provider": "replicate"})
        assert log.total == 3
        log.clock.advance(61)
        assert await log.flush_sampler() == 1
        page = await log.query(event_type="webhook_rejected")
        assert page["total"] == 4
        aggregate = page["entries"][0]
        assert aggregate["action"] == "aggregate"
        assert aggregate["ip"] == "203.0.113.9"
        assert aggregate["details"]["suppressed"] == 297
        assert aggregate["details"]["reasons"] == {"ip_not_allowed": 297}
        assert (await log.verify())["valid"] is True
    finally:
        log.db.stop()


@pytest_twisted.ensureDeferred
async def test_retention_prunes_old_entries_and_verify_still_passes(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database, retention_days=1)
    try:
        for _ in range(5):
            await log.record("job.submitted")
        log.clock.advance(2 * 86400)
        keep = await log.record("job.cancelled")
        assert await log.prune() == 5
        page = await log.query()
        assert [e["event_type"] for e in page["entries"]] == ["audit.pruned", "job.cancelled"]
        assert page["entries"][1]["id"] == keep
        result = await log.verify()
        assert result["valid"] is True and result["anchor"]["pruned_total"] == 5
        assert log.total == 2
        assert await log.prune() == 0
    finally:
        log.db.stop()


@pytest_twisted.ensureDeferred
async def test_append_inside_a_caller_transaction_rolls_back_with_it(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database)
    try:
        def failing(conn):
            log.append(conn, "job.status_changed", target="j1")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            await log.db.run_write(failing)
        entry = await log.db.run_write(lambda conn: log.append(conn, "job.status_changed", target="j2"))
        page = await log.query()
        assert page["total"] == 1 and page["entries"][0]["id"] == entry
        assert (await log.verify())["valid"] is True
    finally:
        log.db.stop()


@pytest_twisted.ensureDeferred
async def test_restart_with_the_same_key_file_keeps_the_chain(tmp_path, make_database):
    log = await _audit_log(tmp_path, make_database)
    try:
        first = await log.record("job.submitted")
    finally:
        log.db.stop()
    again = await _audit_log(tmp_path, make_database)
    try:
        assert again.total == 1
        second = await again.record("job.cancelled")
        assert second == first + 1
        assert (await again.verify())["valid"] is True
    finally:
        again.db.stop()
    # A different key (from secrets) no longer verifies the old entries.
    other = await _audit_log(tmp_path, make_database, secrets=_Secrets({"AUDIT_HMAC_KEY": "z" * 40}))
    try:
        result = await other.verify()
        assert result["valid"] is False and result["first_broken_id"] == first
    finally:
        other.db.stop()
