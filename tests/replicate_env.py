"""A daemon wired to the TLS fake Replicate (and optionally tinyproxy) for end-to-end tests."""

from __future__ import annotations

import json
import os

import treq
from twisted.internet import defer, reactor

from tests.fake_replicate import FakeReplicate

PUBLIC_URL = "https://daemon.example.test"


class RecordingAudit:
    """Captures audit events when the real audit writer is not installed."""

    def __init__(self):
        self.events = []

    async def record(self, event_type, **fields):
        self.events.append({"event_type": event_type, **fields})

    def record_soon(self, event_type, sampled=False, **fields):
        return defer.ensureDeferred(self.record(event_type, **fields))

    def of(self, event_type):
        return [e for e in self.events if e["event_type"] == event_type]


def audit_events(env, event_type):
    """Audit entries of ``event_type``, from the real audit table when the
    writer is installed, else from the recording stand-in."""
    if env.audit is not None:
        return env.audit.of(event_type)
    from stdaemon.store.database import connect

    conn = connect(env.ctx.database_path)
    try:
        rows = conn.execute("SELECT event_type, actor, ip, target, action, details FROM audit_log "
                            "WHERE event_type = ? ORDER BY id", (event_type,)).fetchall()
    finally:
        conn.close()
    return [{"event_type": r[0], "actor": r[1], "ip": r[2], "target": r[3], "action": r[4],
             "details": json.loads(r[5])} for r in rows]


class ReplicateEnv:
    def __init__(self, daemon, fake, bundle, audit):
        self.daemon = daemon
        self.fake = fake
        self.bundle = bundle
        self.audit = audit

    @property
    def ctx(self):
        return self.daemon.ctx

    def url(self, path):
        return self.daemon.url + path

    async def call(self, method, path, body=None, headers=None, key=None):
        hdrs = {"X-API-Key": key or self.daemon.admin_key}
        hdrs.update(headers or {})
        kwargs = {"headers": hdrs}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode() if not isinstance(body, bytes) else body
            hdrs.setdefault("Content-Type", "application/json")
        response = await treq.request(method, self.url(path), **kwargs)
        text = await response.text()
        try:
            data = json.loads(text) if text else None
        except ValueError:
            data = text
        return response, data

    async def submit(self, headers=None, **fields):
        body = {"config": {"model_family": "flux", "max_train_steps": 10},
                "dataloader_config": [{"id": "ds", "type": "local"}],
                "config_name": "test-config"}
        body.update(fields)
        return await self.call("POST", "/api/cloud/jobs/submit?provider=replicate", body, headers=headers)


async def start_env(make_daemon, tmp_path, provider_settings=None, env=None, clock=None,
                    settings=None):
    fake = await FakeReplicate(reactor).start()
    bundle = fake.write_ca_bundle(tmp_path / "replicate-ca.pem")
    secrets_path = tmp_path / "secrets.json"
    secrets_path.write_text(json.dumps({"REPLICATE_API_TOKEN": fake.state.token}))
    os.chmod(secrets_path, 0o600)
    replicate = {"api_base_url": fake.url, "ssl_ca_bundle": bundle,
                 "model_versions": {"default": "ver-default", "h100-x2": "ver-h100x2"},
                 "http_timeout": 5}
    replicate.update(provider_settings or {})
    config = {"server": {"public_url": PUBLIC_URL},
              "secrets": {"file": str(secrets_path)},
              "jobs": {"poll_interval": 30},
              "providers": {"replicate": replicate}}
    for section, values in (settings or {}).items():
        config.setdefault(section, {}).update(values)
    daemon = await make_daemon(settings=config, env=env, clock=clock)
    audit = None
    if daemon.ctx.audit is None:
        audit = daemon.ctx.audit = RecordingAudit()
    return ReplicateEnv(daemon, fake, bundle, audit)
