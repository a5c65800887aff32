"""Validation of S3 bucket names and object keys so nothing escapes the storage root (pure)."""

from __future__ import annotations

import re
from urllib.parse import unquote

MAX_KEY_BYTES = 1024
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.\-_]{1,61}[a-z0-9]$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_DRIVE_RE = re.compile(r"^[A-Za-z]:")


class InvalidKey(ValueError):
    """The key or bucket name is not acceptable; ``code`` is the S3 error code."""

    def __init__(self, message: str, code: str = "InvalidArgument"):
        super().__init__(message)
        self.code = code
        self.message = message


def validate_bucket(name: str) -> str:
    if not _BUCKET_RE.match(name or "") or ".." in name:
        raise InvalidKey("The specified bucket is not valid.", "InvalidBucketName")
    return name


def _segments_ok(text: str) -> bool:
    for segment in text.split("/"):
        if segment in (".", ".."):
            return False
    return True


def validate_key(key: str) -> str:
    """Return ``key`` when it is a safe relative object key, else raise :class:`InvalidKey`.

    Refused: empty keys, more than 1024 UTF-8 bytes, NUL or other control characters,
    backslashes, absolute paths, ``.``/``..`` segments, and the same disguised by
    (repeated) percent-encoding.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("Object key must not be empty")
    try:
        encoded = key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKey("Object key must be valid UTF-8") from None
    if len(encoded) > MAX_KEY_BYTES:
        raise InvalidKey("Your key is too long", "KeyTooLongError")
    candidates = [key]
    decoded = key
    for _ in range(3):  # %2e%2e, %252e%252e, … must not slip through a later decode
        nxt = unquote(decoded)
        if nxt == decoded:
            break
        candidates.append(nxt)
        decoded = nxt
    for text in candidates:
        if _CONTROL_RE.search(text):
            raise InvalidKey("Object key must not contain control characters")
        if "\\" in text:
            raise InvalidKey("Object key must not contain backslashes")
        if text.startswith("/") or _DRIVE_RE.match(text):
            raise InvalidKey("Object key must be a relative path")
        if not _segments_ok(text):
            raise InvalidKey("Object key must not contain '.' or '..' segments")
        if "//" in text:
            raise InvalidKey("Object key must not contain empty path segments")
    return key


def key_under_prefix(key: str, prefix: str) -> bool:
    """True when ``key`` lies inside ``prefix`` (a prefix ends with ``/`` or is empty)."""
    if not prefix:
        return True
    if not prefix.endswith("/"):
        prefix += "/"
    return key.startswith(prefix)
