"""Keys every instance sharing one database must hold (audit HMAC key, upload-credential key):
``UPLOAD_CREDENTIALS_KEY`` from the secrets stores, and the fingerprint check at start-up
(stdaemon/store/key_fingerprints.py, ``check_shared_keys`` in stdaemon/service.py)."""

from __future__ import annotations

import os

import pytest
import pytest_twisted
from cryptography.fernet import Fernet

from stdaemon.service import KeyMismatch, check_shared_keys
from stdaemon.store import key_fingerprints, settings


def test_a_fingerprint_tells_keys_apart_and_hides_them():
    one, two = b"a" * 64, b"b" * 64
    assert key_fingerprints.fingerprint(one) == key_fingerprints.fingerprint(one)
    assert key_fingerprints.fingerprint(one) != key_fingerprints.fingerprint(two)
    assert len(key_fingerprints.fingerprint(one)) == 32
    assert "a" * 8 not in key_fingerprints.fingerprint(one)


@pytest_twisted.ensureDeferred
async def test_first_start_records_both_fingerprints(daemon):
    ctx = daemon.ctx
    recorded = await ctx.db.run_read(settings.read_namespace, key_fingerprints.NAMESPACE)
    assert recorded == {"audit": ctx.audit.key_fingerprint(),
                        "upload_credentials": key_fingerprints.fingerprint(ctx.upload_credentials.key)}
    assert ctx.upload_credentials.key_source == "file"


@pytest_twisted.ensureDeferred
async def test_a_shared_database_refuses_an_instance_with_other_keys(daemon, monkeypatch):
    ctx = daemon.ctx
    monkeypatch.setattr(ctx.db, "shared", True)
    await check_shared_keys(ctx)  # the same keys: nothing to say
    monkeypatch.setattr(ctx.upload_credentials, "key", Fernet.generate_key())
    with pytest.raises(KeyMismatch, match="upload_credentials"):
        await check_shared_keys(ctx)
    # Nothing was overwritten: the instances that hold the right key keep working.
    recorded = await ctx.db.run_read(settings.read_key, key_fingerprints.NAMESPACE, "upload_credentials")
    assert recorded != key_fingerprints.fingerprint(ctx.upload_credentials.key)


@pytest_twisted.ensureDeferred
async def test_the_embedded_database_records_a_replaced_key(daemon, monkeypatch):
    ctx = daemon.ctx
    new = Fernet.generate_key()
    monkeypatch.setattr(ctx.upload_credentials, "key", new)
    await check_shared_keys(ctx)  # a warning, and the new key is the one on record
    recorded = await ctx.db.run_read(settings.read_key, key_fingerprints.NAMESPACE, "upload_credentials")
    assert recorded == key_fingerprints.fingerprint(new)


@pytest_twisted.ensureDeferred
async def test_upload_credentials_key_from_the_secrets_stores(make_daemon, monkeypatch):
    key = Fernet.generate_key()
    monkeypatch.setenv("UPLOAD_CREDENTIALS_KEY", key.decode())
    running = await make_daemon()
    creds = running.ctx.upload_credentials
    assert creds.key_source == "secrets" and creds.key == key
    assert not os.path.exists(creds.key_path)  # no key file is made when the secret is there
    access_key_id, secret = await creds.issue("job-from-secret")
    stored = await running.ctx.db.run_read(
        lambda conn: conn.execute("SELECT secret_enc FROM upload_credentials WHERE access_key_id = ?",
                                  (access_key_id,)).fetchone()[0])
    assert Fernet(key).decrypt(bytes(stored)).decode() == secret


@pytest_twisted.ensureDeferred
async def test_a_value_that_is_not_a_fernet_key_stops_start_up(make_daemon, monkeypatch):
    monkeypatch.setenv("UPLOAD_CREDENTIALS_KEY", "not-a-key")
    running = await make_daemon()
    health = running.ctx.health
    assert health.phase != "ready"
    assert "UPLOAD_CREDENTIALS_KEY" in (health.not_ready_reason or "")
    assert "not-a-key" not in (health.not_ready_reason or "")
