"""Per-job S3 upload credentials (S8).

A job gets, at submission, an access key id (its upload token) and a secret. SigV4 clients never
send the secret, so it must be recoverable: it is stored encrypted (Fernet; the key is the secret
``UPLOAD_CREDENTIALS_KEY`` when the secrets stores hold it, else a 0600 key file
``<state>/config/cloud/upload_credentials.key`` created on first start) plus a SHA-256 hash used to recognise the plain
``X-Upload-Token``/``X-SimpleTuner-Secret`` header. A credential is valid only for its bucket and
prefix (``outputs`` / ``<job_id>/``, i.e. ``outputs/<job_id>/…``), until it is revoked (the job
reached a terminal status) or expires (``jobs.upload_credential_ttl``; a reactor timer sweeps).
A job submitted with ``resume_from_job`` may also *read* that job's prefix (:meth:`read_prefixes`).

Built once by ``build_app`` as ``app.upload_credentials`` (its SQL is :mod:`stdaemon.s3.store`)::

    access_key_id, secret = await credentials.issue(job_id)   # the secret, once
    await credentials.revoke(job_id)                          # terminal status

The job's upload target is bucket :data:`UPLOAD_BUCKET` with key prefix :func:`upload_prefix`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from typing import Any, Optional

from cryptography.fernet import Fernet, InvalidToken
from twisted.internet import defer, threads

from stdaemon.logs import get_logger
from stdaemon.s3.store import expire, find, insert, job_metadata, revoke
from stdaemon.store.database import Database

log = get_logger("stdaemon.store.credentials")

UPLOAD_BUCKET = "outputs"
DEFAULT_BUCKET = UPLOAD_BUCKET
TERMINAL = ("completed", "failed", "cancelled")
ACCESS_KEY_PREFIX = "STUP"
#: The secret that, when the secrets stores hold it, replaces the key file (S9).
SECRET_NAME = "UPLOAD_CREDENTIALS_KEY"


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


class UploadCredentials:
    """Issue, look up, revoke and expire upload credentials (``app.upload_credentials``).

    ``key_path`` is the Fernet key file, ``ttl`` the lifetime of new credentials in seconds
    (``jobs.upload_credential_ttl``); ``sweep`` is run by the ``upload-credential-expiry`` timer."""

    def __init__(self, db: Database, clock: Any, key_path: str, ttl: float):
        self.db = db
        self.clock = clock  # IReactorTime
        self.key_path = key_path
        self.ttl = float(ttl)
        self._fernet: Optional[Fernet] = None
        self.key = b""  # set by start() (or the first use of ``fernet``)
        # access key id → credential; short-lived cache, dropped on revoke/expiry
        self._cache: dict[str, UploadCredential] = {}
        # job id → prefixes its credentials may also read (resume_from_job)
        self._reads: dict[str, tuple] = {}

    @property
    def fernet(self) -> Fernet:
        if self._fernet is None:
            self.key = load_or_create_key(self.key_path)
            self._fernet = Fernet(self.key)
        return self._fernet

    #: Where the key of the running daemon came from: ``secrets`` (``UPLOAD_CREDENTIALS_KEY``) or
    #: ``file`` (the 0600 key file, created on first start).
    key_source = "file"

    async def start(self, secrets_service: Any = None) -> bytes:
        """Load the key that encrypts stored secrets: ``UPLOAD_CREDENTIALS_KEY`` from the secrets
        stores when they hold it (several instances sharing one database must share this key), else
        the key file (read in a thread). Returns the key. A value that is not a Fernet key stops
        start-up with a message naming it, rather than failing every upload later."""
        value = None
        if secrets_service is not None:
            try:
                value = await defer.maybeDeferred(secrets_service.get, SECRET_NAME)
            except Exception:
                log.failure("Could not read {name} from secrets; using the key file", name=SECRET_NAME)
                value = None
        if value:
            key = value.strip().encode("ascii", "replace")
            try:
                self._fernet, self.key = Fernet(key), key
            except ValueError:
                raise ValueError(f"secret {SECRET_NAME} is not a Fernet key (32 url-safe base64 bytes, "
                                 "as `python -c 'from cryptography.fernet import Fernet; "
                                 "print(Fernet.generate_key().decode())'` prints)") from None
            self.key_source = "secrets"
            return key
        key = await threads.deferToThread(load_or_create_key, self.key_path)
        self._fernet, self.key = Fernet(key), key
        self.key_source = "file"
        return key

    async def issue(self, job_id: str) -> tuple[str, str]:
        """New ``(access_key_id, secret)`` valid only for the job's prefix (the secret's only exit)."""
        issued = await self.issue_scoped(job_id)
        return issued["access_key_id"], issued["secret_access_key"]

    async def issue_scoped(self, job_id: str, bucket: str = DEFAULT_BUCKET, prefix: Optional[str] = None,
                           ttl: Optional[float] = None) -> dict:
        """New credentials for ``job_id`` with an explicit scope/lifetime (dict incl. the secret)."""
        now = self.clock.seconds()
        prefix = prefix if prefix is not None else upload_prefix(job_id)
        access_key_id = ACCESS_KEY_PREFIX + secrets.token_hex(8).upper()
        secret = secrets.token_urlsafe(30)
        encrypted = self.fernet.encrypt(secret.encode("utf-8"))
        expires_at = now + (self.ttl if ttl is None else float(ttl))
        await self.db.run_write(insert, access_key_id, job_id, bucket, prefix, encrypted,
                                    secret_hash(secret), now, expires_at)
        self._remember(UploadCredential(access_key_id, job_id, bucket, prefix, secret, expires_at))
        return {"access_key_id": access_key_id, "secret_access_key": secret, "bucket": bucket,
                "prefix": prefix, "expires_at": expires_at}

    async def revoke(self, job_id: str) -> int:
        """Invalidate every credential of the job (idempotent)."""
        return await self.revoke_job(job_id)

    async def revoke_job(self, job_id: str) -> int:
        count = await self.db.run_write(revoke, job_id, self.clock.seconds())
        self.forget_job(job_id)
        return count

    def forget_job(self, job_id: str) -> None:
        """Drop the kept copies of a job's credentials whose revocation the caller committed itself
        (in the transaction that made the job terminal)."""
        for key, cred in list(self._cache.items()):
            if cred.job_id == job_id:
                del self._cache[key]

    async def sweep(self) -> list[str]:
        """Expire credentials past their lifetime (the reactor timer calls this)."""
        expired = await self.db.run_write(expire, self.clock.seconds())
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
            revoked_at = self.clock.seconds()
        return UploadCredential(access_key_id, job_id, bucket, prefix, secret, expires_at, revoked_at)

    async def lookup(self, access_key_id: str) -> Optional[UploadCredential]:
        """The credential for ``access_key_id`` if it exists (active or not)."""
        cached = self._cache.get(access_key_id)
        if cached is not None:
            return cached
        if not access_key_id.startswith(ACCESS_KEY_PREFIX) or len(access_key_id) > 64:
            return None
        row = await self.db.run_read(find, "access_key_id", access_key_id)
        if row is None:
            return None
        cred = self._decode(row)
        if cred is not None and cred.active(self.clock.seconds()) and row[7] not in TERMINAL:
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
        row = await self.db.run_read(find, "secret_hash", secret_hash(token))
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
        row = await self.db.run_read(job_metadata, cred.job_id)
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
        row = await self.db.run_read(find, "access_key_id", cred.access_key_id)
        if row is None or row[6] is not None or row[7] in TERMINAL:
            self._cache.pop(cred.access_key_id, None)
            return False
        return self.clock.seconds() < row[5]

