"""Two ``twistd stdaemon`` processes sharing one PostgreSQL, one Redis and one S3-compatible store
(moto_server), behind a round-robin proxy on loopback, as the README's "Running several instances"
describes them. The fake Replicate runs in the test's reactor; both instances reach it over TLS.

Everything is on 127.0.0.1 with random ports and temp dirs, and is stopped afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import signal

import yaml
from cryptography.fernet import Fernet

from tests.test_process import Daemon

BUCKET = "stdaemon-outputs"


class Instance(Daemon):
    """One ``twistd -n stdaemon --config …`` (tests/test_process.Daemon) with its own state dir."""

    def __init__(self, tmp_path, name, config_path, env):
        base = tmp_path / name
        base.mkdir()
        super().__init__(base, env=env, args=("--config", config_path))
        self.name = name


class Cluster:
    """The shared files and the instances of one test; ``stop()`` ends the instances."""

    def __init__(self, tmp_path, postgres_url, redis_url, moto, fake):
        self.tmp_path = tmp_path
        self.postgres_url = postgres_url
        self.redis_url = redis_url
        self.moto = moto
        self.fake = fake
        self.instances: list[Instance] = []
        self.webhook_secret = "whsec_" + base64.b64encode(os.urandom(32)).decode()

    def write_shared_files(self, public_url):
        """The files every instance reads: the config and the secrets (provider token, the two keys
        instances must share, the webhook secret). In production the secrets live in Vault or AWS
        Secrets Manager; a shared 0600 file is the same to stdaemon."""
        secrets = {
            "REPLICATE_API_TOKEN": self.fake.state.token,
            "REPLICATE_WEBHOOK_SECRET": self.webhook_secret,
            "AUDIT_HMAC_KEY": os.urandom(32).hex(),
            "UPLOAD_CREDENTIALS_KEY": Fernet.generate_key().decode(),
        }
        secrets_path = self.tmp_path / "shared-secrets.json"
        secrets_path.write_text(json.dumps(secrets))
        os.chmod(secrets_path, 0o600)
        bundle = self.fake.write_ca_bundle(self.tmp_path / "replicate-ca.pem")
        config = {
            "server": {"public_url": public_url, "trusted_proxies": ["127.0.0.1/32"]},
            "secrets": {"file": str(secrets_path)},
            "database": {"url": self.postgres_url},
            "cluster": {"redis_url": self.redis_url},
            "rate_limit": {"backend": "redis", "redis_url": self.redis_url},
            "storage": {"backend": "s3", "endpoint_url": self.moto.url, "bucket": BUCKET,
                        "region": self.moto.region, "prefix": "stdaemon/"},
            "metrics": {"prometheus_enabled": True},
            "jobs": {"poll_interval": 3600},
            "providers": {"replicate": {"api_base_url": self.fake.url, "ssl_ca_bundle": bundle,
                                        "model_versions": {"default": "ver-default"},
                                        "http_timeout": 5}},
        }
        config_path = self.tmp_path / "shared.yaml"
        config_path.write_text(yaml.safe_dump(config))
        return str(config_path)

    def env(self):
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                "SIMPLETUNER_LOG_LEVEL": "INFO"}

    def start_instance(self, name, config_path):
        instance = Instance(self.tmp_path, name, config_path, self.env())
        self.instances.append(instance)
        return instance

    def admin_key(self):
        """The first admin key: written by whichever instance created the admin on first start."""
        for instance in self.instances:
            path = os.path.join(instance.state, "config", "cloud", "admin.key")
            if os.path.exists(path):
                with open(path) as fh:
                    return fh.read().strip()
        raise AssertionError("no instance wrote the first admin key")

    def stop(self):
        for instance in self.instances:
            if instance.proc.poll() is None:
                instance.stop(signal.SIGTERM)
