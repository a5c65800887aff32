"""The parameters of a ListObjects / ListObjectsV2 request (pure: no I/O)."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Optional

from stdaemon.s3.errors import S3Error


@dataclass(frozen=True)
class Listing:
    prefix: str
    delimiter: str
    max_keys: int
    #: ``encoding-type=url``: keys and prefixes are URL-encoded in the answer
    url: bool
    #: ``list-type=2`` (ListObjectsV2)
    v2: bool
    #: list keys after this one (V1 ``marker``; V2 ``start-after`` or the continuation token's key)
    after: str
    token: Optional[str] = None
    start_after: str = ""
    fetch_owner: bool = False


def parse_listing(query: dict[str, str]) -> Listing:
    delimiter = query.get("delimiter", "")
    encoding = query.get("encoding-type", "")
    if encoding and encoding != "url":
        raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
    try:
        max_keys = int(query.get("max-keys", "1000"))
    except ValueError:
        raise S3Error("InvalidArgument", "Provided max-keys not an integer or within integer range") from None
    if max_keys < 0:
        raise S3Error("InvalidArgument", "max-keys must be non-negative")
    max_keys = min(max_keys, 1000)
    prefix = query.get("prefix", "")
    url = encoding == "url"
    if query.get("list-type") != "2":
        return Listing(prefix, delimiter, max_keys, url, False, query.get("marker", ""))
    token = query.get("continuation-token")
    start_after = query.get("start-after", "")
    after = start_after
    if token:
        try:
            after = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
            if not after:
                raise ValueError("empty continuation token")
        except (ValueError, UnicodeError):
            raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from None
    return Listing(prefix, delimiter, max_keys, url, True, after, token, start_after,
                   query.get("fetch-owner") == "true")


def continuation_token(page: dict) -> Optional[str]:
    """The V2 token that continues after a truncated page."""
    if not page["truncated"]:
        return None
    return base64.urlsafe_b64encode(page["next_marker"].encode("utf-8")).decode("ascii")
