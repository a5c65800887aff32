"""Per-job upload credentials (S8): the interface the jobs code uses.

At submission the jobs code calls ``await ctx.upload_credentials.issue(job_id)``
and hands the returned ``(access_key_id, secret)`` to the trainer as the
``s3_access_key``/``s3_secret_key`` prediction inputs, together with the
job's upload target (:data:`UPLOAD_BUCKET`, :func:`upload_prefix`).  When the
job ends (completed, failed, cancelled) or its submission fails,
``await ctx.upload_credentials.revoke(job_id)`` is called.

The storage capability owns the durable implementation (secret encrypted at
rest, expiry timer, lookup by the S3 surface).  :class:`EphemeralUploadCredentials`
is the minimal stand-in used until it is installed: it keeps credentials in
memory only, so they do not survive a restart.
"""

from __future__ import annotations

import secrets as _secrets
from typing import Any, Optional, Protocol

UPLOAD_BUCKET = "outputs"


def upload_prefix(job_id: str) -> str:
    """The key prefix a job's credentials may write under (``<job_id>/``)."""
    return f"{job_id}/"


class UploadCredentials(Protocol):
    async def issue(self, job_id: str) -> tuple[str, str]:
        """New ``(access_key_id, secret)`` valid only for the job's prefix."""

    async def revoke(self, job_id: str) -> None:
        """Invalidate every credential of the job (idempotent)."""


class EphemeralUploadCredentials:
    """In-memory credentials (placeholder until the storage capability installs its own)."""

    def __init__(self, clock: Any, ttl: float = 7 * 86400.0):
        self._clock = clock
        self._ttl = ttl
        self._by_key: dict[str, dict] = {}

    async def issue(self, job_id: str) -> tuple[str, str]:
        access_key_id = "STU" + _secrets.token_hex(8).upper()
        secret = _secrets.token_urlsafe(30)
        self._by_key[access_key_id] = {
            "job_id": job_id,
            "secret": secret,
            "expires_at": self._clock.seconds() + self._ttl,
            "revoked": False,
        }
        return access_key_id, secret

    async def revoke(self, job_id: str) -> None:
        for entry in self._by_key.values():
            if entry["job_id"] == job_id:
                entry["revoked"] = True

    def lookup(self, access_key_id: str) -> Optional[tuple[str, str]]:
        """``(job_id, secret)`` for a live credential, else None."""
        entry = self._by_key.get(access_key_id)
        if entry is None or entry["revoked"] or entry["expires_at"] <= self._clock.seconds():
            return None
        return entry["job_id"], entry["secret"]

    def active_for(self, job_id: str) -> list[str]:
        now = self._clock.seconds()
        return [key for key, e in self._by_key.items()
                if e["job_id"] == job_id and not e["revoked"] and e["expires_at"] > now]


def install_default(ctx: Any) -> Any:
    """Install the in-memory stand-in unless a real implementation is present."""
    if getattr(ctx, "upload_credentials", None) is None:
        ttl = getattr(getattr(ctx.config, "jobs", None), "upload_credential_ttl", 7 * 86400.0)
        ctx.upload_credentials = EphemeralUploadCredentials(ctx.clock, ttl)
    return ctx.upload_credentials
