"""Reading an S3 request: the bucket and key of its URI, its query, the metadata to store with an
object, the conditions of a conditional write and a small XML body with its digests."""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import unquote_to_bytes

from stdaemon.s3 import digests, metadata as s3_metadata, sigv4
from stdaemon.s3.auth import Caller, header_items, parsed_headers
from stdaemon.s3.errors import S3Error

PREFIX = "/api/cloud/storage"
#: XML request bodies (CompleteMultipartUpload of 10 000 parts, DeleteObjects of 1 000 keys).
SMALL_BODY = 4 * 1024 * 1024


def split(raw_uri: bytes) -> tuple[str, str, str, str]:
    """(raw path, raw query, bucket, key) from the request URI; the key is percent-decoded."""
    raw = raw_uri.decode("latin-1")
    raw_path, _, raw_query = raw.partition("?")
    rest = raw_path[len(PREFIX):] if raw_path.startswith(PREFIX) else raw_path
    rest = rest.lstrip("/")
    bucket, _, key = rest.partition("/")
    try:
        bucket = unquote_to_bytes(bucket).decode("utf-8")
        key = unquote_to_bytes(key).decode("utf-8")
    except UnicodeDecodeError:
        raise S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from None
    return raw_path, raw_query, bucket, key


def splittable(raw_uri: bytes) -> bool:
    try:
        split(raw_uri)
    except S3Error:
        return False
    return True


def query_of(raw_query: str) -> dict[str, str]:
    """The query string's parameters, decoded (the last of a repeated name wins)."""
    return {n.decode("utf-8", "replace"): v.decode("utf-8", "replace") for n, v in sigv4.parse_query(raw_query)}


def stored_metadata(request: Any) -> tuple[Optional[str], dict, dict]:
    """(content type, system headers, user metadata) to store with the object."""
    try:
        return s3_metadata.from_headers(header_items(parsed_headers(request)))
    except s3_metadata.MetadataTooLarge as exc:
        raise S3Error(exc.code, exc.message) from None

def write_conditions(request: Any) -> dict:
    """``If-None-Match: *`` / ``If-Match: <etag>`` of a conditional write (PutObject, Complete)."""
    conditions: dict = {}
    if_none = request.getHeader("if-none-match")
    if if_none is not None:
        if if_none.strip() != "*":
            raise S3Error("NotImplemented", "If-None-Match on writes supports only '*'")
        conditions["if_none_match"] = True
    if_match = request.getHeader("if-match")
    if if_match is not None:
        conditions["if_match"] = if_match
    return conditions


def read_small_body(request: Any) -> bytes:
    content = request.content
    content.seek(0)
    return content.read(SMALL_BODY + 1)

def verify_small_body(request: Any, caller: Caller, body: bytes, checksums: bool = True) -> None:
    """Payload hash, Content-MD5 and x-amz-checksum-* of a small XML body."""
    claim = caller.claim
    digests.check_small_body(body, claim.payload_hash if claim is not None else None,
                             request.getHeader("content-md5"),
                             header_items(parsed_headers(request)) if checksums else ())
