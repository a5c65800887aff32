"""The configuration schema: frozen, typed sections with their defaults.

Every key an operator can set lives here, once.  The loader (``loader.py``)
coerces raw values from YAML, INI and the environment into these types and
reports errors with the full key path.  ``config/stdaemon.yaml`` and
``config/stdaemon.ini`` document the same keys; ``tests/test_config.py``
checks that both example files cover every key listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping

DEFAULT_LISTEN = ("tcp:8080:interface=127.0.0.1",)


def _frozen_mapping(value: Mapping | None = None) -> Mapping:
    return MappingProxyType(dict(value or {}))


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = DEFAULT_LISTEN
    public_url: str = ""
    state_dir: str = "~/.simpletuner"
    trusted_proxies: tuple[str, ...] = ()
    max_body_bytes: int = 1024 * 1024
    ssl_cert: str = ""
    ssl_key: str = ""
    shutdown_timeout: float = 10.0
    health_cache_seconds: float = 1.0


@dataclass(frozen=True)
class LoggingConfig:
    level: str = "INFO"
    format: str = "text"
    file: str = ""


@dataclass(frozen=True)
class RateLimitConfig:
    enabled: bool = True
    calls: int = 100
    period: int = 60
    backend: str = "memory"
    redis_url: str = "redis://127.0.0.1:6379/0"
    sqlite_path: str = ""
    exempt_loopback: bool = True
    fail_open: bool = True
    timeout: float = 0.5
    # Custom rules, each ``{pattern, calls, period, methods}``; matched before
    # the built-in table.
    rules: tuple = ()


@dataclass(frozen=True)
class SecretsConfig:
    file: str = ""
    aws_secret_name: str = ""
    aws_region: str = ""
    vault_addr: str = ""
    vault_path: str = "simpletuner"
    vault_mount: str = "secret"
    cache_ttl: float = 300.0


@dataclass(frozen=True)
class BackupConfig:
    enabled: bool = False
    dir: str = ""
    interval: float = 86400.0
    keep_days: int = 30
    keep_count: int = 10
    compress: bool = True


@dataclass(frozen=True)
class MetricsConfig:
    prometheus_enabled: bool = False
    prometheus_categories: tuple[str, ...] = ("jobs", "http", "health")
    bearer_token: str = ""


@dataclass(frozen=True)
class AuthConfig:
    registration_enabled: bool = False
    session_ttl: float = 86400.0


@dataclass(frozen=True)
class JobsConfig:
    poll_interval: float = 30.0
    upload_credential_ttl: float = 7 * 86400.0
    # Body cap of job submissions (inline configs can be large); its own key
    # because every other JSON body is bounded by server.max_body_bytes.
    max_submit_bytes: int = 8 * 1024 * 1024


@dataclass(frozen=True)
class AuditConfig:
    retention_days: int = 365
    key_file: str = ""


@dataclass(frozen=True)
class DatabaseConfig:
    # "" = the embedded SQLite file (<state_dir>/config/cloud/jobs.db);
    # postgresql://user:password@host:port/dbname = PostgreSQL (several instances may share it).
    url: str = ""
    # Reader threads, each with its own connection (the one writer is extra).
    pool_size: int = 2


@dataclass(frozen=True)
class StorageConfig:
    """Where the S3 endpoint keeps objects: ``local`` (the state directory, the default) or ``s3``
    (an S3-compatible store reached through boto3; several instances can share it)."""

    backend: str = "local"
    endpoint_url: str = ""
    region: str = ""
    bucket: str = ""
    prefix: str = ""
    addressing_style: str = "auto"
    access_key_id_secret: str = ""
    secret_access_key_secret: str = ""
    ssl_verify: bool = True
    ssl_ca_bundle: str = ""
    multipart_threshold: int = 64 * 1024 * 1024
    spool_dir: str = ""


@dataclass(frozen=True)
class ClusterConfig:
    """Several instances sharing one Redis (``stdaemon/cluster/``); ``redis_url`` "" = one instance."""

    redis_url: str = ""
    # "" = <hostname>-<pid>; names this instance in logs, health and lease values
    instance_id: str = ""
    # seconds a run-once timer's lease lives in Redis unless its holder renews it
    lease_seconds: float = 30.0
    # prefix of the Redis keys and the pub/sub channel (instances of one deployment share it)
    namespace: str = "stdaemon"
    # seconds per Redis call (and per connection attempt)
    timeout: float = 1.0


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    rate_limit: RateLimitConfig = field(default_factory=RateLimitConfig)
    secrets: SecretsConfig = field(default_factory=SecretsConfig)
    backup: BackupConfig = field(default_factory=BackupConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # ``providers.<name>.<field>`` as given in the file (validated by the
    # provider settings module); values are plain Python types.
    providers: Mapping[str, Mapping[str, Any]] = field(default_factory=_frozen_mapping)
    # Where each non-default value came from: ``{"server.listen": "file"}``.
    sources: Mapping[str, str] = field(default_factory=_frozen_mapping)
    # Environment snapshot taken once at load time (proxy, CA, timeout
    # defaults for outbound HTTP and the like), so nothing else reads
    # ``os.environ`` behind the config's back.
    environ: Mapping[str, str] = field(default_factory=_frozen_mapping)
    config_file: str = ""


SECTIONS: dict[str, type] = {
    f.name: f.default_factory().__class__  # type: ignore[misc]
    for f in fields(Config)
    if f.name not in ("providers", "sources", "environ", "config_file")
}
