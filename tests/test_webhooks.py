"""Webhooks and the audit log end to end, over a real port (S6, S7).

Deliveries are signed with the ``standardwebhooks`` package (an independent
implementation), so the daemon's verifier is not tested against itself.
"""

from __future__ import annotations

import base64
import json
import os
import re
from datetime import datetime, timezone

import pytest
import pytest_twisted
import treq
from standardwebhooks import Webhook
from twisted.internet import defer, reactor

from stdaemon.jobs import store as job_store
from stdaemon.store.database import connect

SECRET = "whsec_" + base64.b64encode(b"stdaemon-e2e-webhook-secret-0001").decode()
WRONG = "whsec_" + base64.b64encode(b"not-the-secret-the-daemon-knows").decode()
URL = "/api/webhooks/replicate"


async def start_daemon(make_daemon, tmp_path, *, trusted=(), allowed=(), subdir="d",
                       secret=SECRET, settings=None):
    base = tmp_path / subdir
    base.mkdir(parents=True, exist_ok=True)
    config = {"server": {"trusted_proxies": list(trusted)},
              "providers": {"replicate": {"webhook_allowed_ips": list(allowed)}}}
    if secret is not None:
        path = base / "secrets.json"
        path.write_text(json.dumps({"REPLICATE_WEBHOOK_SECRET": secret}))
        os.chmod(path, 0o600)
        config["secrets"] = {"file": str(path)}
    for section, values in (settings or {}).items():
        config.setdefault(section, {}).update(values)
    return await make_daemon(settings=config, subdir=subdir)


async def add_job(daemon, job_id="job-1", external_id="pred-1", status="queued",
                  hardware_type="h100-x2"):
    job = {"job_id": job_id, "provider": "replicate", "status": status,
           "created_at": daemon.ctx.now(), "hardware_type": hardware_type,
           "external_id": external_id, "metadata": {}}
    return await daemon.ctx.db.run_write(job_store.insert_job, job)


async def get_job(daemon, job_id="job-1"):
    return await daemon.ctx.db.run_read(job_store.get_job, job_id)


def signed_headers(body: bytes, msg_id: str, secret: str = SECRET, skew: int = 0) -> dict:
    timestamp = int(reactor.seconds()) + skew
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, tz=timezone.utc),
                                     body.decode())
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


async def post(daemon, body, headers=None, path=URL):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await treq.post(daemon.url + path, data=raw,
                               headers={"Content-Type": "application/json", **(headers or {})})
    text = await response.text()
    try:
        data = json.loads(text)
    except ValueError:
        data = text
    return response.code, data


async def deliver(daemon, payload, msg_id, xff=None, secret=SECRET, skew=0):
    raw = json.dumps(payload).encode()
    headers = signed_headers(raw, msg_id, secret, skew)
    if xff:
        headers["X-Forwarded-For"] = xff
    return await post(daemon, raw, headers)


def audit_rows(daemon, event_type=None):
    conn = daemon.ctx.db.engine.connect()   # another connection to the daemon's database (either engine)
    try:
        if event_type:
            rows = conn.execute("SELECT * FROM audit_log WHERE event_type = ? ORDER BY id",
                                (event_type,)).fetchall()
        else:
            rows = conn.execute("SELECT * FROM audit_log ORDER BY id").fetchall()
        return [dict(r) for r in rows]
    finally:
        conn.close()


def prediction(status, predict_time=None, output=None, error=None, pid="pred-1"):
    body = {"id": pid, "status": status, "output": output, "error": error, "logs": "step 1\n"}
    if predict_time is not None:
        body["metrics"] = {"predict_time": predict_time}
    return body


# -- the lifecycle ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_signed_sequence_moves_the_job_and_a_replay_changes_nothing(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path, trusted=["127.0.0.1/32"],
                                allowed=["198.51.100.0/24"])
    await add_job(daemon)
    credentials = getattr(daemon.ctx, "upload_credentials", None)
    if credentials is not None:
        await credentials.issue("job-1")
    client = "198.51.100.7"

    code, body = await deliver(daemon, prediction("starting"), "msg_start", xff=client)
    assert code == 200, body
    assert (await get_job(daemon))["status"] == "queued"

    code, body = await deliver(daemon, prediction("processing", predict_time=12.0), "msg_proc", xff=client)
    assert code == 200 and body["status"] == "applied", body
    job = await get_job(daemon)
    assert job["status"] == "running" and job["started_at"] is not None

    done = prediction("succeeded", predict_time=100.0, output=["https://cdn.example.test/lora.safetensors"])
    code, body = await deliver(daemon, done, "msg_done", xff=client)
    assert code == 200 and body["job_status"] == "completed", body
    job = await get_job(daemon)
    assert job["status"] == "completed"
    # 100 s × 0.001525 $/GPU-s (H100) × 2 GPUs
    assert job["cost_usd"] == pytest.approx(0.305)
    assert job["output_url"] == "https://cdn.example.test/lora.safetensors"
    assert job["completed_at"] is not None

    # A late "processing" does not reopen the job.
    code, body = await deliver(daemon, prediction("processing", predict_time=5.0), "msg_late", xff=client)
    assert code == 200 and body["status"] == "ignored" and body["reason"] == "terminal", body
    assert (await get_job(daemon)) == job

    # A replay of an applied delivery is acknowledged and not reapplied.
    changes_before = audit_rows(daemon, "job.status_changed")
    code, body = await deliver(daemon, done, "msg_done", xff=client)
    assert code == 200 and body["status"] == "duplicate", body
    assert (await get_job(daemon)) == job
    assert audit_rows(daemon, "job.status_changed") == changes_before

    changes = audit_rows(daemon, "job.status_changed")
    assert [(r["action"], r["ip"], r["actor"]) for r in changes] == [
        ("running", client, "webhook:replicate"), ("completed", client, "webhook:replicate")]
    assert json.loads(changes[1]["details"])["from"] == "running"

    if credentials is not None:
        conn = connect(daemon.ctx.database_path)
        try:
            revoked = conn.execute("SELECT revoked_at FROM upload_credentials WHERE job_id = 'job-1'").fetchall()
        finally:
            conn.close()
        assert revoked and all(r[0] is not None for r in revoked)

    conn = connect(daemon.ctx.database_path)
    try:
        deliveries = conn.execute("SELECT webhook_id, outcome FROM webhook_deliveries ORDER BY received_at, "
                                  "webhook_id").fetchall()
    finally:
        conn.close()
    assert {d[0] for d in deliveries} == {"msg_start", "msg_proc", "msg_done", "msg_late"}


@pytest_twisted.ensureDeferred
async def test_trainer_events_and_failures(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path)
    await add_job(daemon, "job-t", external_id="pred-t", status="queued")
    event = {"job_id": "job-t", "type": "training.status", "data": {"status": "running"}}
    code, body = await deliver(daemon, event, "msg_t1")
    assert code == 200 and body["job_status"] == "running", body
    event = {"job_id": "job-t", "type": "training.status",
             "data": {"status": "failed", "error": "CUDA out of memory"}}
    code, body = await deliver(daemon, event, "msg_t2")
    assert code == 200, body
    job = await get_job(daemon, "job-t")
    assert job["status"] == "failed" and job["error_message"] == "CUDA out of memory"
    # A prediction failure for another job carries its error.
    await add_job(daemon, "job-p", external_id="pred-p", status="running")
    code, body = await deliver(daemon, prediction("failed", error="boom", pid="pred-p"), "msg_p1")
    assert code == 200
    assert (await get_job(daemon, "job-p"))["error_message"] == "boom"


@pytest_twisted.ensureDeferred
async def test_unsigned_deliveries_when_signatures_are_not_required(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path, secret=None,
                                settings={"providers": {"replicate": {"webhook_require_signature": False}}})
    await add_job(daemon)
    code, body = await post(daemon, prediction("processing"), {"webhook-id": "msg_u1"})
    assert code == 200 and body["status"] == "applied", body
    code, body = await post(daemon, prediction("processing"), {"webhook-id": "msg_u1"})
    assert code == 200 and body["status"] == "duplicate"
    assert (await get_job(daemon))["status"] == "running"


# -- client IP and the allowlist ----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_behind_a_trusted_proxy_the_forwarded_client_is_checked(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path, trusted=["127.0.0.1/32"],
                                allowed=["198.51.100.0/24"])
    await add_job(daemon)
    code, _ = await deliver(daemon, prediction("processing"), "msg_a", xff="198.51.100.9")
    assert code == 200
    # The real client (rightmost untrusted hop) is outside the allowlist,
    # whatever the client put at the left of the header.
    code, body = await deliver(daemon, prediction("processing"), "msg_b",
                               xff="198.51.100.9, 203.0.113.50")
    assert code == 403 and body["error"] == "forbidden" and body["reason"] == "ip_not_allowed"
    rejected = audit_rows(daemon, "webhook_rejected")
    assert len(rejected) == 1
    assert rejected[0]["ip"] == "203.0.113.50"
    assert json.loads(rejected[0]["details"]) == {"provider": "replicate", "reason": "ip_not_allowed",
                                                  "status": 403}


@pytest_twisted.ensureDeferred
async def test_a_spoofed_forwarded_header_from_an_untrusted_peer_does_not_pass(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path, trusted=[], allowed=["198.51.100.0/24"])
    await add_job(daemon)
    code, body = await deliver(daemon, prediction("processing"), "msg_s", xff="198.51.100.9")
    assert code == 403, body
    assert (await get_job(daemon))["status"] == "queued"
    rejected = audit_rows(daemon, "webhook_rejected")
    assert [r["ip"] for r in rejected] == ["127.0.0.1"]
    # Header X-Real-IP is ignored too.
    code, _ = await post(daemon, json.dumps(prediction("processing")).encode(),
                         {**signed_headers(json.dumps(prediction("processing")).encode(), "msg_r"),
                          "X-Real-IP": "198.51.100.9"})
    assert code == 403


# -- bad input ---------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_bad_deliveries_get_precise_answers(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path)
    await add_job(daemon)
    raw = json.dumps(prediction("processing")).encode()

    code, body = await post(daemon, raw)
    assert code == 401 and body["reason"] == "missing_signature_headers", body
    code, body = await deliver(daemon, prediction("processing"), "msg_w", secret=WRONG)
    assert code == 401 and body["reason"] == "signature_mismatch"
    code, body = await deliver(daemon, prediction("processing"), "msg_old", skew=-301)
    assert code == 401 and body["reason"] == "timestamp_outside_tolerance"
    headers = signed_headers(raw, "msg_m")
    headers["webhook-signature"] = "v1 garbage,,"
    code, body = await post(daemon, raw, headers)
    assert code == 401 and body["reason"] == "malformed_signature_header"
    headers["webhook-timestamp"] = "yesterday"
    code, body = await post(daemon, raw, headers)
    assert code == 401 and body["reason"] == "malformed_timestamp"
    assert (await get_job(daemon))["status"] == "queued"

    not_json = b"status=succeeded"
    code, body = await post(daemon, not_json, signed_headers(not_json, "msg_nj"))
    assert code == 400 and body["error"] == "invalid_json"
    array = b"[1, 2]"
    code, body = await post(daemon, array, signed_headers(array, "msg_arr"))
    assert code == 400
    odd = b'{"hello": "world"}'
    code, body = await post(daemon, odd, signed_headers(odd, "msg_odd"))
    assert code == 400 and body["error"] == "invalid_payload"

    code, body = await deliver(daemon, prediction("succeeded", pid="pred-nobody"), "msg_unknown")
    assert code == 202 and body == {"status": "ignored", "reason": "unknown_job"}

    big = b'{"id": "pred-1", "status": "processing", "pad": "' + b"x" * (1024 * 1024) + b'"}'
    code, body = await post(daemon, big, signed_headers(big, "msg_big"))
    assert code == 413

    code, body = await deliver(daemon, prediction("processing"), "msg_np")
    assert code == 200
    code, body = await post(daemon, raw, signed_headers(raw, "msg_other"), path="/api/webhooks/nobody")
    assert code == 404

    # Every signature refusal was audited with its reason; nothing was 5xx.
    reasons = [json.loads(r["details"])["reason"] for r in audit_rows(daemon, "webhook_rejected")]
    assert reasons == ["missing_signature_headers", "signature_mismatch", "timestamp_outside_tolerance",
                       "malformed_signature_header", "malformed_timestamp"]


@pytest_twisted.ensureDeferred
async def test_a_flood_of_rejected_webhooks_does_not_grow_the_audit_log(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path, trusted=[], allowed=["10.0.0.0/8"])
    raw = json.dumps(prediction("processing")).encode()
    codes = []
    for batch in range(10):
        results = await defer.gatherResults([
            defer.ensureDeferred(post(daemon, raw, signed_headers(raw, f"msg_{batch}_{i}")))
            for i in range(40)])
        codes += [code for code, _ in results]
    assert codes == [403] * 400
    assert len(audit_rows(daemon, "webhook_rejected")) == 5
    await daemon.ctx.audit.flush_sampler(force=True)
    rows = audit_rows(daemon, "webhook_rejected")
    assert len(rows) == 6
    aggregate = rows[-1]
    assert aggregate["action"] == "aggregate" and aggregate["ip"] == "127.0.0.1"
    assert json.loads(aggregate["details"])["suppressed"] == 395
    assert daemon.ctx.webhooks.counters["rejected_ip"] == 400


# -- the secret fetched from Replicate ----------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_the_secret_is_fetched_from_replicate_when_not_in_secrets(make_daemon, tmp_path):
    from tests.replicate_env import start_env

    env = await start_env(make_daemon, tmp_path)
    try:
        daemon = env.daemon
        await add_job(daemon)
        secret = env.fake.state.webhook_secret
        code, body = await deliver(daemon, prediction("processing", predict_time=1.0), "msg_f1", secret=secret)
        assert code == 200 and body["status"] == "applied", body
        code, _ = await deliver(daemon, prediction("succeeded", predict_time=2.0), "msg_f2", secret=secret)
        assert code == 200
        fetches = env.fake.state.requests_to("GET", "/v1/webhooks/default/secret")
        assert len(fetches) == 1  # cached
        code, body = await deliver(daemon, prediction("failed"), "msg_f3", secret=WRONG)
        assert code == 401
    finally:
        await env.fake.stop()


# -- audit over HTTP ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_audit_api_lists_and_verify_names_an_edited_entry(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path)
    ids = [await daemon.ctx.audit.record("job.submitted", actor=f"user{i % 2}", target=f"job-{i}",
                                         details={"i": i}) for i in range(12)]
    headers = daemon.admin_headers

    response = await treq.get(daemon.url + "/api/audit?event_type=job.submitted&actor=user1&limit=3",
                              headers=headers)
    page = await response.json()
    assert response.code == 200
    assert page["total"] == 6 and len(page["entries"]) == 3
    assert [e["target"] for e in page["entries"]] == ["job-11", "job-9", "job-7"]
    assert page["entries"][0]["details"] == {"i": 11}
    # S18: ISO 8601 UTC with milliseconds, in ``timestamp`` (and ``time``).
    assert page["entries"][0]["timestamp"] == page["entries"][0]["time"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", page["entries"][0]["timestamp"])
    response = await treq.get(daemon.url + "/api/audit?event_type=job.submitted&actor=user1&limit=3&offset=3",
                              headers=headers)
    assert [e["target"] for e in (await response.json())["entries"]] == ["job-5", "job-3", "job-1"]
    response = await treq.get(daemon.url + "/api/audit?since=2000-01-01T00:00:00Z&until=1999-01-01",
                              headers=headers)
    assert response.code == 400
    response = await treq.get(daemon.url + "/api/audit?limit=abc", headers=headers)
    assert response.code == 400
    response = await treq.get(daemon.url + "/api/audit")
    assert response.code == 401

    response = await treq.get(daemon.url + "/api/audit/verify", headers=headers)
    report = await response.json()
    assert report["valid"] is True and report["checked"] >= 12

    conn = connect(daemon.ctx.database_path)
    try:
        conn.execute("UPDATE audit_log SET actor = 'someone-else' WHERE id = ?", (ids[7],))
    finally:
        conn.close()
    response = await treq.get(daemon.url + "/api/audit/verify", headers=headers)
    report = await response.json()
    assert report["valid"] is False and report["first_broken_id"] == ids[7]


@pytest_twisted.ensureDeferred
async def test_concurrent_copies_of_one_delivery_apply_once(make_daemon, tmp_path):
    daemon = await start_daemon(make_daemon, tmp_path)
    await add_job(daemon)
    raw = json.dumps(prediction("succeeded", predict_time=10.0)).encode()
    headers = signed_headers(raw, "msg_same")
    results = await defer.gatherResults([defer.ensureDeferred(post(daemon, raw, headers))
                                         for _ in range(8)])
    statuses = sorted(body["status"] for _, body in results)
    assert statuses == ["applied"] + ["duplicate"] * 7
    assert len(audit_rows(daemon, "job.status_changed")) == 1
    assert (await get_job(daemon))["cost_usd"] == pytest.approx(10.0 * 0.001525 * 2)


@pytest_twisted.ensureDeferred
async def test_a_terminal_delivery_is_one_write_transaction(make_daemon, tmp_path):
    """The status change, the credential revocation, the audit entry and the replay record commit
    together: no second transaction (and fsync) afterwards to revoke the credentials again."""
    daemon = await start_daemon(make_daemon, tmp_path)
    await add_job(daemon, status="running")
    creds = daemon.ctx.upload_credentials
    access_key_id, _ = await creds.issue("job-1")
    assert (await creds.lookup(access_key_id)).active(daemon.ctx.now())
    db = daemon.ctx.db
    writes = []
    for name in ("run_write", "run_write_grouped"):
        original = getattr(db, name)
        setattr(db, name, lambda fn, *a, _name=name, _original=original, **k:
                writes.append(_name) or _original(fn, *a, **k))
    try:
        code, body = await deliver(daemon, prediction("succeeded", predict_time=10.0), "msg-terminal")
    finally:
        del db.run_write, db.run_write_grouped
    assert code == 200 and body["job_status"] == "completed", body
    assert writes == ["run_write_grouped"]
    cred = await creds.lookup(access_key_id)
    assert cred is not None and not cred.active(daemon.ctx.now())  # revoked, and not kept active
