"""API keys: hashed at rest, expiry, revocation, disabled users, first admin key."""

from __future__ import annotations

import os
import stat

import pytest

from stdaemon.users import api_keys, store as users_store
from stdaemon.store import schema
from stdaemon.store.database import connect


@pytest.fixture
def conn(tmp_path):
    connection = connect(str(tmp_path / "jobs.db"))
    schema.migrate(connection)
    yield connection
    connection.close()


def test_first_start_writes_the_admin_key_once(conn, tmp_path):
    path = str(tmp_path / "cloud" / "admin.key")
    assert users_store.ensure_admin_key(conn, path, now=1000.0) == path
    key = open(path).read().strip()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert users_store.lookup(conn, key, now=1001.0).role == "admin"
    # Second start: nothing new is minted and the file is untouched.
    assert users_store.ensure_admin_key(conn, path, now=2000.0) is None
    assert open(path).read().strip() == key
    assert conn.execute("SELECT count(*) FROM api_keys").fetchone()[0] == 1


def test_expired_revoked_and_disabled_keys_are_refused(conn, tmp_path):
    users_store.ensure_admin_key(conn, str(tmp_path / "admin.key"), now=0.0)
    user_id = conn.execute("SELECT id FROM users WHERE username='admin'").fetchone()[0]
    key_id, key = users_store.create_key(conn, user_id, "ci", "operator", now=0.0, expires_at=100.0)
    assert users_store.lookup(conn, key, now=99.0).role == "operator"
    assert users_store.lookup(conn, key, now=100.0) is None           # expired
    _, other = users_store.create_key(conn, user_id, "tmp", "viewer", now=0.0)
    conn.execute("UPDATE api_keys SET revoked_at = 5 WHERE key_hash = ?", (api_keys.hash_key(other),))
    assert users_store.lookup(conn, other, now=6.0) is None            # revoked
    _, third = users_store.create_key(conn, user_id, "t3", "viewer", now=0.0)
    conn.execute("UPDATE users SET disabled = 1 WHERE id = ?", (user_id,))
    assert users_store.lookup(conn, third, now=1.0) is None           # user disabled
    assert users_store.lookup(conn, "st_" + "x" * 43, now=1.0) is None
    assert users_store.lookup(conn, "not-a-key", now=1.0) is None
    stored = [r[0] for r in conn.execute("SELECT key_hash FROM api_keys")]
    assert key not in stored and api_keys.hash_key(key) in stored
