"""Multipart uploads of the object store (S8): create, upload parts, list, complete, abort, and
the timer's clean-up of stale uploads. Same layout and durability rules as
:mod:`stdaemon.s3.objects` (``<bucket dir>/.stdaemon/multipart/<upload id>/``); every method blocks
(file I/O) and takes ``now`` explicitly."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import uuid
from dataclasses import asdict
from typing import Iterable, Mapping, Optional

from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.completion import check_complete, parts_checksum
from stdaemon.s3.errors import StorageError, no_such_upload
from stdaemon.s3.objects import (MAX_OBJECT_SIZE, Bucket, ObjectInfo, ObjectStore, PartInfo, PendingWrite,
                                 _write_json_atomic)
from stdaemon.store.files import fsync_dir

MAX_PART_NUMBER = 10000
MAX_PART_SIZE = 5 * 1024 ** 3
#: What a completed multipart upload leaves in its directory (answers repeated Completes).
COMPLETED = "completed.json"
#: The upload's assembly file, ``assembly.<part size>.data``: parts of one size are written straight
#: into it at ``(part number - 1) × part size``, so Complete has nothing to copy (``begin_part``).
ASSEMBLY_PREFIX = "assembly."
ASSEMBLY_SUFFIX = ".data"


def _assembly_part_size(name: str) -> Optional[int]:
    """The part size an assembly file's name carries (None: not an assembly file)."""
    if not (name.startswith(ASSEMBLY_PREFIX) and name.endswith(ASSEMBLY_SUFFIX)):
        return None
    digits = name[len(ASSEMBLY_PREFIX):-len(ASSEMBLY_SUFFIX)]
    return int(digits) if digits.isdigit() and 0 < int(digits) <= MAX_PART_SIZE else None


class StorageEngine(ObjectStore):
    """The object store with multipart uploads: every blocking storage operation of the S3
    endpoint (run them in a thread)."""

    def __init__(self, buckets: Mapping[str, str], created_at: float = 0.0):
        super().__init__(buckets, created_at)
        self._lock = threading.Lock()
        self._completing: set[str] = set()
        # In-place parts (this process): the part size an upload's first in-place part set, and the
        # part numbers being written into its assembly file right now.
        self._part_size: dict[str, int] = {}
        self._writing: dict[str, set[int]] = {}

    def _upload_dir(self, bucket: Bucket, upload_id: str) -> str:
        if not upload_id or not all(c in "0123456789abcdef" for c in upload_id) or len(upload_id) != 32:
            raise no_such_upload(upload_id)
        path = os.path.join(bucket.multipart, upload_id)
        if not os.path.isfile(os.path.join(path, "upload.json")):
            raise no_such_upload(upload_id)
        return path

    def _upload(self, bucket: Bucket, upload_id: str, key: Optional[str] = None) -> tuple[str, dict]:
        path = self._upload_dir(bucket, upload_id)
        try:
            with open(os.path.join(path, "upload.json"), encoding="utf-8") as fh:
                upload = json.load(fh)
        except (OSError, ValueError):
            raise no_such_upload(upload_id) from None
        if key is not None and upload.get("key") != key:
            raise no_such_upload(upload_id)
        return path, upload

    def create_multipart(self, bucket_name: str, key: str, now: float, content_type: Optional[str] = None,
                         metadata: Optional[dict] = None, checksum_algorithm: Optional[str] = None,
                         headers: Optional[dict] = None, checksum_type: Optional[str] = None) -> str:
        bucket = self.bucket(bucket_name)
        bucket.object_path(key)
        upload_id = uuid.uuid4().hex
        path = os.path.join(bucket.multipart, upload_id)
        os.makedirs(path)
        _write_json_atomic(
            os.path.join(path, "upload.json"),
            {"key": key, "initiated": now, "content_type": content_type or "binary/octet-stream",
             "metadata": dict(metadata or {}), "checksum_algorithm": checksum_algorithm,
             "checksum_type": checksum_type, "headers": dict(headers or {})},
            bucket.tmp,
        )
        return upload_id

    def upload_exists(self, bucket_name: str, upload_id: str) -> bool:
        """A cheap check (one stat) that a multipart upload is in progress."""
        try:
            self._upload_dir(self.bucket(bucket_name), upload_id)
        except StorageError:
            return False
        return True

    upload_active = upload_exists  # on local disk the cheap check is the authoritative one

    def upload_info(self, bucket_name: str, upload_id: str, key: Optional[str] = None) -> dict:
        return self._upload(self.bucket(bucket_name), upload_id, key)[1]

    def begin_part(self, bucket_name: str, key: str, upload_id: str, part_number: int,
                   checksum_algorithms: Iterable[str] = (), sha256: bool = True,
                   expected_size: Optional[int] = None) -> PendingWrite:
        """Where a part's body goes. The first upload of a part whose size the head declares
        (``expected_size``), no larger than the upload's part size (set by its first such part),
        goes into the assembly file at ``(part number - 1) × part size``; uniform parts (every
        SDK's transfer manager) then need no copy at Complete. Anything else (a re-upload, a larger
        part, an unknown size, a race with another upload of the number or a Complete) gets a
        file of its own, and Complete copies."""
        bucket = self.bucket(bucket_name)
        path, _ = self._upload(bucket, upload_id, key)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise StorageError("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
        place = self._claim_in_place(path, upload_id, part_number, expected_size)
        if place is not None:
            assembly, offset, part_size = place
            try:
                return PendingWrite(bucket.tmp, checksum_algorithms, part_size, sha256, self.live_temp_files,
                                    in_place=(assembly, offset),
                                    on_done=lambda: self._release_in_place(upload_id, part_number))
            except OSError:
                self._release_in_place(upload_id, part_number)
                raise
        return PendingWrite(bucket.tmp, checksum_algorithms, MAX_PART_SIZE, sha256, self.live_temp_files)

    def _claim_in_place(self, path: str, upload_id: str, part_number: int,
                        expected_size: Optional[int]) -> Optional[tuple[str, int, int]]:
        """``(assembly file, offset, part size)`` when this part may be written into the upload's
        assembly file (and it is claimed for this writer), else None."""
        if not expected_size or expected_size <= 0:
            return None
        with self._lock:
            # under the lock: a claim ends only once its record is written, so one is always seen
            if upload_id in self._completing or part_number in self._writing.get(upload_id, ()) \
                    or self._read_part_meta(path, part_number) is not None:
                return None
            layout = self._part_size.get(upload_id)
            if layout is None:
                layout = self._part_size[upload_id] = self._assembly_file(path, expected_size)
            if layout is None:
                return None
            name, part_size = layout
            offset = (part_number - 1) * part_size
            if expected_size > part_size or offset + part_size > MAX_OBJECT_SIZE:
                return None
            self._writing.setdefault(upload_id, set()).add(part_number)
        return os.path.join(path, name), offset, part_size

    @staticmethod
    def _assembly_file(path: str, part_size: int) -> Optional[tuple[str, int]]:
        """The upload's assembly file and its part size, which its name carries
        (``assembly.<part size>.data``), so the layout survives a restart: made with this part
        size when the upload has none yet."""
        for _ in range(2):
            try:
                names = os.listdir(path)
            except OSError:
                return None
            for name in names:
                size = _assembly_part_size(name)
                if size is not None:
                    return name, size
            name = f"{ASSEMBLY_PREFIX}{part_size}{ASSEMBLY_SUFFIX}"
            try:
                fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            except FileExistsError:
                continue
            except OSError:
                return None
            os.close(fd)
            fsync_dir(path)   # the file's name is durable before any part in it is acknowledged
            return name, part_size
        return None

    def _release_in_place(self, upload_id: str, part_number: int) -> None:
        with self._lock:
            writing = self._writing.get(upload_id)
            if writing is not None:
                writing.discard(part_number)
                if not writing:
                    del self._writing[upload_id]

    def commit_part(self, bucket_name: str, key: str, upload_id: str, part_number: int, pending: PendingWrite,
                    now: float, checksums: Optional[dict] = None) -> PartInfo:
        bucket = self.bucket(bucket_name)
        try:
            path, _ = self._upload(bucket, upload_id, key)
        except StorageError:
            pending.abort()
            raise
        if not pending.closed:
            pending.flush()
        info = PartInfo(part_number, pending.size, f'"{pending.md5.hexdigest()}"', now, dict(checksums or {}))
        meta = asdict(info)
        meta["md5"] = pending.md5.hexdigest()
        part_path = os.path.join(path, f"{part_number:05d}.part")
        if pending.in_place is not None:
            # in the assembly file (durable since the flush); the number stays claimed until the
            # record is written, so no other upload of it can be written over these bytes
            data_name = os.path.basename(pending.path)
            meta["data"] = data_name
            meta["offset"] = pending.offset
        else:
            # The sidecar names the data file it describes, so a re-upload of the same part number
            # that races an earlier one can never pair one body with the other's ETag.
            data_name = f"{part_number:05d}.{uuid.uuid4().hex}.data"
            meta["data"] = data_name
            try:
                os.replace(pending.path, os.path.join(path, data_name))
            except FileNotFoundError:
                pending.abort()
                raise no_such_upload(upload_id) from None
            pending.release()
            fsync_dir(path)
        old = self._read_part_meta(path, part_number)
        try:
            _write_json_atomic(part_path + ".json", meta, bucket.tmp)
        finally:
            if pending.in_place is not None:
                pending.release()
        if old and old.get("data") and old.get("offset") is None and old["data"] != data_name:
            try:
                os.unlink(os.path.join(path, old["data"]))
            except OSError:
                pass
        return info

    @staticmethod
    def _read_part_meta(path: str, part_number: int) -> Optional[dict]:
        try:
            with open(os.path.join(path, f"{part_number:05d}.part.json"), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return None

    def list_parts(self, bucket_name: str, key: str, upload_id: str) -> tuple[dict, list[PartInfo]]:
        bucket = self.bucket(bucket_name)
        path, upload = self._upload(bucket, upload_id, key)
        parts = []
        for name in sorted(os.listdir(path)):
            if name.endswith(".part.json"):
                meta = self._read_part_meta(path, int(name[:5]))
                if meta:
                    parts.append(PartInfo(meta["part_number"], meta["size"], meta["etag"], meta["last_modified"],
                                          meta.get("checksums", {})))
        return upload, parts

    def list_uploads(self, bucket_name: str) -> list[tuple[str, dict]]:
        bucket = self.bucket(bucket_name)
        out = []
        for upload_id in sorted(os.listdir(bucket.multipart)):
            try:
                out.append((upload_id, self._upload(bucket, upload_id)[1]))
            except StorageError:
                continue
        return out

    def complete_multipart(self, bucket_name: str, key: str, upload_id: str, parts: list,
                           now: float, object_checksum: Optional[tuple[str, str]] = None,
                           if_match: Optional[str] = None, if_none_match: bool = False) -> ObjectInfo:
        """Assemble ``parts`` into the object: ``[(part number, etag)]`` or ``[(part number, etag,
        {"ChecksumCRC32": value, ...})]`` as the client lists them.

        Checksums as S3 defines them: a part checksum the client lists must be the one the part
        was uploaded with; when every part carries the upload's checksum algorithm the object gets
        the composite checksum (the checksum of the parts' binary checksums, ``<base64>-<N>``).
        ``object_checksum`` (``(algorithm, value)`` from the request's ``x-amz-checksum-*``
        header) is checked against that composite when it has the ``-N`` form, else against the
        whole assembled object (a ``FULL_OBJECT`` checksum).

        A repeated Complete of an upload that was completed answers the same object (SDKs retry
        Complete after a timeout): the upload leaves a small record behind for ``max_age``."""
        bucket = self.bucket(bucket_name)
        try:
            path, upload = self._upload(bucket, upload_id, key)
        except StorageError:
            done = self._completed(bucket, upload_id, key)
            if done is None:
                raise
            return done
        with self._lock:
            if upload_id in self._completing:
                raise StorageError("OperationAborted", "A conflicting operation is in progress on this upload", 409)
            self._completing.add(upload_id)
        try:
            metas = check_complete(parts, lambda number: self._read_part_meta(path, number))
            digest = hashlib.md5()
            for meta in metas:
                digest.update(bytes.fromhex(meta["md5"]))
            etag = f'"{digest.hexdigest()}-{len(metas)}"'
            pending = self._assembled_in_place(bucket, path, upload_id, parts, metas)
            if pending is None:
                pending = PendingWrite(bucket.tmp, sha256=False, live=self.live_temp_files)
                try:
                    for meta in metas:
                        with open(os.path.join(path, meta["data"]), "rb") as src:
                            _copy_file(src, pending._fh, meta["size"], meta.get("offset") or 0)
                        pending.size += meta["size"]
                except Exception:
                    pending.abort()
                    raise
            try:
                checksums, checksum_type = self._object_checksums(upload, metas, object_checksum, pending)
            except Exception:
                pending.abort()
                raise
            info = self.commit_put(
                bucket_name, key, pending, now, content_type=upload.get("content_type"),
                metadata=upload.get("metadata"), checksums=checksums, etag=etag, parts=len(metas),
                headers=upload.get("headers"), part_sizes=[m["size"] for m in metas], checksum_type=checksum_type,
                if_match=if_match, if_none_match=if_none_match,
            )
            self._retire_upload(bucket, path, info, now)
            with self._lock:
                self._part_size.pop(upload_id, None)
            return info
        finally:
            with self._lock:
                self._completing.discard(upload_id)

    def _assembled_in_place(self, bucket: Bucket, path: str, upload_id: str, parts: list,
                            metas: list) -> Optional[PendingWrite]:
        """The assembly file as the finished object, when the listed parts are exactly what it
        holds: parts 1…N in order, each in place, all of one size but the last (no larger), the
        file exactly their total long (no other part beyond), and no part being written into it.
        Handed over as a new name (a hard link in the bucket's temp directory): a Complete refused
        later (a condition) leaves the upload as it was. None: assemble by copying."""
        numbers = [p[0] for p in parts]
        name = metas[0].get("data") or ""
        size = _assembly_part_size(name)
        if size is None or numbers != list(range(1, len(metas) + 1)):
            return None
        for index, meta in enumerate(metas):
            if meta.get("data") != name or meta.get("offset") != index * size:
                return None
            if meta["size"] != size and (index < len(metas) - 1 or meta["size"] > size):
                return None
        total = sum(meta["size"] for meta in metas)
        assembly = os.path.join(path, name)
        with self._lock:   # Complete holds _completing: no new in-place writer can start
            if self._writing.get(upload_id):
                return None
        try:
            if os.stat(assembly).st_size != total:
                return None
            pending = PendingWrite(bucket.tmp, sha256=False, live=self.live_temp_files)
        except OSError:
            return None
        pending._fh.close()
        pending.closed = True
        try:
            os.unlink(pending.path)
            os.link(assembly, pending.path)
            with open(pending.path, "rb+") as fh:
                os.fsync(fh.fileno())   # every part was; this makes the (unchanged) size certain too
                pending.mtime_ns = os.fstat(fh.fileno()).st_mtime_ns
        except OSError:
            pending.abort()
            return None
        pending.size = total
        return pending

    @staticmethod
    def _object_checksums(upload: dict, metas: list, object_checksum: Optional[tuple[str, str]],
                          pending: PendingWrite) -> tuple[dict, str]:
        """``({algorithm: value}, checksum type)`` of an assembled multipart object."""
        answer, algorithm, given = parts_checksum(upload, metas, object_checksum)
        if answer is not None:
            return answer
        # a FULL_OBJECT checksum (given on Complete, or asked for on Create): computed over the
        # assembled bytes before they become visible
        state = s3_checksums.new_checksum(algorithm)
        if not pending.closed:
            pending._fh.flush()
        with open(pending.path, "rb") as fh:
            for block in iter(lambda: fh.read(1024 * 1024), b""):
                state.update(block)
        computed = s3_checksums.b64(state.digest())
        if given is not None and computed != given:
            raise StorageError("BadDigest", f"The {algorithm.upper()} you specified did not match the "
                               "calculated checksum.")
        return {algorithm: computed}, "FULL_OBJECT"

    def _retire_upload(self, bucket: Bucket, path: str, info: ObjectInfo, now: float) -> None:
        """After Complete: keep only ``completed.json`` (what a repeated Complete answers)."""
        record = {"key": info.key, "etag": info.etag, "size": info.size, "last_modified": info.last_modified,
                  "checksums": info.checksums, "checksum_type": info.checksum_type, "parts": info.parts,
                  "completed_at": now}
        _write_json_atomic(os.path.join(path, COMPLETED), record, bucket.tmp)
        for name in os.listdir(path):
            if name != COMPLETED:
                try:
                    os.unlink(os.path.join(path, name))
                except OSError:
                    pass
        fsync_dir(path)

    def _completed(self, bucket: Bucket, upload_id: str, key: str) -> Optional[ObjectInfo]:
        if not upload_id or len(upload_id) != 32 or not all(c in "0123456789abcdef" for c in upload_id):
            return None
        try:
            with open(os.path.join(bucket.multipart, upload_id, COMPLETED), encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        return ObjectInfo(key=key, size=record.get("size", 0), etag=record.get("etag", ""),
                          last_modified=record.get("last_modified", 0.0), checksums=record.get("checksums") or {},
                          checksum_type=record.get("checksum_type", ""), parts=record.get("parts", 0))

    def abort_multipart(self, bucket_name: str, key: str, upload_id: str) -> None:
        bucket = self.bucket(bucket_name)
        path, _ = self._upload(bucket, upload_id, key)
        shutil.rmtree(path, ignore_errors=True)
        with self._lock:
            self._part_size.pop(upload_id, None)

    def cleanup_stale(self, now: float, max_age: float) -> int:
        """Abort multipart uploads initiated more than ``max_age`` seconds before ``now``."""
        removed = 0
        for name in list(self.buckets):
            try:
                uploads = self.list_uploads(name)
            except OSError:
                continue
            bucket = self.buckets[name]
            for upload_id, upload in uploads:
                if now - float(upload.get("initiated", now)) > max_age and upload_id not in self._completing:
                    shutil.rmtree(os.path.join(bucket.multipart, upload_id), ignore_errors=True)
                    with self._lock:
                        self._part_size.pop(upload_id, None)
                    removed += 1
            # records of completed uploads (answers to repeated Completes) expire too
            try:
                names = os.listdir(bucket.multipart)
            except OSError:
                names = []
            for upload_id in names:
                record_path = os.path.join(bucket.multipart, upload_id, COMPLETED)
                if os.path.exists(os.path.join(bucket.multipart, upload_id, "upload.json")) \
                        or not os.path.exists(record_path):
                    continue
                try:
                    with open(record_path, encoding="utf-8") as fh:
                        completed_at = float(json.load(fh).get("completed_at", 0.0))
                except (OSError, ValueError, TypeError, AttributeError):
                    completed_at = 0.0  # unreadable or missing: nothing worth keeping
                if now - completed_at > max_age and upload_id not in self._completing:
                    shutil.rmtree(os.path.join(bucket.multipart, upload_id), ignore_errors=True)
            # temp files older than max_age belong to nothing alive
            try:
                for tmp in os.listdir(bucket.tmp):
                    full = os.path.join(bucket.tmp, tmp)
                    if full in self.live_temp_files:
                        continue  # an upload still writing it
                    try:
                        if now - os.stat(full).st_mtime > max_age:
                            os.unlink(full)
                    except OSError:
                        pass
            except OSError:
                pass
        return removed



def _copy_file(src, dst, size: int, offset: int = 0) -> None:
    """Append ``size`` bytes of ``src`` from ``offset`` to ``dst``: in the kernel when it can
    (``copy_file_range``), else by blocks."""
    dst.flush()
    start = dst.seek(0, os.SEEK_END)  # the parts already appended stay if the kernel copy fails
    src.seek(offset)
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            remaining = size
            while remaining > 0:
                copied = copy_range(src.fileno(), dst.fileno(), min(remaining, 1 << 30))
                if copied == 0:
                    break
                remaining -= copied
            if remaining == 0:
                dst.seek(0, os.SEEK_END)
                return
            src.seek(offset + size - remaining)
            size = remaining
        except OSError:
            src.seek(offset)
            dst.seek(start)
            dst.truncate()
    while size > 0:
        block = src.read(min(size, 1024 * 1024))
        if not block:
            raise StorageError("InternalError", "A part of the upload is shorter than its record", 500)
        dst.write(block)
        size -= len(block)
