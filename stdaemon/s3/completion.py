"""What a multipart Complete must satisfy, and the checksum the object gets from its parts: pure
rules shared by both storage backends (local disk: :mod:`stdaemon.s3.multipart`; an S3-compatible
store: :mod:`stdaemon.s3.backing_records`)."""

from __future__ import annotations

import base64
from typing import Callable, Mapping, Optional

from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.errors import StorageError

MIN_PART_SIZE = 5 * 1024 * 1024


def check_complete(parts: list, part_record: Callable[[int], Optional[dict]]) -> list[dict]:
    """The records of the parts a Complete lists (``[(number, etag[, {checksums}])]``), in order,
    checked as S3 checks them: ascending distinct numbers, each part there with that ETag and the
    checksums listed, every part but the last at least ``MIN_PART_SIZE`` (both storage backends;
    ``part_record(number)`` is the part's record or None)."""
    parts = [(p[0], p[1], p[2] if len(p) > 2 else {}) for p in parts]
    if not parts:
        raise StorageError("MalformedXML", "The XML you provided was not well-formed or did not validate "
                           "against our published schema.")
    numbers = [n for n, _, _ in parts]
    if numbers != sorted(numbers) or len(set(numbers)) != len(numbers):
        raise StorageError("InvalidPartOrder", "The list of parts was not in ascending order. The parts "
                           "list must be specified in order by part number.")
    metas = []
    for index, (number, etag, listed) in enumerate(parts):
        record = part_record(number)
        given = etag.strip().strip('"').lower()
        if record is None or not given or record.get("md5") != given \
                or not _part_checksums_match(listed, record.get("checksums") or {}):
            raise StorageError("InvalidPart", "One or more of the specified parts could not be found. The "
                               "part may not have been uploaded, or the specified entity tag may not match "
                               "the part's entity tag.", PartNumber=number)
        if index < len(parts) - 1 and record["size"] < MIN_PART_SIZE:
            raise StorageError("EntityTooSmall", "Your proposed upload is smaller than the minimum "
                               "allowed object size.", PartNumber=number)
        metas.append(record)
    return metas


def parts_checksum(upload: Mapping, metas: list, object_checksum: Optional[tuple[str, str]]
                   ) -> tuple[Optional[tuple[dict, str]], str, Optional[str]]:
    """Complete's checksum where the parts decide it (both storage backends):
    ``(answer, algorithm, given)``. ``answer`` is ``({algorithm: value}, checksum type)`` — the
    COMPOSITE checksum over the parts' checksums, or none — or None when a FULL_OBJECT checksum of
    the assembled object is needed; ``given`` is the value sent on Complete (or None). A composite
    value given on Complete that does not match is refused (``BadDigest``)."""
    algorithm = (upload.get("checksum_algorithm") or "").lower()
    if object_checksum is not None:
        algorithm = object_checksum[0]
    composite = None
    if algorithm in s3_checksums.ALGORITHMS and metas \
            and all(algorithm in (m.get("checksums") or {}) for m in metas):
        try:
            joined = b"".join(base64.b64decode(m["checksums"][algorithm], validate=True) for m in metas)
        except ValueError:
            joined = None
        if joined is not None:
            composite = f"{s3_checksums.checksum_b64(algorithm, joined)}-{len(metas)}"
    full_object = (upload.get("checksum_type") or "").upper() == "FULL_OBJECT"
    if object_checksum is None and not (full_object and algorithm in s3_checksums.ALGORITHMS):
        return (({algorithm: composite}, "COMPOSITE") if composite else ({}, "")), algorithm, None
    given = object_checksum[1].strip() if object_checksum is not None else None
    if given is not None and "-" in given:
        if composite is None or given != composite:
            raise StorageError("BadDigest", f"The {algorithm.upper()} you specified did not match the "
                               "calculated checksum.")
        return ({algorithm: composite}, "COMPOSITE"), algorithm, given
    return None, algorithm, given


def _part_checksums_match(listed: Mapping[str, str], stored: Mapping[str, str]) -> bool:
    """Checksums a Complete lists for a part (``ChecksumCRC32`` …) against what it was uploaded with."""
    for element, value in listed.items():
        algorithm = element[len("Checksum"):].lower()
        if algorithm not in s3_checksums.ALGORITHMS or not value:
            continue  # ChecksumType and friends: not a part checksum
        if stored.get(algorithm) != value.strip():
            return False
    return True
