"""What a client says its body hashes to, checked against what was received (pure: no I/O).

``x-amz-content-sha256`` (the signed payload hash), ``Content-MD5`` and ``x-amz-checksum-*``, for
uploads (hashes computed as the body was written) and for small XML bodies (hashed here). Every
mismatch is an :class:`~stdaemon.s3.errors.S3Error` with the code S3 answers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from typing import Iterable, Optional

from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.errors import S3Error


def sha256_mismatch() -> S3Error:
    return S3Error("XAmzContentSHA256Mismatch",
                   "The provided 'x-amz-content-sha256' header does not match what was computed.")


def checksum_mismatch(algorithm: str) -> S3Error:
    return S3Error("BadDigest", f"The {algorithm.upper()} you specified did not match the calculated checksum.")


def check_payload_sha256(payload_hash: str, computed_hex: Optional[str]) -> None:
    """The signed payload hash (64 hex digits) against the body's SHA-256."""
    if computed_hex is None or not hmac.compare_digest(payload_hash.lower(), computed_hex):
        raise sha256_mismatch()


def check_content_md5(header: str, md5_digest: bytes, strict_length: bool = False) -> None:
    """``Content-MD5`` (base64) against the body's MD5: ``InvalidDigest`` when it does not decode
    (or, with ``strict_length``, is not 16 bytes long), ``BadDigest`` when it differs."""
    try:
        given = base64.b64decode(header.strip(), validate=True)
    except ValueError:
        raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.") from None
    if strict_length and len(given) != 16:
        raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.")
    if not hmac.compare_digest(given, md5_digest):
        raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")


def check_small_body(body: bytes, payload_hash: Optional[str], content_md5: Optional[str],
                     header_items: Iterable[tuple[str, str]]) -> None:
    """Payload hash (when the caller signed one), Content-MD5 and ``x-amz-checksum-*`` of a small
    XML body; ``header_items`` are the request's (lower-case name, value) pairs whose checksums
    apply to this body (none for CompleteMultipartUpload, whose checksums describe the object)."""
    if payload_hash is not None and len(payload_hash) == 64:
        check_payload_sha256(payload_hash, hashlib.sha256(body).hexdigest())
    if content_md5 is not None:
        check_content_md5(content_md5, hashlib.md5(body).digest())
    for name, value in header_items:
        algorithm = s3_checksums.algorithm_from_header(name)
        if algorithm and not hmac.compare_digest(value.strip().encode(),
                                                 s3_checksums.checksum_b64(algorithm, body).encode()):
            raise checksum_mismatch(algorithm)
