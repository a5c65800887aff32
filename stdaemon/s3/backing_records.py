"""The records the ``s3`` storage backend keeps next to objects in the backing store, and the
checks of a multipart Complete made on them (pure: no I/O; :mod:`stdaemon.s3.backing_store` reads
and writes them).

Every record is a small JSON object. An object's record names the backing ETag it describes, so a
record left behind by an overwrite or a crash is recognised and ignored.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, fields
from typing import Any, Mapping, Optional

from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.errors import StorageError
from stdaemon.s3.keys import InvalidKey, validate_key
from stdaemon.s3.completion import check_complete as multipart_check_complete, parts_checksum
from stdaemon.s3.objects import FOLDER_MARKER, SYSTEM_DIR, ObjectInfo, PartInfo

_INFO_FIELDS = {f.name for f in fields(ObjectInfo)}


def check_key(key: str) -> str:
    """The keys the local store accepts are the keys this one accepts (the same answers)."""
    validate_key(key)
    if key.split("/", 1)[0] == SYSTEM_DIR or key.rsplit("/", 1)[-1] == FOLDER_MARKER:
        raise InvalidKey("This key is reserved")
    return key


def key_digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def valid_upload_id(upload_id: str) -> bool:
    return isinstance(upload_id, str) and len(upload_id) == 32 and all(c in "0123456789abcdef" for c in upload_id)


def upload_id_of(name: str) -> Optional[str]:
    """The upload id of an upload record's name (``…/uploads/<id>.json``)."""
    last = name.rsplit("/", 1)[-1]
    if not last.endswith(".json"):
        return None
    upload_id = last[:-len(".json")]
    return upload_id if valid_upload_id(upload_id) else None


def part_number_of(name: str) -> Optional[int]:
    last = name.rsplit("/", 1)[-1]
    if len(last) != len("00001.json") or not last.endswith(".json") or not last[:5].isdigit():
        return None
    return int(last[:5])


#: Content types some S3-compatible servers (moto's, and others built on web frameworks) read as a
#: form and so lose the body of: the object's own type stays in its record.
FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def native_content_type(content_type: Optional[str]) -> str:
    """The ``Content-Type`` the object is stored with in the backing store (for people browsing it)."""
    if not content_type or content_type.split(";", 1)[0].strip().lower() in FORM_TYPES:
        return "binary/octet-stream"
    return content_type


def decode(data: bytes) -> Optional[dict]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


# -- objects ----------------------------------------------------------------------------------


def object_record(info: ObjectInfo, backing_etag: str) -> dict:
    record = asdict(info)
    record["backing_etag"] = backing_etag
    return record


def describes(record: Any, key: str, backing_etag: str, size: Optional[int] = None) -> bool:
    """Whether ``record`` is the record of the object ``key`` whose backing ETag is ``backing_etag``."""
    return isinstance(record, dict) and record.get("key") == key and record.get("backing_etag") == backing_etag \
        and (size is None or record.get("size") == size)


def object_info(key: str, record: Optional[dict], backing_etag: str, size: int, last_modified: float,
                content_type: Optional[str]) -> ObjectInfo:
    """What stdaemon answers about an object: its record when it describes this very object, else
    what the store says (an object written by another tool, or a crash before the record)."""
    if describes(record, key, backing_etag, size):
        try:
            return ObjectInfo(**{k: v for k, v in record.items() if k in _INFO_FIELDS})
        except TypeError:
            pass
    return ObjectInfo(key=key, size=size, etag=backing_etag, last_modified=last_modified,
                      content_type=content_type or "binary/octet-stream")


def answered_etag(record: Optional[dict], key: str, backing_etag: str) -> str:
    if describes(record, key, backing_etag) and isinstance(record.get("etag"), str):
        return record["etag"]
    return backing_etag


# -- multipart --------------------------------------------------------------------------------


def part_record(info: PartInfo, md5_hex: str, backing_etag: str, crc32: Optional[str] = None) -> dict:
    """A part's record; ``crc32`` (kept for every part) makes a whole-object CRC32 computable at
    Complete without reading the parts back."""
    record = asdict(info)
    record.update(md5=md5_hex, backing_etag=backing_etag, crc32=crc32)
    return record


def part_info(record: Mapping) -> PartInfo:
    return PartInfo(record["part_number"], record["size"], record["etag"], record["last_modified"],
                    dict(record.get("checksums") or {}))


def completed_record(info: ObjectInfo, now: float) -> dict:
    return {"key": info.key, "completed_at": now,
            "completed": {"etag": info.etag, "size": info.size, "last_modified": info.last_modified,
                          "checksums": info.checksums, "checksum_type": info.checksum_type, "parts": info.parts}}


def completed_info(record: Optional[dict], key: str) -> Optional[ObjectInfo]:
    if not isinstance(record, dict) or record.get("key") != key or not isinstance(record.get("completed"), dict):
        return None
    done = record["completed"]
    return ObjectInfo(key=key, size=done.get("size", 0), etag=done.get("etag", ""),
                      last_modified=done.get("last_modified", 0.0), checksums=done.get("checksums") or {},
                      checksum_type=done.get("checksum_type", ""), parts=done.get("parts", 0))


def check_complete(parts: list, records: Mapping[int, dict]) -> list[dict]:
    """The records of the parts a Complete lists, checked as the local store checks them
    (:func:`stdaemon.s3.completion.check_complete`)."""
    return multipart_check_complete(parts, records.get)


def object_checksums(upload: Mapping, metas: list, object_checksum: Optional[tuple[str, str]]
                     ) -> tuple[dict, str, Optional[tuple[str, Optional[str]]]]:
    """``(checksums, checksum type, full object)`` of the assembled object, as the local store
    computes them. A FULL_OBJECT CRC is combined from the parts' CRCs (checked before anything is
    assembled); ``full object`` is ``(algorithm, given value or None)`` when it cannot be (SHA
    checksums, or parts sent without that CRC) and must be computed over the assembled bytes."""
    answer, algorithm, given = parts_checksum(upload, metas, object_checksum)
    if answer is not None:
        return answer[0], answer[1], None
    combined = combined_crc(algorithm, metas)
    if combined is not None:
        if given is not None and combined != given:
            raise StorageError("BadDigest", f"The {algorithm.upper()} you specified did not match the "
                               "calculated checksum.")
        return {algorithm: combined}, "FULL_OBJECT", None
    return {}, "FULL_OBJECT", (algorithm, given)


# -- whole-object CRCs from the parts' CRCs ---------------------------------------------------

#: Reflected polynomials and widths of the CRCs S3 defines (initial value and final xor all ones).
CRC_POLYNOMIALS = {"crc32": (0xEDB88320, 32), "crc32c": (0x82F63B78, 32), "crc64nvme": (0x9A6C9329AC4BC9B5, 64)}


def _gf2_times(matrix: list[int], vector: int) -> int:
    total, index = 0, 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


def _gf2_square(matrix: list[int]) -> list[int]:
    return [_gf2_times(matrix, row) for row in matrix]


def _crc_combine(first: int, second: int, second_length: int, poly: int, width: int) -> int:
    """The CRC of ``A + B`` from ``crc(A)``, ``crc(B)`` and ``len(B)`` (zlib's ``crc32_combine``,
    for any reflected CRC whose initial value and final xor are all ones)."""
    if second_length <= 0:
        return first
    odd = [poly] + [1 << n for n in range(width - 1)]  # one zero bit
    even = _gf2_square(odd)  # two zero bits
    odd = _gf2_square(even)  # four zero bits
    while True:
        even = _gf2_square(odd)
        if second_length & 1:
            first = _gf2_times(even, first)
        second_length >>= 1
        if not second_length:
            break
        odd = _gf2_square(even)
        if second_length & 1:
            first = _gf2_times(odd, first)
        second_length >>= 1
        if not second_length:
            break
    return first ^ second


def combined_crc(algorithm: str, metas: list) -> Optional[str]:
    """The FULL_OBJECT checksum of the assembled parts, from each part's own CRC of that algorithm
    (base64 ``checksums``, or the CRC32 every part records): ``None`` when one is missing or the
    algorithm is not a CRC."""
    if algorithm not in CRC_POLYNOMIALS or not metas:
        return None
    poly, width = CRC_POLYNOMIALS[algorithm]
    total = None
    for meta in metas:
        value = (meta.get("checksums") or {}).get(algorithm) or (meta.get("crc32") if algorithm == "crc32" else None)
        if not value:
            return None
        try:
            crc = int.from_bytes(base64.b64decode(value, validate=True), "big")
        except ValueError:
            return None
        total = crc if total is None else _crc_combine(total, crc, meta["size"], poly, width)
    return s3_checksums.b64(total.to_bytes(width // 8, "big"))
