"""Per-job S3 upload credentials (S8).

A job gets, at submission, an access key id (its upload token) and a secret. SigV4 clients never
send the secret, so it must be recoverable: it is stored encrypted (Fernet, key in a 0600 key file
``<state>/config/cloud/upload_credentials.key``) plus a SHA-256 hash used to recognise the plain
``X-Upload-Token``/``X-SimpleTuner-Secret`` header. A credential is valid only for its bucket and
prefix (``outputs`` / ``<job_id>/``, i.e. ``outputs/<job_id>/…``), until it is revoked (the job
reached a terminal status) or expires (``jobs.upload_credential_ttl``; a reactor timer sweeps).
A job submitted with ``resume_from_job`` may also *read* that job's prefix (:meth:`read_prefixes`).

Use from other capabilities (``ctx.upload_credentials``)::

    access_key_id, secret = await ctx.upload_credentials.issue(job_id)   # the secret, once
    await ctx.upload_credentials.revoke(job_id)                          # terminal status

The job's upload target is bucket :data:`UPLOAD_BUCKET` with key prefix :func:`upload_prefix`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import sqlite3
from dataclasses import dataclass
from typing import Any, Optional

from cryptography.fernet import Fernet, InvalidToken

from stdaemon.logs import get_logger

log = get_logger("stdaemon.store.credentials")

UPLOAD_BUCKET = "outputs"
DEFAULT_BUCKET = UPLOAD_BUCKET
TERMINAL = ("completed", "failed", "cancelled")
ACCESS_KEY_PREFIX = "STUP"


@dataclass(frozen=True)
class UploadCredential:
    access_key_id: str
    job_id: str
    bucket: str
    prefix: str
    secret: str
    expires_at: float
    revoked_at: Optional[float] = None

    def active(self, now: float) -> bool:
        return self.revoked_at is None and now < self.expires_at


def upload_prefix(job_id: str) -> str:
    """The key prefix a job's credentials may write under (``<job_id>/``)."""
    return f"{job_id}/"


def load_or_create_key(path: str) -> bytes:
    """The Fernet key from ``path`` (created 0600 when absent; tightened to 0600 if others could read it)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = os.stat(path).st_mode & 0o077
        if mode:
            os.chmod(path, 0o600)
        with open(path, "rb") as fh:
            return fh.read().strip()
    key = Fernet.generate_key()
    with os.fdopen(fd, "wb") as fh:
        fh.write(key)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


# ---------------------------------------------------------------- SQL helpers (conn first)


def insert(conn: sqlite3.Connection, access_key_id: str, job_id: str, bucket: str, prefix: str,
           secret_enc: bytes, digest: str, now: float, expires_at: float) -> None:
    conn.execute(
        "INSERT INTO upload_credentials (access_key_id, job_id, bucket, prefix, secret_enc, secret_hash,"
        " created_at, expires_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (access_key_id, job_id, bucket, prefix, secret_enc, digest, now, expires_at),
    )


def revoke(conn: sqlite3.Connection, job_id: str, now: float) -> int:
    return conn.execute(
        "UPDATE upload_credentials SET revoked_at = ? WHERE job_id = ? AND revoked_at IS NULL", (now, job_id)
    ).rowcount


def expire(conn: sqlite3.Connection, now: float) -> list[str]:
    rows = conn.execute(
        "SELECT access_key_id FROM upload_credentials WHERE revoked_at IS NULL AND expires_at <= ?", (now,)
    ).fetchall()
    conn.execute("UPDATE upload_credentials SET revoked_at = ? WHERE revoked_at IS NULL AND expires_at <= ?",
                 (now, now))
    return [row[0] for row in rows]


def find(conn: sqlite3.Connection, column: str, value: str) -> Optional[tuple]:
    assert column in ("access_key_id", "secret_hash")
    row = conn.execute(
        "SELECT c.access_key_id, c.job_id, c.bucket, c.prefix, c.secret_enc, c.expires_at, c.revoked_at,"
        " j.status FROM upload_credentials c LEFT JOIN jobs j ON j.job_id = c.job_id"
        f" WHERE c.{column} = ?",
        (value,),
    ).fetchone()
    return tuple(row) if row is not None else None


def job_metadata(conn: sqlite3.Connection, job_id: str) -> Optional[tuple]:
    row = conn.execute("SELECT metadata FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
    return tuple(row) if row is not None else None


class UploadCredentials:
    """Issue, look up, revoke and expire upload credentials (``ctx.upload_credentials``)."""

    def __init__(self, ctx: Any, key_path: Optional[str] = None, ttl: Optional[float] = None):
        self.ctx = ctx
        self.key_path = key_path or ctx.path("config", "cloud", "upload_credentials.key")
        self.ttl = float(ttl if ttl is not None else ctx.config.jobs.upload_credential_ttl)
        self._fernet: Optional[Fernet] = None
        # access key id → credential; short-lived cache, dropped on revoke/expiry
        self._cache: dict[str, UploadCredential] = {}
        # job id → prefixes its credentials may also read (resume_from_job)
        self._reads: dict[str, tuple] = {}

    @property
    def fernet(self) -> Fernet:
        if self._fernet is None:
            self._fernet = Fernet(load_or_create_key(self.key_path))
        return self._fernet

    def install_timer(self, interval: float = 60.0) -> None:
        self.ctx.add_timer("upload-credential-expiry", interval, self.sweep)

    async def issue(self, job_id: str) -> tuple[str, str]:
        """New ``(access_key_id, secret)`` valid only for the job's prefix (the secret's only exit)."""
        issued = await self.issue_scoped(job_id)
        return issued["access_key_id"], issued["secret_access_key"]

    async def issue_scoped(self, job_id: str, bucket: str = DEFAULT_BUCKET, prefix: Optional[str] = None,
                           ttl: Optional[float] = None) -> dict:
        """New credentials for ``job_id`` with an explicit scope/lifetime (dict incl. the secret)."""
        now = self.ctx.clock.seconds()
        prefix = prefix if prefix is not None else upload_prefix(job_id)
        access_key_id = ACCESS_KEY_PREFIX + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        encrypted = self.fernet.encrypt(secret.encode("utf-8"))
        expires_at = now + (self.ttl if ttl is None else float(ttl))
        await self.ctx.db.run_write(insert, access_key_id, job_id, bucket, prefix, encrypted,
                                    secret_hash(secret), now, expires_at)
        self._remember(UploadCredential(access_key_id, job_id, bucket, prefix, secret, expires_at))
        return {"access_key_id": access_key_id, "secret_access_key": secret, "bucket": bucket,
                "prefix": prefix, "expires_at": expires_at}

    async def revoke(self, job_id: str) -> int:
        """Invalidate every credential of the job (idempotent)."""
        return await self.revoke_job(job_id)

    async def revoke_job(self, job_id: str) -> int:
        count = await self.ctx.db.run_write(revoke, job_id, self.ctx.clock.seconds())
        for key, cred in list(self._cache.items()):
            if cred.job_id == job_id:
                del self._cache[key]
        return count

    async def sweep(self) -> list[str]:
        """Expire credentials past their lifetime (the reactor timer calls this)."""
        expired = await self.ctx.db.run_write(expire, self.ctx.clock.seconds())
        for key in expired:
            self._cache.pop(key, None)
        if expired:
            log.info("Expired {count} upload credentials", count=len(expired))
        return expired

    def _decode(self, row: tuple) -> Optional[UploadCredential]:
        access_key_id, job_id, bucket, prefix, secret_enc, expires_at, revoked_at, status = row
        try:
            secret = self.fernet.decrypt(bytes(secret_enc)).decode("utf-8")
        except (InvalidToken, UnicodeDecodeError):
            log.error("Upload credential {key} cannot be decrypted with the key file", key=access_key_id)
            return None
        if status in TERMINAL and revoked_at is None:
            revoked_at = self.ctx.clock.seconds()
        return UploadCredential(access_key_id, job_id, bucket, prefix, secret, expires_at, revoked_at)

    async def lookup(self, access_key_id: str) -> Optional[UploadCredential]:
        """The credential for ``access_key_id`` if it exists (active or not)."""
        cached = self._cache.get(access_key_id)
        if cached is not None:
            return cached
        if not access_key_id.startswith(ACCESS_KEY_PREFIX) or len(access_key_id) > 64:
            return None
        row = await self.ctx.db.run_read(find, "access_key_id", access_key_id)
        if row is None:
            return None
        cred = self._decode(row)
        if cred is not None and cred.active(self.ctx.clock.seconds()) and row[7] not in TERMINAL:
            self._remember(cred)
        return cred

    def _remember(self, cred: UploadCredential) -> None:
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[cred.access_key_id] = cred

    async def lookup_token(self, token: str) -> Optional[UploadCredential]:
        """The credential whose secret is ``token`` (the plain header form)."""
        if not token or len(token) > 256:
            return None
        row = await self.ctx.db.run_read(find, "secret_hash", secret_hash(token))
        if row is None:
            return None
        cred = self._decode(row)
        if cred is None or not hmac.compare_digest(cred.secret.encode(), token.encode()):
            return None
        return cred

    async def read_prefixes(self, cred: UploadCredential) -> tuple:
        """Prefixes the credential may also read (never write): the one of the job its job was
        submitted to resume from (job metadata ``resume_from_job``)."""
        cached = self._reads.get(cred.job_id)
        if cached is not None:
            return cached
        row = await self.ctx.db.run_read(job_metadata, cred.job_id)
        try:
            resumed = json.loads(row[0]).get("resume_from_job") if row is not None else None
        except (ValueError, AttributeError):
            resumed = None
        prefixes = (upload_prefix(resumed),) if isinstance(resumed, str) and resumed else ()
        if len(self._reads) > 10_000:
            self._reads.clear()
        self._reads[cred.job_id] = prefixes  # set once at submission: never changes
        return prefixes

    async def check_job_active(self, cred: UploadCredential) -> bool:
        """Re-read the job's status: a terminal job's credentials stop working at once."""
        row = await self.ctx.db.run_read(find, "access_key_id", cred.access_key_id)
        if row is None or row[6] is not None or row[7] in TERMINAL:
            self._cache.pop(cred.access_key_id, None)
            return False
        return self.ctx.clock.seconds() < row[5]


def install(ctx: Any) -> UploadCredentials:
    """Install the durable implementation as ``ctx.upload_credentials`` (with its expiry timer)."""
    creds = UploadCredentials(ctx)
    ctx.upload_credentials = creds
    creds.install_timer()
    return creds


def install_default(ctx: Any) -> Any:
    """Kept for callers written against the first interface: installs the durable store."""
    if getattr(ctx, "upload_credentials", None) is None:
        install(ctx)
    return ctx.upload_credentials
