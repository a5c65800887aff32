"""Standard Webhooks signature verification (S6) — pure, no I/O, no clock.

Replicate signs webhooks the Standard Webhooks way:

- headers ``webhook-id``, ``webhook-timestamp`` (POSIX seconds) and
  ``webhook-signature``: space-separated ``v1,<base64 HMAC>`` items (a
  sender rotating its secret sends several; other versions are skipped);
- the signed content is ``"{id}.{timestamp}.{body}"`` (the raw body bytes);
- the key is the base64-decoded part of the secret after ``whsec_``;
- the timestamp must be within ``tolerance`` (300 s) of ``now`` (passed in by
  the caller from its injected clock), either way.

:func:`verify` never raises: it returns a :class:`Verification` whose
``reason`` is one of the ``REASON_*`` codes below (``ok`` when valid), so
the HTTP layer can answer 401 and audit the precise reason.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import math
from dataclasses import dataclass
from typing import Mapping, Optional

TOLERANCE_SECONDS = 300
SECRET_PREFIX = "whsec_"
MAX_HEADER = 8192
MAX_ID = 256

REASON_OK = "ok"
REASON_MISSING_HEADERS = "missing_signature_headers"
REASON_MALFORMED_ID = "malformed_webhook_id"
REASON_MALFORMED_TIMESTAMP = "malformed_timestamp"
REASON_STALE = "timestamp_outside_tolerance"
REASON_MALFORMED_SIGNATURE = "malformed_signature_header"
REASON_NO_V1 = "no_v1_signature"
REASON_MISMATCH = "signature_mismatch"
REASON_BAD_SECRET = "invalid_secret"


class SecretError(ValueError):
    """The configured webhook secret cannot be decoded."""


@dataclass(frozen=True)
class Verification:
    valid: bool
    reason: str
    webhook_id: Optional[str] = None
    timestamp: Optional[int] = None

    def __bool__(self) -> bool:
        return self.valid


def decode_secret(secret: str | bytes) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret (raises :class:`SecretError`)."""
    if isinstance(secret, bytes):
        try:
            secret = secret.decode("ascii")
        except UnicodeDecodeError:
            raise SecretError("webhook secret is not ASCII") from None
    if not isinstance(secret, str):
        raise SecretError("webhook secret must be a string")
    text = secret.strip()
    if text.startswith(SECRET_PREFIX):
        text = text[len(SECRET_PREFIX):]
    if not text:
        raise SecretError("webhook secret is empty")
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise SecretError("webhook secret is not valid base64 after whsec_") from None
    if not key:
        raise SecretError("webhook secret is empty")
    return key


@functools.lru_cache(maxsize=16)   # a daemon checks against one or two secrets per provider
def _decoded_secret(secret: str | bytes) -> bytes:
    """:func:`decode_secret`, worked out once per secret rather than once per delivery."""
    return decode_secret(secret)


def sign(key: bytes, webhook_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64>`` for the given content (the daemon's own test helper)."""
    content = f"{webhook_id}.{timestamp}.".encode("utf-8") + body
    digest = hmac.new(key, content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


def _header(headers: Mapping[str, str], name: str) -> Optional[str]:
    value = headers.get(name)
    if value is None:
        # Callers may hand a plain dict with any capitalisation.
        for key, candidate in headers.items():
            if isinstance(key, str) and key.lower() == name:
                value = candidate
                break
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return "\x00"  # not ASCII: reported as malformed by the caller
    return value


def verify(secret: str | bytes, headers: Mapping[str, str], body: bytes, now: float,
           tolerance: float = TOLERANCE_SECONDS) -> Verification:
    """Check a delivery's signature.  ``headers`` maps lower-case names to values."""
    try:
        return _verify(secret, headers, body, now, tolerance)
    except Exception:  # never let a verifier bug become a 500
        return Verification(False, REASON_MALFORMED_SIGNATURE)


def _verify(secret: str | bytes, headers: Mapping[str, str], body: bytes, now: float,
            tolerance: float) -> Verification:
    webhook_id = _header(headers, "webhook-id")
    raw_timestamp = _header(headers, "webhook-timestamp")
    raw_signature = _header(headers, "webhook-signature")
    if not webhook_id or not raw_timestamp or not raw_signature:
        return Verification(False, REASON_MISSING_HEADERS)
    if len(webhook_id) > MAX_ID or not webhook_id.isascii() or not webhook_id.isprintable():
        return Verification(False, REASON_MALFORMED_ID)
    text = raw_timestamp.strip()
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        return Verification(False, REASON_MALFORMED_TIMESTAMP, webhook_id)
    timestamp = int(text)
    if not math.isfinite(now) or abs(now - timestamp) > tolerance:
        return Verification(False, REASON_STALE, webhook_id, timestamp)
    if len(raw_signature) > MAX_HEADER or not raw_signature.isascii():
        return Verification(False, REASON_MALFORMED_SIGNATURE, webhook_id, timestamp)
    candidates: list[bytes] = []
    items = raw_signature.split()
    if not items:
        return Verification(False, REASON_MALFORMED_SIGNATURE, webhook_id, timestamp)
    for item in items:
        version, sep, value = item.partition(",")
        if not sep or not version or not value:
            return Verification(False, REASON_MALFORMED_SIGNATURE, webhook_id, timestamp)
        if version != "v1":
            continue  # another scheme (v1a, …): not ours to check
        try:
            candidates.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            return Verification(False, REASON_MALFORMED_SIGNATURE, webhook_id, timestamp)
    if not candidates:
        return Verification(False, REASON_NO_V1, webhook_id, timestamp)
    try:
        key = _decoded_secret(secret)
    except SecretError:
        return Verification(False, REASON_BAD_SECRET, webhook_id, timestamp)
    content = f"{webhook_id}.{text}.".encode("utf-8") + body
    expected = hmac.digest(key, content, "sha256")   # one C call (OpenSSL's one-shot HMAC)
    matched = False
    for candidate in candidates:  # try every entry; no early exit on a match
        matched |= hmac.compare_digest(expected, candidate)
    if matched:
        return Verification(True, REASON_OK, webhook_id, timestamp)
    return Verification(False, REASON_MISMATCH, webhook_id, timestamp)
