"""The S3 operations the storage surface calls (S8): the object store's blocking work run in the
``s3-io`` thread pool, the ``outputs`` bucket following ``s3_output_path``, job-scoped listings,
multipart uploads, and upload progress as objects are committed.

Built once by ``build_app`` as ``app.s3``; the surface (:mod:`stdaemon.s3.http`) parses requests,
checks who may do what, calls this service and shapes the S3 answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer

from stdaemon.health.service import DEGRADED, HEALTHY, Component
from stdaemon.logs import get_logger
from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.auth import Caller
from stdaemon.s3.credentials import UPLOAD_BUCKET
from stdaemon.s3.errors import StorageError
from stdaemon.s3.keys import InvalidKey, validate_key
from stdaemon.s3.backend import ObjectBackend
from stdaemon.s3.objects import ObjectInfo, PartInfo, PendingWrite
from stdaemon.s3.progress import UploadProgress
from stdaemon.threads import BlockingPool

log = get_logger("stdaemon.http.storage")

#: Multipart uploads (and records of completed ones) older than this are removed by the timer.
MULTIPART_MAX_AGE = 7 * 86400.0
#: Seconds the ``object_store`` health probe waits for the backing store.
HEALTH_TIMEOUT = 5.0


@dataclass
class Target:
    """What an upload writes: an object, or one part of a multipart upload."""

    bucket: str
    key: str
    upload_id: Optional[str] = None
    part_number: Optional[int] = None


class BodyBudget:
    """Upload body bytes held in memory (queued on the reactor or being written by the pool),
    summed over every connection: each upload's own queue is bounded, but many at once would add
    up. Over :attr:`high` a connection that receives more is paused; once the sum is back under
    :attr:`low`, every connection paused for it is offered to resume (its own queue decides)."""

    def __init__(self, high: int = 24 * 1024 * 1024, low: int = 12 * 1024 * 1024):
        self.high = high
        self.low = low
        self.held = 0
        self._waiting: set = set()   # sinks paused because of the sum

    def add(self, size: int) -> None:
        self.held += size

    def remove(self, size: int) -> None:
        self.held -= size
        if self._waiting and self.held <= self.low:
            waiting, self._waiting = self._waiting, set()
            for sink in waiting:
                sink.resume_if_drained()

    def over(self) -> bool:
        return self.held > self.high

    def wait(self, sink: Any) -> None:
        self._waiting.add(sink)

    def forget(self, sink: Any) -> None:
        self._waiting.discard(sink)


class S3Service:
    """The storage behind the S3 endpoint (``app.s3``).

    ``outputs_root`` answers where the ``outputs`` bucket lives now (``App.outputs_root``: the
    provider setting ``s3_output_path`` when set, else ``<state>/outputs``); ``cleanup`` is run by
    the ``s3-multipart-cleanup`` timer."""

    def __init__(self, engine: ObjectBackend, pool: BlockingPool, progress: UploadProgress, clock: Any,
                 outputs_root: Callable[[], str], multipart_max_age: float = MULTIPART_MAX_AGE):
        self.engine = engine
        self.pool = pool
        self.progress = progress
        self.clock = clock  # IReactorTime
        self.outputs_root = outputs_root
        self.multipart_max_age = multipart_max_age
        self._cleaned_at_start = False
        self.body_budget = BodyBudget()

    # -- plumbing ------------------------------------------------------------------------------

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
        """Run blocking storage work in the ``s3-io`` pool."""
        return self.pool.run(fn, *args, **kwargs)

    async def start(self) -> None:
        """Before the daemon is ready: whatever the store needs first (its keys from secrets)."""
        await self.engine.start()

    def load_checksum_libraries(self) -> defer.Deferred:
        """Import the C CRC libraries in the pool (once the daemon is ready, so the import does
        not delay it): an aws-chunked upload's decoder runs on the reactor, and the first one
        asking for CRC32C or CRC64/NVME must not import them there."""
        return self.run(s3_checksums.load_native).addErrback(
            lambda failure: log.failure("Loading the checksum libraries failed", failure=failure))

    async def cleanup(self) -> None:
        await self.engine.start()  # rotated store keys are picked up within the timer's interval
        self.refresh_buckets()
        if not self._cleaned_at_start:
            self._cleaned_at_start = True
            await self.run(self.engine.startup_cleanup)
        removed = await self.run(self.engine.cleanup_stale, self.clock.seconds(), self.multipart_max_age)
        if removed:
            log.info("Removed {count} stale multipart uploads", count=removed)

    async def health(self) -> Component:
        """The ``object_store`` component (``storage.backend: s3``): the backing bucket answers
        within :data:`HEALTH_TIMEOUT`; degraded otherwise (uploads are then answered 503)."""
        started = self.clock.seconds()
        probe = self.run(self.engine.check)
        probe.addTimeout(HEALTH_TIMEOUT, self.clock)
        try:
            message = await probe
        except defer.TimeoutError:
            return Component("object_store", DEGRADED, f"no answer within {HEALTH_TIMEOUT:g} s")
        except StorageError as exc:
            return Component("object_store", DEGRADED, exc.message)
        return Component("object_store", HEALTHY, message, round((self.clock.seconds() - started) * 1000.0, 1))

    def refresh_buckets(self) -> None:
        """Follow a changed ``s3_output_path`` (new uploads land in the new directory)."""
        self.engine.follow_bucket_root(UPLOAD_BUCKET, self.outputs_root())

    def has_bucket(self, bucket: str) -> bool:
        return self.engine.has_bucket(bucket)

    def upload_in_progress(self, bucket: str, upload_id: str) -> bool:
        """A multipart upload is in progress (cheap, on the calling thread: no network call)."""
        return self.engine.upload_exists(bucket, upload_id)

    @staticmethod
    def job_for(target: Target) -> Optional[str]:
        """The job whose prefix ``target`` writes to (its upload progress)."""
        if target.bucket == UPLOAD_BUCKET and "/" in target.key:
            return target.key.split("/", 1)[0]
        return None

    def begin_write(self, target: Target, algorithms: list, max_size: int, sha256: bool = True,
                    expected_size: Optional[int] = None) -> PendingWrite:
        """In a worker thread: open the temp file for an upload (``expected_size``: the body's
        size when its head declares it)."""
        if target.upload_id:
            return self.engine.begin_part(target.bucket, target.key, target.upload_id, target.part_number or 0,
                                          algorithms, sha256, expected_size=expected_size)
        return self.engine.begin_put(target.bucket, target.key, algorithms, max_size, sha256)

    # -- buckets and listings ------------------------------------------------------------------

    async def list_buckets(self, caller: Caller) -> list[tuple[str, float]]:
        buckets = await self.run(self.engine.list_buckets)
        if caller.kind == "job":
            buckets = [b for b in buckets if b[0] == caller.credential.bucket]
        return buckets

    async def list_uploads(self, bucket: str) -> list[tuple[str, dict]]:
        return await self.run(self.engine.list_uploads, bucket)

    async def list_page(self, bucket: str, prefix: str, delimiter: str, after: str, max_keys: int,
                        scope: Optional[str]) -> dict:
        """One listing page; for a job whose ``scope`` lies under ``prefix``, exactly what S3 would
        list if the job's objects were the only ones in the bucket."""
        if scope is None or prefix.startswith(scope):
            page = await self.run(self.engine.list_objects, bucket, prefix, delimiter, after, max_keys)
            _scope_page(page, scope)
            return page
        rest = scope[len(prefix):]
        index = rest.find(delimiter) if delimiter else -1
        if index < 0:
            # every key the job may see starts with its scope, which starts with the prefix
            page = await self.run(self.engine.list_objects, bucket, scope, delimiter, after, max_keys)
            _scope_page(page, scope)
            return page
        common = prefix + rest[:index + len(delimiter)]
        page: dict = {"contents": [], "prefixes": [], "truncated": False, "next_marker": ""}
        if max_keys > 0 and (not after or common.encode("utf-8") > after.encode("utf-8", "surrogateescape")):
            probe = await self.run(self.engine.list_objects, bucket, scope, "", "", 1)
            if probe["contents"]:
                page["prefixes"] = [common]
                page["next_marker"] = common
        return page

    # -- objects -------------------------------------------------------------------------------

    async def head(self, bucket: str, key: str) -> ObjectInfo:
        return await self.run(self.engine.head, bucket, key)

    async def open_read(self, bucket: str, key: str) -> tuple[Any, ObjectInfo]:
        return await self.run(self.engine.open_read, bucket, key)

    async def delete(self, bucket: str, key: str) -> None:
        await self.run(self.engine.delete, bucket, key)

    async def delete_objects(self, caller: Caller, bucket: str, keys: list[str]) -> tuple[list, list]:
        """DeleteObjects: ``(deleted keys, [(key, code, message)])``; a key the caller may not
        write is refused alone."""
        deleted, errors = [], []
        for key in keys:
            if not caller.can_write or not caller.allowed(bucket, key, write=True):
                errors.append((key, "AccessDenied", "Access Denied"))
                continue
            try:
                validate_key(key)
            except InvalidKey:
                deleted.append(key)  # nothing can exist under an invalid key
                continue
            await self.run(self.engine.delete, bucket, key)
            deleted.append(key)
        return deleted, errors

    async def commit_object(self, bucket: str, key: str, pending: PendingWrite, checksums: dict,
                            content_type: Optional[str], user: dict, system: dict, conditions: dict) -> ObjectInfo:
        """PutObject's body, verified, placed as the object."""
        return await self.run(self.place_object, bucket, key, pending, checksums, content_type, user, system,
                              conditions, self.clock.seconds())

    def place_object(self, bucket: str, key: str, pending: PendingWrite, checksums: dict,
                     content_type: Optional[str], user: dict, system: dict, conditions: dict,
                     now: float) -> ObjectInfo:
        """In a worker thread: :meth:`commit_object` (``now`` read on the reactor thread)."""
        return self.engine.commit_put(bucket, key, pending, now, content_type, user, checksums, headers=system,
                                      **conditions)

    # -- multipart -----------------------------------------------------------------------------

    async def create_multipart(self, bucket: str, key: str, content_type: Optional[str], user: dict,
                               algorithm: Optional[str], system: dict, checksum_type: Optional[str]) -> str:
        return await self.run(self.engine.create_multipart, bucket, key, self.clock.seconds(), content_type,
                              user, algorithm, headers=system, checksum_type=checksum_type)

    async def commit_part(self, target: Target, pending: PendingWrite, checksums: dict) -> PartInfo:
        """UploadPart's body, verified, kept as the part."""
        return await self.run(self.place_part, target, pending, checksums, self.clock.seconds())

    def place_part(self, target: Target, pending: PendingWrite, checksums: dict, now: float) -> PartInfo:
        """In a worker thread: :meth:`commit_part` (``now`` read on the reactor thread)."""
        return self.engine.commit_part(target.bucket, target.key, target.upload_id, target.part_number, pending,
                                       now, checksums)

    async def complete_multipart(self, bucket: str, key: str, upload_id: str, parts: list,
                                 object_checksum: Optional[tuple[str, str]], conditions: dict) -> ObjectInfo:
        """Assemble the object; the job's upload progress counts it once (a repeated Complete of an
        upload already completed does not)."""
        already = await self.run(self.engine.upload_active, bucket, upload_id)
        info = await self.run(self.engine.complete_multipart, bucket, key, upload_id, parts,
                              self.clock.seconds(), object_checksum, **conditions)
        job_id = self.job_for(Target(bucket, key))
        if job_id and already:
            self.progress.complete_object(job_id)
        return info

    async def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        await self.run(self.engine.abort_multipart, bucket, key, upload_id)

    async def list_parts(self, bucket: str, key: str, upload_id: str) -> tuple[dict, list[PartInfo]]:
        return await self.run(self.engine.list_parts, bucket, key, upload_id)


def _scope_page(page: dict, scope: Optional[str]) -> None:
    """Drop entries outside a job's prefix (a listing of ``job-1`` must not show ``job-10/``)."""
    if scope is None:
        return
    page["contents"] = [o for o in page["contents"] if o.key.startswith(scope)]
    page["prefixes"] = [p for p in page["prefixes"] if p.startswith(scope) or scope.startswith(p)]
