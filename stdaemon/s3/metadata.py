"""Object metadata S3 stores from a PutObject/CreateMultipartUpload and returns on GET/HEAD (pure).

System metadata: ``Content-Type`` and the headers in :data:`SYSTEM_HEADERS`; user metadata: every
``x-amz-meta-<name>`` header (names lower case, as S3 keeps them). Values are kept exactly as their
bytes arrived (decoded one byte per character, Latin-1), so a client gets back the very bytes it
sent, UTF-8 or not; :func:`wire` turns a stored value back into those bytes.
"""

from __future__ import annotations

from typing import Iterable, Optional

#: System metadata headers stored with an object, with the case S3 answers them in.
SYSTEM_HEADERS = {
    "cache-control": "Cache-Control",
    "content-disposition": "Content-Disposition",
    "content-encoding": "Content-Encoding",
    "content-language": "Content-Language",
    "expires": "Expires",
}
USER_PREFIX = "x-amz-meta-"
#: S3's limit on the user-defined metadata of one object (names and values, in bytes).
MAX_USER_METADATA_BYTES = 2048


class MetadataTooLarge(ValueError):
    code = "MetadataTooLarge"
    message = "Your metadata headers exceed the maximum allowed metadata size."


def from_headers(items: Iterable[tuple[str, str]]) -> tuple[Optional[str], dict, dict]:
    """``(content type, system headers, user metadata)`` from ``(lower-case name, value)`` pairs.

    ``aws-chunked`` is a transfer detail of the upload, not the object's encoding: it is dropped
    from ``Content-Encoding`` (and the header with it when nothing else is left)."""
    content_type = None
    system: dict = {}
    user: dict = {}
    for name, value in items:
        if name == "content-type":
            content_type = value
        elif name in SYSTEM_HEADERS:
            if name == "content-encoding":
                codings = [c.strip() for c in value.split(",") if c.strip() and c.strip().lower() != "aws-chunked"]
                if not codings:
                    continue
                value = ", ".join(codings)
            system[SYSTEM_HEADERS[name]] = value
        elif name.startswith(USER_PREFIX) and len(name) > len(USER_PREFIX):
            user[name[len(USER_PREFIX):]] = value
    size = sum(len(k) + len(v) for k, v in user.items())
    if size > MAX_USER_METADATA_BYTES:
        raise MetadataTooLarge(MetadataTooLarge.message)
    return content_type, system, user


def wire(value: str) -> bytes:
    """The bytes a stored value arrived as (values from older sidecars may hold any text)."""
    try:
        return value.encode("latin-1")
    except UnicodeEncodeError:
        return value.encode("utf-8")
