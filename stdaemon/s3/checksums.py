"""The ``x-amz-checksum-*`` algorithms S3 clients send (pure, incremental).

CRC32 uses ``zlib`` (what botocore defaults to without the AWS CRT). CRC32C and CRC64/NVME are
table-driven pure Python: correct but slow, and only used when a client explicitly asks for them
(botocore needs the optional CRT package to send them at all). SHA-1/SHA-256 use ``hashlib``.
Every checksum is transmitted as base64 of the big-endian digest.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Iterable

ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")


def _reflected_table(poly: int, width: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc & ((1 << width) - 1))
    return tuple(table)


_CRC32C_TABLE = _reflected_table(0x82F63B78, 32)
_CRC64NVME_TABLE = _reflected_table(0x9A6C9329AC4BC9B5, 64)


class _Crc32:
    size = 4

    def __init__(self) -> None:
        self._value = 0

    def update(self, data: bytes) -> None:
        self._value = zlib.crc32(data, self._value)

    def digest(self) -> bytes:
        return (self._value & 0xFFFFFFFF).to_bytes(4, "big")


class _TableCrc:
    def __init__(self, table: tuple[int, ...], width: int) -> None:
        self._table = table
        self._mask = (1 << width) - 1
        self._value = self._mask
        self.size = width // 8

    def update(self, data: bytes) -> None:
        crc = self._value
        table = self._table
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self._value = crc

    def digest(self) -> bytes:
        return (self._value ^ self._mask).to_bytes(self.size, "big")


class _Hash:
    def __init__(self, name: str) -> None:
        self._hash = hashlib.new(name)

    def update(self, data: bytes) -> None:
        self._hash.update(data)

    def digest(self) -> bytes:
        return self._hash.digest()


def new_checksum(algorithm: str):
    """A fresh incremental checksum object with ``update(bytes)`` and ``digest()``."""
    algorithm = algorithm.lower()
    if algorithm == "crc32":
        return _Crc32()
    if algorithm == "crc32c":
        return _TableCrc(_CRC32C_TABLE, 32)
    if algorithm == "crc64nvme":
        return _TableCrc(_CRC64NVME_TABLE, 64)
    if algorithm in ("sha1", "sha256"):
        return _Hash(algorithm)
    raise ValueError(f"unsupported checksum algorithm {algorithm!r}")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def algorithm_from_header(name: str) -> str | None:
    """``x-amz-checksum-crc32`` → ``crc32`` (``None`` when not a checksum header we know)."""
    name = name.lower()
    prefix = "x-amz-checksum-"
    if not name.startswith(prefix):
        return None
    algorithm = name[len(prefix):]
    return algorithm if algorithm in ALGORITHMS else None


def requested_algorithms(names: Iterable[str]) -> list[str]:
    """The algorithms of the ``x-amz-checksum-<algorithm>`` headers among lower-case header
    ``names``, each once, in the order they came."""
    found: list[str] = []
    for name in names:
        if name.startswith("x-amz-checksum-"):
            algorithm = algorithm_from_header(name)
            if algorithm and algorithm not in found:
                found.append(algorithm)
    return found


def checksum_b64(algorithm: str, data: bytes) -> str:
    state = new_checksum(algorithm)
    state.update(data)
    return b64(state.digest())
