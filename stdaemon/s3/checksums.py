"""The ``x-amz-checksum-*`` algorithms S3 clients send (pure, incremental).

Each algorithm runs in C, from the library botocore itself uses for it:

* CRC32: ``zlib.crc32`` (what botocore computes without the AWS CRT);
* CRC32C: the ``crc32c`` package (SSE 4.2 / ARMv8 instructions, a table in C otherwise);
* CRC64/NVME: ``awscrt.checksums.crc64nvme``, the AWS common runtime that botocore needs to send
  it at all (``boto3[crt]``);
* SHA-1/SHA-256: ``hashlib``.

When ``crc32c`` or ``awscrt`` cannot be imported, the table-driven pure-Python CRCs below are used
instead: the same values, hundreds of times slower (:func:`native` tells which is in use).
Every checksum is transmitted as base64 of the big-endian digest.
"""

from __future__ import annotations

import base64
import hashlib
import zlib
from typing import Any, Callable, Iterable, Optional

ALGORITHMS = ("crc32", "crc32c", "crc64nvme", "sha1", "sha256")

_native: dict[str, Optional[Callable[[Any, int], int]]] = {}


def _c_function(algorithm: str) -> Optional[Callable[[Any, int], int]]:
    """The C function of a CRC (``None`` when its library cannot be imported), imported on first
    use: the AWS runtime is a large module that a daemon never asked for CRC64/NVME does not load."""
    if algorithm not in _native:
        try:
            if algorithm == "crc32c":
                from crc32c import crc32c as function
            else:
                from awscrt.checksums import crc64nvme as function
        except ImportError:
            function = None
        _native[algorithm] = function
    return _native[algorithm]


def load_native() -> None:
    """Import the C CRC libraries now.  Blocking (``awscrt`` takes tens of milliseconds): the S3
    service calls it in its pool shortly after the daemon is ready, so no upload's request imports
    them on the reactor."""
    for algorithm in ("crc32c", "crc64nvme"):
        _c_function(algorithm)


def native(algorithm: str) -> bool:
    """The algorithm runs in C here (``False``: the pure-Python fallback is in use)."""
    return algorithm.lower() not in ("crc32c", "crc64nvme") or _c_function(algorithm.lower()) is not None


def _reflected_table(poly: int, width: int) -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ poly if crc & 1 else crc >> 1
        table.append(crc & ((1 << width) - 1))
    return tuple(table)


_CRC32C_POLY = 0x82F63B78
_CRC64NVME_POLY = 0x9A6C9329AC4BC9B5


class _Crc:
    """A CRC kept as the running value of a C function ``crc(data, previous) -> int`` (the
    convention of ``zlib.crc32``, ``crc32c.crc32c`` and ``awscrt.checksums``: start at 0, feed the
    previous result back)."""

    __slots__ = ("_function", "_value", "size")

    def __init__(self, function: Callable[[Any, int], int], size: int) -> None:
        self._function = function
        self._value = 0
        self.size = size

    def update(self, data: Any) -> None:
        self._value = self._function(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(self.size, "big")


class _TableCrc:
    """The fallback: a reflected table-driven CRC in pure Python."""

    _tables: dict = {}

    def __init__(self, poly: int, width: int) -> None:
        table = self._tables.get(poly)
        if table is None:
            table = self._tables[poly] = _reflected_table(poly, width)
        self._table = table
        self._mask = (1 << width) - 1
        self._value = self._mask
        self.size = width // 8

    def update(self, data: Any) -> None:
        crc = self._value
        table = self._table
        for byte in data:
            crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
        self._value = crc

    def digest(self) -> bytes:
        return (self._value ^ self._mask).to_bytes(self.size, "big")


def _crc32(data: Any, previous: int) -> int:
    return zlib.crc32(data, previous) & 0xFFFFFFFF


def new_checksum(algorithm: str):
    """A fresh incremental checksum object with ``update(bytes)`` and ``digest()``."""
    algorithm = algorithm.lower()
    if algorithm == "crc32":
        return _Crc(_crc32, 4)
    if algorithm in ("crc32c", "crc64nvme"):
        function = _c_function(algorithm)
        if algorithm == "crc32c":
            return _Crc(function, 4) if function is not None else _TableCrc(_CRC32C_POLY, 32)
        return _Crc(function, 8) if function is not None else _TableCrc(_CRC64NVME_POLY, 64)
    if algorithm in ("sha1", "sha256"):
        return hashlib.new(algorithm)
    raise ValueError(f"unsupported checksum algorithm {algorithm!r}")


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def algorithm_from_header(name: str) -> Optional[str]:
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
