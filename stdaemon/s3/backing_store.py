"""Objects kept in an S3-compatible store (MinIO, Ceph RGW, AWS S3) through boto3: the ``s3``
``storage.backend``. stdaemon stays the endpoint trainers talk to; this is where it puts what they
send, so that every instance sharing the backing bucket serves every object and every part.

Size: a little over 500 lines because it is the whole seam for one store (objects, listings,
multipart passthrough, clean-up), each operation a few store calls. The pure record layout and
Complete's checks are in :mod:`stdaemon.s3.backing_records`; the boto3 client, its error mapping
and the streaming reader in :mod:`stdaemon.s3.backing_client`.

Layout in the backing bucket (``storage.prefix`` first):

* ``<bucket>/<key>``                      the object itself (its ``Content-Type`` set natively),
* ``.stdaemon/<bucket>/meta/<sha256 of key>.json``   what stdaemon answers about it (its ETag,
  content type, user and system metadata, checksums, last modified, part sizes) and the backing
  ETag it describes: a record that does not match the object (overwritten by another tool, or a
  crash between the two writes) is ignored and the answer derived from the object,
* ``.stdaemon/<bucket>/uploads/<upload id>.json``   a multipart upload: its key, the backing
  upload id, what Create was given; after Complete, what Complete answered (repeated Completes),
* ``.stdaemon/<bucket>/uploads/<upload id>/<part>.json``   one acknowledged part (size, MD5,
  checksums), written after the backing UploadPart returned.

A body is received into a local spool file (hashed while written, exactly as on local disk),
verified, then sent to the store: a PutObject up to ``storage.multipart_threshold`` in one request,
a larger one as a backing multipart upload; a part as the backing upload's part. Only when the
store has taken it does the call return, and only then is the client answered: acknowledged means
stored in the backing store. Nothing about an upload lives in one instance's memory or files.

Every method blocks (network, spool files): the S3 service runs them in its ``s3-io`` pool. boto3 is
imported on first use (``tests/test_lazy_imports.py``). The store's keys never leave the client:
trainers get their job's own credentials for stdaemon's endpoint, never the store's.
"""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import uuid
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Iterable, Mapping, Optional

from stdaemon.logs import get_logger
from stdaemon.s3 import backing_records as records
from stdaemon.s3.backing_client import MISSING, BackingReader, StoreClient, code, unavailable
from stdaemon.s3.errors import StorageError, no_such_bucket, no_such_key, no_such_upload, precondition_failed
from stdaemon.s3.keys import InvalidKey
from stdaemon.s3.multipart import MAX_PART_NUMBER, MAX_PART_SIZE
from stdaemon.s3.objects import MAX_OBJECT_SIZE, ObjectInfo, PartInfo, PendingWrite, etag_matches

log = get_logger("stdaemon.s3.backing_store")

READ_BLOCK = 1024 * 1024
#: Upload ids this instance created or took a part of (the rate limiter's cheap check).
KNOWN_UPLOADS = 10000


class BackingStore:
    """The :class:`~stdaemon.s3.backend.ObjectBackend` over an S3-compatible store."""

    def __init__(self, settings: Any, spool_dir: str, buckets: Iterable[str], created_at: float = 0.0,
                 environ: Optional[Mapping[str, str]] = None,
                 secret: Optional[Callable[[str], Awaitable[Optional[str]]]] = None):
        """``settings``: the ``storage`` config section; ``secret(name)`` resolves a secret name
        (the secrets service) when the section names the store's keys."""
        self.settings = settings
        self.store = StoreClient(settings, environ)
        self.prefix = settings.prefix
        self.spool_dir = spool_dir
        self.buckets = set(buckets)
        self.created_at = created_at
        self.secret = secret
        self.live_temp_files: set[str] = set()
        self._lock = threading.Lock()
        self._known: "OrderedDict[str, None]" = OrderedDict()
        self._records: "OrderedDict[str, dict]" = OrderedDict()  # upload records (immutable until Complete)
        # ETags stdaemon answered for (key, backing ETag): a record never changes for one backing ETag
        self._etags: "OrderedDict[tuple[str, str], str]" = OrderedDict()

    # -- the store's keys -------------------------------------------------------------------------

    async def start(self) -> None:
        """On the reactor thread: resolve the store's keys when they are named secrets."""
        names = (self.settings.access_key_id_secret, self.settings.secret_access_key_secret)
        if not all(names) or self.secret is None:
            return
        key_id = await self.secret(names[0])
        secret_key = await self.secret(names[1])
        if not key_id or not secret_key:
            log.error("The object store's keys are not available: secrets {a} and {b} must both be set",
                      a=names[0], b=names[1])
            return
        self.store.set_credentials(key_id, secret_key)

    def check(self) -> str:
        """The health probe: the backing bucket answers (``StorageError`` when it does not)."""
        from botocore.exceptions import ClientError

        try:
            self.store.call("head_bucket")
        except ClientError as exc:
            raise StorageError("ServiceUnavailable", f"the store answered {code(exc) or 'an error'}", 503) from None
        return f"bucket {self.store.bucket} answers"

    # -- names ---------------------------------------------------------------------------------

    def _check_bucket(self, name: str) -> None:
        if name not in self.buckets:
            raise no_such_bucket(name)

    def _object_name(self, bucket: str, key: str) -> str:
        records.check_key(key)
        return f"{self.prefix}{bucket}/{key}"

    def _state(self, bucket: str, *parts: str) -> str:
        return f"{self.prefix}.stdaemon/{bucket}/" + "/".join(parts)

    def _meta_name(self, bucket: str, key: str) -> str:
        return self._state(bucket, "meta", records.key_digest(key) + ".json")

    def _upload_name(self, bucket: str, upload_id: str) -> str:
        return self._state(bucket, "uploads", upload_id + ".json")

    def _part_name(self, bucket: str, upload_id: str, part_number: int) -> str:
        return self._state(bucket, "uploads", upload_id, f"{part_number:05d}.json")

    # -- the seam: cheap checks ------------------------------------------------------------------

    def has_bucket(self, name: str) -> bool:
        return name in self.buckets

    def follow_bucket_root(self, name: str, root: str) -> None:
        """Objects are in the backing store wherever ``s3_output_path`` points."""

    def upload_exists(self, bucket: str, upload_id: str) -> bool:
        """An upload this instance created or stored a part of (no network call: the rate
        limiter asks on the reactor thread). Another instance's upload counts until its first part
        here."""
        with self._lock:
            return upload_id in self._known

    def _remember(self, upload_id: str, record: Optional[dict] = None) -> None:
        with self._lock:
            self._known[upload_id] = None
            self._known.move_to_end(upload_id)
            while len(self._known) > KNOWN_UPLOADS:
                self._known.popitem(last=False)
            if record is not None:
                self._records[upload_id] = record
                while len(self._records) > KNOWN_UPLOADS:
                    self._records.popitem(last=False)

    def _answered(self, key: str, backing_etag: str, etag: Optional[str] = None) -> Optional[str]:
        """The ETag answered for this very object: kept when ``etag`` is given, else looked up."""
        with self._lock:
            if etag is None:
                return self._etags.get((key, backing_etag))
            self._etags[(key, backing_etag)] = etag
            while len(self._etags) > KNOWN_UPLOADS:
                self._etags.popitem(last=False)
            return etag

    def _forget(self, upload_id: str) -> None:
        with self._lock:
            self._known.pop(upload_id, None)
            self._records.pop(upload_id, None)

    # -- buckets and clean-up --------------------------------------------------------------------

    def list_buckets(self) -> list[tuple[str, float]]:
        return [(name, self.created_at) for name in sorted(self.buckets)]

    def startup_cleanup(self) -> int:
        """Spool files left by a crash of this instance (nothing is in flight at start-up)."""
        return self._remove_spool_files(None, 0.0)

    def cleanup_stale(self, now: float, max_age: float) -> int:
        """Abort multipart uploads initiated more than ``max_age`` before ``now`` (by any instance),
        forget records of completed ones as old, and remove stale spool files."""
        removed = 0
        for bucket in sorted(self.buckets):
            for upload_id, record in self._upload_records(bucket):
                if "completed" in record:
                    if now - float(record.get("completed_at", 0.0)) > max_age:
                        self.store.delete(self._upload_name(bucket, upload_id))
                    continue
                if now - float(record.get("initiated", now)) > max_age:
                    try:
                        self.abort_multipart(bucket, record.get("key", ""), upload_id)
                        removed += 1
                    except StorageError:
                        continue
        self._remove_spool_files(now, max_age)
        return removed

    def _remove_spool_files(self, now: Optional[float], max_age: float) -> int:
        """Spool files no upload is writing (older than ``max_age`` when ``now`` is given)."""
        removed = 0
        try:
            names = os.listdir(self.spool_dir)
        except OSError:
            return 0
        for name in names:
            path = os.path.join(self.spool_dir, name)
            if path in self.live_temp_files:
                continue
            try:
                if now is None or now - os.stat(path).st_mtime > max_age:
                    os.unlink(path)
                    removed += 1
            except OSError:
                pass
        return removed

    # -- objects ---------------------------------------------------------------------------------

    def _spool(self, checksum_algorithms: Iterable[str], max_size: Optional[int], sha256: bool) -> PendingWrite:
        return PendingWrite(self.spool_dir, checksum_algorithms, max_size, sha256, self.live_temp_files)

    def begin_put(self, bucket: str, key: str, checksum_algorithms: Iterable[str] = (),
                  max_size: Optional[int] = MAX_OBJECT_SIZE, sha256: bool = True) -> PendingWrite:
        self._check_bucket(bucket)
        self._object_name(bucket, key)  # validate before any byte is written
        return self._spool(checksum_algorithms, max_size, sha256)

    def commit_put(self, bucket: str, key: str, pending: PendingWrite, now: float,
                   content_type: Optional[str] = None, metadata: Optional[dict] = None,
                   checksums: Optional[dict] = None, headers: Optional[dict] = None,
                   if_match: Optional[str] = None, if_none_match: bool = False) -> ObjectInfo:
        """Send the verified spool file to the store, then its record; the spool file is removed
        either way."""
        try:
            self._check_bucket(bucket)
            name = self._object_name(bucket, key)
            if not pending.closed:
                pending.flush()
            self._check_write_conditions(bucket, key, if_match, if_none_match)
            info = ObjectInfo(key=key, size=pending.size, etag=f'"{pending.md5.hexdigest()}"', last_modified=now,
                              content_type=content_type or "binary/octet-stream", metadata=dict(metadata or {}),
                              checksums=dict(checksums or {}), headers=dict(headers or {}))
            backing_etag = self._send(name, pending, info.content_type, if_none_match)
            self.store.put_json(self._meta_name(bucket, key), records.object_record(info, backing_etag))
            self._answered(key, backing_etag, info.etag)
            return info
        finally:
            pending.abort()  # the spool file: sent or refused, it is not needed any more

    def _send(self, name: str, pending: PendingWrite, content_type: str, if_none_match: bool) -> str:
        from botocore.exceptions import ClientError

        try:
            if pending.size <= self.settings.multipart_threshold:
                extra: dict = {"IfNoneMatch": "*"} if if_none_match else {}
                with open(pending.path, "rb") as fh:
                    answer = self.store.call("put_object", Key=name, Body=fh, ContentLength=pending.size,
                                        ContentType=records.native_content_type(content_type), **extra,
                                        ContentMD5=base64.b64encode(pending.md5.digest()).decode("ascii"))
                return answer["ETag"]
            from boto3.s3.transfer import TransferConfig

            config = TransferConfig(multipart_threshold=self.settings.multipart_threshold,
                                    multipart_chunksize=self.settings.multipart_threshold, max_concurrency=4)
            self.store.client().upload_file(pending.path, self.store.bucket, name, Config=config,
                                            ExtraArgs={"ContentType": records.native_content_type(content_type)})
            return self.store.call("head_object", Key=name)["ETag"]
        except ClientError as exc:
            if code(exc) in ("PreconditionFailed", "412"):
                raise precondition_failed("If-None-Match") from None
            raise self.store.error(exc, "put_object") from None
        except Exception as exc:  # the transfer manager wraps what went wrong
            if isinstance(exc, StorageError):
                raise
            log.warn("Sending an object to the store failed: {error}", error=type(exc).__name__)
            raise unavailable() from None

    def _check_write_conditions(self, bucket: str, key: str, if_match: Optional[str], if_none_match: bool) -> None:
        if not if_none_match and if_match is None:
            return
        try:
            current: Optional[ObjectInfo] = self.head(bucket, key)
        except StorageError as exc:
            if exc.code != "NoSuchKey":
                raise
            current = None
        if if_none_match and current is not None:
            raise precondition_failed("If-None-Match")
        if if_match is not None:
            if current is None:
                raise no_such_key(key)
            if not etag_matches(if_match, current.etag):
                raise precondition_failed("If-Match")

    def _head(self, bucket: str, key: str) -> tuple[ObjectInfo, str]:
        """``(what stdaemon answers, the backing ETag)``."""
        from botocore.exceptions import ClientError

        self._check_bucket(bucket)
        try:
            name = self._object_name(bucket, key)
        except InvalidKey:
            raise no_such_key(key) from None
        try:
            head = self.store.call("head_object", Key=name)
        except ClientError as exc:
            if code(exc) in MISSING:
                raise no_such_key(key) from None
            raise self.store.error(exc, "head_object") from None
        record = self.store.get_json(self._meta_name(bucket, key))
        info = records.object_info(key, record, head["ETag"], head["ContentLength"], head["LastModified"].timestamp(),
                                   head.get("ContentType"))
        return info, head["ETag"]

    def head(self, bucket: str, key: str) -> ObjectInfo:
        return self._head(bucket, key)[0]

    def open_read(self, bucket: str, key: str) -> tuple["BackingReader", ObjectInfo]:
        info, backing_etag = self._head(bucket, key)
        return BackingReader(self.store, self._object_name(bucket, key), backing_etag, info.size), info

    def delete(self, bucket: str, key: str) -> None:
        self._check_bucket(bucket)
        try:
            name = self._object_name(bucket, key)
        except InvalidKey:
            return
        self.store.delete(name)
        self.store.delete(self._meta_name(bucket, key))

    def list_objects(self, bucket: str, prefix: str = "", delimiter: str = "", start_after: str = "",
                     max_keys: int = 1000) -> dict:
        """One page: ListObjectsV2 on the bucket's prefix. A multipart-shaped backing ETag (a
        large PutObject sent in parts) is replaced by the one stdaemon answered."""
        from botocore.exceptions import ClientError

        self._check_bucket(bucket)
        page: dict = {"contents": [], "prefixes": [], "truncated": False, "next_marker": ""}
        if max_keys <= 0:
            return page
        base = f"{self.prefix}{bucket}/"
        kwargs: dict = {"Prefix": base + prefix, "MaxKeys": min(max_keys, 1000)}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if start_after:
            after = start_after
            if delimiter and start_after.startswith(prefix) and start_after.endswith(delimiter) \
                    and delimiter in start_after[len(prefix):]:
                after = start_after + "\U0010ffff"  # past every key of that common prefix
            kwargs["StartAfter"] = base + after
        try:
            answer = self.store.call("list_objects_v2", **kwargs)
        except ClientError as exc:
            raise self.store.error(exc, "list_objects_v2") from None
        entries = []
        for item in answer.get("Contents", []):
            key = item["Key"][len(base):]
            etag = item["ETag"]
            if "-" in etag:  # a multipart upload's or a large PutObject's: only the record tells which
                answered = self._answered(key, etag)
                if answered is None:
                    record = self.store.get_json(self._meta_name(bucket, key))
                    answered = records.answered_etag(record, key, etag)
                    if records.describes(record, key, etag):
                        self._answered(key, etag, answered)
                etag = answered
            entries.append((key, ObjectInfo(key=key, size=item["Size"], etag=etag,
                                            last_modified=item["LastModified"].timestamp())))
        for item in answer.get("CommonPrefixes", []):
            entries.append((item["Prefix"][len(base):], None))
        entries.sort(key=lambda e: e[0].encode("utf-8", "surrogateescape"))
        for key, info in entries:
            if info is None:
                page["prefixes"].append(key)
            else:
                page["contents"].append(info)
            page["next_marker"] = key
        page["truncated"] = bool(answer.get("IsTruncated"))
        return page

    # -- multipart -------------------------------------------------------------------------------

    def create_multipart(self, bucket: str, key: str, now: float, content_type: Optional[str] = None,
                         metadata: Optional[dict] = None, checksum_algorithm: Optional[str] = None,
                         headers: Optional[dict] = None, checksum_type: Optional[str] = None) -> str:
        from botocore.exceptions import ClientError

        self._check_bucket(bucket)
        name = self._object_name(bucket, key)
        try:
            backing = self.store.call("create_multipart_upload", Key=name,
                                 ContentType=records.native_content_type(content_type))["UploadId"]
        except ClientError as exc:
            raise self.store.error(exc, "create_multipart_upload") from None
        upload_id = uuid.uuid4().hex
        record = {"key": key, "initiated": now, "content_type": content_type or "binary/octet-stream",
                  "metadata": dict(metadata or {}), "checksum_algorithm": checksum_algorithm,
                  "checksum_type": checksum_type, "headers": dict(headers or {}), "backing_upload_id": backing}
        self.store.put_json(self._upload_name(bucket, upload_id), record)
        self._remember(upload_id, record)
        return upload_id

    def _upload(self, bucket: str, upload_id: str, key: Optional[str] = None, fresh: bool = True) -> dict:
        """The record of an upload in progress (``NoSuchUpload`` otherwise)."""
        self._check_bucket(bucket)
        if not records.valid_upload_id(upload_id):
            raise no_such_upload(upload_id)
        record = None if fresh else self._records.get(upload_id)
        if record is None:
            record = self.store.get_json(self._upload_name(bucket, upload_id))
        if not isinstance(record, dict) or "completed" in record or not record.get("backing_upload_id") \
                or (key is not None and record.get("key") != key):
            raise no_such_upload(upload_id)
        return record

    def upload_active(self, bucket: str, upload_id: str) -> bool:
        try:
            self._upload(bucket, upload_id)
        except StorageError as exc:
            if exc.code != "NoSuchUpload":
                raise
            return False
        return True

    def begin_part(self, bucket: str, key: str, upload_id: str, part_number: int,
                   checksum_algorithms: Iterable[str] = (), sha256: bool = True,
                   expected_size: Optional[int] = None) -> PendingWrite:
        self._upload(bucket, upload_id, key, fresh=False)
        if not 1 <= part_number <= MAX_PART_NUMBER:
            raise StorageError("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
        # every part's CRC32 (zlib: cheap), so a whole-object CRC32 is known before Complete assembles
        algorithms = list(checksum_algorithms)
        if "crc32" not in algorithms:
            algorithms.append("crc32")
        return self._spool(algorithms, MAX_PART_SIZE, sha256)

    def commit_part(self, bucket: str, key: str, upload_id: str, part_number: int, pending: PendingWrite,
                    now: float, checksums: Optional[dict] = None) -> PartInfo:
        """UploadPart of the backing upload, then the part's record: once this returns, any
        instance can list, complete or abort with this part."""
        from botocore.exceptions import ClientError

        try:
            record = self._upload(bucket, upload_id, key, fresh=False)
            if not pending.closed:
                pending.flush()
            try:
                with open(pending.path, "rb") as fh:
                    answer = self.store.call("upload_part", Key=self._object_name(bucket, key), Body=fh,
                                        UploadId=record["backing_upload_id"], PartNumber=part_number,
                                        ContentLength=pending.size,
                                        ContentMD5=base64.b64encode(pending.md5.digest()).decode("ascii"))
            except ClientError as exc:
                # completed or aborted meanwhile by another instance (some stores answer that with a 500)
                if code(exc) in ("NoSuchUpload", "404") or not self.upload_active(bucket, upload_id):
                    self._forget(upload_id)
                    raise no_such_upload(upload_id) from None
                raise self.store.error(exc, "upload_part") from None
        finally:
            pending.abort()
        info = PartInfo(part_number, pending.size, f'"{pending.md5.hexdigest()}"', now, dict(checksums or {}))
        self.store.put_json(self._part_name(bucket, upload_id, part_number),
                       records.part_record(info, pending.md5.hexdigest(), answer["ETag"],
                                           pending.checksum_b64("crc32") if "crc32" in pending.checksums else None))
        self._remember(upload_id, record)
        return info

    def _part_records(self, bucket: str, upload_id: str) -> dict[int, dict]:
        found = {}
        for name, _ in self.store.names(self._state(bucket, "uploads", upload_id) + "/"):
            number = records.part_number_of(name)
            if number is None:
                continue
            record = self.store.get_json(name)
            if isinstance(record, dict):
                found[number] = record
        return found

    def list_parts(self, bucket: str, key: str, upload_id: str) -> tuple[dict, list[PartInfo]]:
        record = self._upload(bucket, upload_id, key)
        parts = [records.part_info(r) for _, r in sorted(self._part_records(bucket, upload_id).items())]
        return record, parts

    def _upload_records(self, bucket: str) -> list[tuple[str, dict]]:
        out = []
        for name, is_prefix in self.store.names(self._state(bucket, "uploads") + "/", "/"):
            upload_id = records.upload_id_of(name)
            if is_prefix or upload_id is None:
                continue
            record = self.store.get_json(name)
            if isinstance(record, dict):
                out.append((upload_id, record))
        return out

    def list_uploads(self, bucket: str) -> list[tuple[str, dict]]:
        self._check_bucket(bucket)
        return [(u, r) for u, r in self._upload_records(bucket) if "completed" not in r]

    def complete_multipart(self, bucket: str, key: str, upload_id: str, parts: list, now: float,
                           object_checksum: Optional[tuple[str, str]] = None, if_match: Optional[str] = None,
                           if_none_match: bool = False) -> ObjectInfo:
        """Complete the backing upload with the parts the client lists, checked as on local disk
        (ETags, checksums, sizes); the object's record is written before the answer. A repeated
        Complete (from any instance) answers what the first one did."""
        from botocore.exceptions import ClientError

        self._check_bucket(bucket)
        try:
            record = self._upload(bucket, upload_id, key)
        except StorageError:
            done = self._completed(bucket, upload_id, key)
            if done is None:
                raise
            return done
        metas = records.check_complete(parts, self._part_records(bucket, upload_id))
        self._check_write_conditions(bucket, key, if_match, if_none_match)
        checksums, checksum_type, full_object = records.object_checksums(record, metas, object_checksum)
        name = self._object_name(bucket, key)
        digest = hashlib.md5(b"".join(bytes.fromhex(m["md5"]) for m in metas))
        etag = f'"{digest.hexdigest()}-{len(metas)}"'
        listed = [{"PartNumber": m["part_number"], "ETag": m["backing_etag"]} for m in metas]
        try:
            backing_etag = self.store.call("complete_multipart_upload", Key=name, UploadId=record["backing_upload_id"],
                                           MultipartUpload={"Parts": listed})["ETag"]
        except ClientError as exc:
            done = self._completed(bucket, upload_id, key)
            if done is not None:
                return done  # another instance completed it meanwhile
            if code(exc) in ("InvalidPart", "InvalidPartOrder", "EntityTooSmall"):
                raise StorageError("InvalidPart", "One or more of the specified parts could not be found.") from None
            if code(exc) not in ("NoSuchUpload", "404"):
                raise self.store.error(exc, "complete_multipart_upload") from None
            # the store assembled it, but the instance that asked stopped before recording it (or is
            # recording it now): the object with these very parts is there, so this Complete finishes
            backing_etag = self._assembled_etag(name, [m["backing_etag"] for m in metas])
            if backing_etag is None:
                raise no_such_upload(upload_id) from None
        info = ObjectInfo(key=key, size=sum(m["size"] for m in metas), etag=etag,
                          last_modified=now, content_type=record.get("content_type") or "binary/octet-stream",
                          metadata=dict(record.get("metadata") or {}), checksums=checksums, parts=len(metas),
                          headers=dict(record.get("headers") or {}), part_sizes=[m["size"] for m in metas],
                          checksum_type=checksum_type)
        if full_object is not None:
            computed = self._full_checksum(name, full_object[0])
            info.checksums = {full_object[0]: computed}
            if full_object[1] is not None and computed != full_object[1]:
                self.store.delete(name)
                self._retire(bucket, upload_id, None, now)
                raise StorageError("BadDigest", f"The {full_object[0].upper()} you specified did not match the "
                                   "calculated checksum.")
        self.store.put_json(self._meta_name(bucket, key), records.object_record(info, backing_etag))
        self._answered(key, backing_etag, info.etag)
        self._retire(bucket, upload_id, info, now)
        return info

    def _assembled_etag(self, name: str, part_etags: list) -> Optional[str]:
        """The backing ETag of the object at ``name`` when it is the multipart object made of
        exactly these parts (its ETag is the MD5 of their MD5s and their count), else ``None``."""
        from botocore.exceptions import ClientError

        try:
            current = self.store.call("head_object", Key=name)["ETag"]
        except ClientError:
            return None
        joined = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags if len(e.strip('"')) == 32)
        expected = f'"{hashlib.md5(joined).hexdigest()}-{len(part_etags)}"'
        return current if current == expected else None

    def _full_checksum(self, name: str, algorithm: str) -> str:
        """A FULL_OBJECT checksum of the assembled object, read back from the store."""
        from stdaemon.s3 import checksums as s3_checksums

        from botocore.exceptions import ClientError

        state = s3_checksums.new_checksum(algorithm)
        try:
            body = self.store.call("get_object", Key=name)["Body"]
        except ClientError as exc:
            raise self.store.error(exc, "get_object") from None
        try:
            for block in iter(lambda: body.read(READ_BLOCK), b""):
                state.update(block)
        finally:
            body.close()
        return s3_checksums.b64(state.digest())

    def _retire(self, bucket: str, upload_id: str, info: Optional[ObjectInfo], now: float) -> None:
        """After Complete: the upload's record becomes what a repeated Complete answers; the part
        records go."""
        if info is not None:
            self.store.put_json(self._upload_name(bucket, upload_id), records.completed_record(info, now))
        else:
            self.store.delete(self._upload_name(bucket, upload_id))
        for name, _ in list(self.store.names(self._state(bucket, "uploads", upload_id) + "/")):
            self.store.delete(name)
        self._forget(upload_id)

    def _completed(self, bucket: str, upload_id: str, key: str) -> Optional[ObjectInfo]:
        if not records.valid_upload_id(upload_id):
            return None
        return records.completed_info(self.store.get_json(self._upload_name(bucket, upload_id)), key)

    def abort_multipart(self, bucket: str, key: str, upload_id: str) -> None:
        from botocore.exceptions import ClientError

        record = self._upload(bucket, upload_id, key)
        try:
            self.store.call("abort_multipart_upload", Key=self._object_name(bucket, key),
                       UploadId=record["backing_upload_id"])
        except ClientError as exc:
            if code(exc) not in ("NoSuchUpload", "404"):
                raise self.store.error(exc, "abort_multipart_upload") from None
        self._retire(bucket, upload_id, None, 0.0)
