"""The pure rules of a read (GetObject, HeadObject): byte ranges, ``?partNumber=N`` and the
read preconditions (no I/O; the surface applies them to the object it opened)."""

from __future__ import annotations

from typing import Any, Optional

from stdaemon.s3 import sigv4
from stdaemon.s3.errors import S3Error


def read_precondition(etag: str, last_modified: float, if_match: Optional[str], if_none: Optional[str],
                      if_unmodified: Optional[str], if_modified: Optional[str]) -> Optional[int]:
    """412 or 304 when a GetObject/HeadObject precondition (``If-Match``, ``If-None-Match``,
    ``If-Unmodified-Since``, ``If-Modified-Since``) says so, else ``None``."""
    etag = etag.strip('"')
    if if_match is not None:
        tags = [t.strip().strip('"') for t in if_match.split(",")]
        if "*" not in tags and etag not in tags:
            return 412
    if if_none is not None:
        tags = [t.strip().strip('"') for t in if_none.split(",")]
        if "*" in tags or etag in tags:
            return 304
    if if_unmodified is not None and if_match is None:
        when = sigv4.parse_http_date(if_unmodified)
        if when is not None and int(last_modified) > when:
            return 412
    if if_modified is not None and if_none is None:
        when = sigv4.parse_http_date(if_modified)
        if when is not None and int(last_modified) <= when:
            return 304
    return None


def part_range(value: Optional[str], info: Any, range_header: Optional[str]) -> Optional[tuple[int, int]]:
    """Byte range (inclusive) of ``?partNumber=N``: part N of a multipart object, or the whole of
    any other object for N = 1 (as S3 does). ``None`` without the parameter."""
    if value is None:
        return None
    if range_header:
        raise S3Error("InvalidRequest", "Cannot specify both Range header and partNumber query parameter")
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 1 <= number <= 10000:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
    sizes = info.part_sizes or [info.size]
    if number > len(sizes):
        raise S3Error("InvalidPartNumber", "The requested partnumber is not satisfiable", 416,
                      PartNumberRequested=number, ActualPartCount=len(sizes))
    start = sum(sizes[:number - 1])
    return start, start + sizes[number - 1] - 1


def parse_range(value: str, size: int):
    """``(start, end)`` inclusive, ``None`` to ignore the header, or ``"invalid"`` (416)."""
    value = value.strip()
    if not value.startswith("bytes="):
        return None
    spec = value[len("bytes="):]
    if "," in spec:
        return None  # several ranges: S3 answers the whole object
    first, sep, last = spec.partition("-")
    if not sep:
        return None
    try:
        if first.strip() == "":
            suffix = int(last)
            if suffix <= 0:
                return "invalid"
            if size == 0:
                return "invalid"
            return max(0, size - suffix), size - 1
        start = int(first)
        end = int(last) if last.strip() else size - 1
    except ValueError:
        return None
    if start < 0:
        return None
    if start >= size:
        return "invalid"
    if end < start:
        return None
    return start, min(end, size - 1)
