"""The storage seam of the S3 endpoint: what :class:`~stdaemon.s3.service.S3Service` asks of the
place objects are kept, and nothing more.

Two implementations: :class:`stdaemon.s3.multipart.StorageEngine` (local disk, the default) and
:class:`stdaemon.s3.backing_store.BackingStore` (an S3-compatible store through boto3, shared by
several instances). ``storage.backend`` chooses one in ``build_app``.

Every method except :meth:`ObjectBackend.start`, :meth:`ObjectBackend.has_bucket`,
:meth:`ObjectBackend.follow_bucket_root` and :meth:`ObjectBackend.upload_exists` blocks: the service runs them in its ``s3-io`` pool. Each
takes ``now`` where it records a time; none reads the clock. Errors are
:class:`~stdaemon.s3.errors.StorageError` (S3 codes) or :class:`~stdaemon.s3.keys.InvalidKey`.

An upload is received the same way by both: ``begin_put``/``begin_part`` return a
:class:`~stdaemon.s3.objects.PendingWrite` (a local temp file, hashed while written); the surface
verifies its digests and only then calls ``commit_put``/``commit_part``, which make it the object
(or the part). A commit that returns has stored the body durably; its answer is sent after.
"""

from __future__ import annotations

import os
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional, Protocol

from stdaemon.s3.credentials import UPLOAD_BUCKET
from stdaemon.s3.multipart import StorageEngine
from stdaemon.s3.objects import ObjectInfo, PartInfo, PendingWrite


class ObjectReader(Protocol):
    """An opened object's bytes: ``seek`` then ``read`` blocks of it; ``close`` when done."""

    def seek(self, offset: int) -> Any: ...

    def read(self, size: int) -> bytes: ...

    def close(self) -> None: ...


class ObjectBackend(Protocol):
    # -- on the reactor thread ------------------------------------------------------------
    async def start(self) -> None:
        """Prepare what the store needs (its keys resolved from secrets); run again hourly."""

    def has_bucket(self, name: str) -> bool: ...

    def follow_bucket_root(self, name: str, root: str) -> None:
        """The local directory of bucket ``name`` is now ``root`` (``s3_output_path`` changed)."""

    def upload_exists(self, bucket: str, upload_id: str) -> bool:
        """Whether a multipart upload is known to be in progress (no network call)."""

    # -- blocking ---------------------------------------------------------------------------
    def check(self) -> str:
        """A cheap probe that the store answers (health); ``StorageError`` when it does not."""

    def upload_active(self, bucket: str, upload_id: str) -> bool:
        """Whether the multipart upload is in progress (asks the store)."""

    def list_buckets(self) -> list[tuple[str, float]]: ...

    def startup_cleanup(self) -> int: ...

    def cleanup_stale(self, now: float, max_age: float) -> int: ...

    def begin_put(self, bucket: str, key: str, checksum_algorithms: Iterable[str] = (),
                  max_size: Optional[int] = None, sha256: bool = True) -> PendingWrite: ...

    def commit_put(self, bucket: str, key: str, pending: PendingWrite, now: float,
                   content_type: Optional[str] = None, metadata: Optional[dict] = None,
                   checksums: Optional[dict] = None, headers: Optional[dict] = None,
                   if_match: Optional[str] = None, if_none_match: bool = False) -> ObjectInfo: ...

    def head(self, bucket: str, key: str) -> ObjectInfo: ...

    def open_read(self, bucket: str, key: str) -> tuple[ObjectReader, ObjectInfo]: ...

    def delete(self, bucket: str, key: str) -> None: ...

    def list_objects(self, bucket: str, prefix: str = "", delimiter: str = "", start_after: str = "",
                     max_keys: int = 1000) -> dict: ...

    def create_multipart(self, bucket: str, key: str, now: float, content_type: Optional[str] = None,
                         metadata: Optional[dict] = None, checksum_algorithm: Optional[str] = None,
                         headers: Optional[dict] = None, checksum_type: Optional[str] = None) -> str: ...

    def begin_part(self, bucket: str, key: str, upload_id: str, part_number: int,
                   checksum_algorithms: Iterable[str] = (), sha256: bool = True,
                   expected_size: Optional[int] = None) -> PendingWrite: ...

    def commit_part(self, bucket: str, key: str, upload_id: str, part_number: int, pending: PendingWrite,
                    now: float, checksums: Optional[dict] = None) -> PartInfo: ...

    def list_parts(self, bucket: str, key: str, upload_id: str) -> tuple[dict, list[PartInfo]]: ...

    def list_uploads(self, bucket: str) -> list[tuple[str, dict]]: ...

    def complete_multipart(self, bucket: str, key: str, upload_id: str, parts: list, now: float,
                           object_checksum: Optional[tuple[str, str]] = None, if_match: Optional[str] = None,
                           if_none_match: bool = False) -> ObjectInfo: ...

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None: ...


def object_backend(storage: Any, outputs_dir: str, default_spool: str, now: float, environ: Mapping[str, str],
                   secret: Callable[[str], Awaitable[Optional[str]]]) -> ObjectBackend:
    """The store ``storage.backend`` names: the outputs directory on local disk (the default), or
    an S3-compatible store (bodies spooled in ``storage.spool_dir``, else ``default_spool``; the
    store's keys resolved by ``secret``)."""
    if storage.backend == "s3":
        spool = os.path.expanduser(storage.spool_dir) if storage.spool_dir else default_spool
        # Imported only when configured (at build time, not in a request): the default local
        # backend starts without the S3 client side.
        from stdaemon.s3.backing_store import BackingStore

        return BackingStore(storage, spool, (UPLOAD_BUCKET,), created_at=now, environ=environ, secret=secret)
    return StorageEngine({UPLOAD_BUCKET: outputs_dir}, created_at=now)
