"""Upload credentials at rest: encrypted secret, 0600 key file, expiry by the reactor timer."""

from __future__ import annotations

import os
import sqlite3
import stat

import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock, deferLater

from stdaemon.s3.credentials import UPLOAD_BUCKET, upload_prefix


@pytest_twisted.ensureDeferred
async def test_secret_encrypted_at_rest_key_file_0600_and_expiry_timer(make_daemon):
    clock = Clock()
    clock.advance(1_800_000_000)
    daemon = await make_daemon(clock=clock, settings={"jobs": {"upload_credential_ttl": 3600}})
    creds = daemon.ctx.upload_credentials
    access_key, secret = await creds.issue("job-42")
    assert (UPLOAD_BUCKET, upload_prefix("job-42")) == ("outputs", "job-42/")

    key_path = daemon.ctx.path("config", "cloud", "upload_credentials.key")
    assert stat.S_IMODE(os.stat(key_path).st_mode) == 0o600
    conn = sqlite3.connect(daemon.ctx.database_path)
    try:
        dump = "\n".join(conn.iterdump())
    finally:
        conn.close()
    assert access_key in dump and secret not in dump

    cred = await creds.lookup(access_key)
    assert cred.secret == secret and cred.active(clock.seconds())
    assert (await creds.lookup_token(secret)).access_key_id == access_key
    assert await creds.lookup_token(secret + "x") is None

    clock.advance(3601)  # the expiry timer (every 60 s) revokes it
    for _ in range(100):
        cred = await creds.lookup(access_key)
        if not cred.active(clock.seconds()) and cred.revoked_at is not None:
            break
        await deferLater(reactor, 0.02, lambda: None)
    assert cred.revoked_at is not None

    # a new process (new store object) reads the same secret back with the key file
    from stdaemon.s3.credentials import UploadCredentials

    again = UploadCredentials(daemon.ctx.db, daemon.ctx.clock, creds.key_path, creds.ttl)
    access_key2, secret2 = await creds.issue("job-43")
    assert (await again.lookup(access_key2)).secret == secret2
