"""Object storage engine behind the S3 surface.

Layout: each bucket is a directory (``buckets`` maps a bucket name to it; names not in the map do
not exist). An object ``key`` is the file ``<bucket dir>/<key>`` so operators can browse job
outputs with ordinary tools. Engine state lives in ``<bucket dir>/.stdaemon/``:

* ``tmp/``        bodies being received (temp files; never visible as objects),
* ``meta/<hh>/<sha256 of key>.json``  the sidecar of each object (key, ETag, size, content type,
  user metadata, checksums, last-modified),
* ``multipart/<upload id>/``  one multipart upload: ``upload.json`` and its parts
  (``<n>.part`` + ``<n>.json``).

Durability: a body is written to ``tmp/``, fsynced, renamed into place, and the directory fsynced;
then the sidecar is written the same way. A crash before the rename leaves only a temp file
(removed at start-up); a crash between the two renames leaves a complete object whose sidecar is
stale, detected by its size/mtime and answered with a derived ETag.

Every method here blocks (file I/O): call them from a thread (the S3 service runs them in its
``s3-io`` pool). The engine takes ``now`` explicitly: it never reads the clock itself.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
import uuid
from dataclasses import dataclass, field, asdict
from typing import Any, Callable, Iterable, Mapping, Optional

from stdaemon.s3 import checksums as s3_checksums
from stdaemon.s3.errors import (  # noqa: F401 - StorageError is part of this module's interface
    StorageError, no_such_bucket, no_such_key, precondition_failed,
)
from stdaemon.s3.keys import InvalidKey, validate_key
from stdaemon.store.files import fsync_dir

SYSTEM_DIR = ".stdaemon"
MAX_OBJECT_SIZE = 5 * 1024 ** 4
MAX_SEGMENT_BYTES = 255  # NAME_MAX of the usual Linux file systems
#: File that holds a folder marker: the object ``a/b/`` is ``<bucket>/a/b/.stdaemon-folder``
#: (a file and a directory cannot share the name ``b``). The name is reserved as a key segment.
FOLDER_MARKER = ".stdaemon-folder"


def etag_matches(header: str, etag: str) -> bool:
    """``If-Match``/``If-None-Match`` semantics: a comma-separated ETag list or ``*``."""
    tags = [t.strip() for t in header.split(",")]
    tags = [t[2:] if t.startswith("W/") else t for t in tags]
    return "*" in tags or etag.strip('"') in [t.strip('"') for t in tags]


@dataclass
class ObjectInfo:
    key: str
    size: int
    etag: str  # quoted, as S3 returns it
    last_modified: float
    content_type: str = "binary/octet-stream"
    metadata: dict = field(default_factory=dict)
    checksums: dict = field(default_factory=dict)  # {"crc32": base64, ...}
    parts: int = 0
    headers: dict = field(default_factory=dict)  # system metadata: {"Cache-Control": ..., ...}
    part_sizes: list = field(default_factory=list)  # sizes of the parts of a multipart object
    checksum_type: str = ""  # "" (single upload), "COMPOSITE" or "FULL_OBJECT"


@dataclass
class PartInfo:
    part_number: int
    size: int
    etag: str
    last_modified: float
    checksums: dict = field(default_factory=dict)


def _write_json_atomic(path: str, data: Any, tmp_dir: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.json")
    encoded = json.dumps(data).encode("utf-8")  # one write, not one per JSON token
    with open(tmp, "wb") as fh:
        fh.write(encoded)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(path))


class PendingWrite:
    """A body being received into a temp file: ``write`` pieces, then ``commit``/``abort``.

    Computes MD5 (the ETag), SHA-256 (for signed payloads) and any requested
    ``x-amz-checksum-*`` algorithms while writing.
    """

    def __init__(self, tmp_dir: str, checksum_algorithms: Iterable[str] = (), max_size: Optional[int] = None,
                 sha256: bool = True, live: Optional[set] = None,
                 in_place: Optional[tuple[str, int]] = None, on_done: Optional[Callable[[], None]] = None):
        # in_place=(path, offset): into an existing file (a part in its upload's assembly file), which
        # abort leaves where it is. on_done runs once, when the write is released.
        self.in_place, self._on_done = in_place, on_done
        self._live = live if live is not None else set()
        if in_place is not None:
            self.path, self.offset = in_place
            self._fh = open(self.path, "r+b")
            self._fh.seek(self.offset)
        else:
            os.makedirs(tmp_dir, exist_ok=True)
            self.path, self.offset = os.path.join(tmp_dir, f"{uuid.uuid4().hex}.tmp"), 0
            self._live.add(self.path)   # temp files in use: the clean-up timer never touches them
            self._fh = open(self.path, "wb")
        self.size = 0
        self.md5 = hashlib.md5()
        self.sha256 = hashlib.sha256() if sha256 else None  # only when the payload hash is signed
        self.checksums = {name: s3_checksums.new_checksum(name) for name in checksum_algorithms}
        self.max_size = max_size
        self.closed = False
        self.mtime_ns: Optional[int] = None  # of the durable temp file (a rename keeps it)

    def write(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.max_size is not None and self.size > self.max_size:
            raise StorageError("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size", 400)
        self.md5.update(data)
        if self.sha256 is not None:
            self.sha256.update(data)
        for state in self.checksums.values():
            state.update(data)
        self._fh.write(data)

    def checksum_b64(self, algorithm: str) -> str:
        return s3_checksums.b64(self.checksums[algorithm].digest())

    def flush(self) -> None:
        """Make the temp file durable (before it is renamed into place)."""
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.mtime_ns = os.fstat(self._fh.fileno()).st_mtime_ns
        self._fh.close()
        self.closed = True

    def abort(self) -> None:
        if not self.closed:
            try:
                self._fh.close()
            except OSError:
                pass
            self.closed = True
        if self.in_place is None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.release()

    def release(self) -> None:
        self._live.discard(self.path)
        done, self._on_done = self._on_done, None
        if done is not None:
            done()


class Bucket:
    def __init__(self, name: str, root: str):
        self.name = name
        self.root = os.path.abspath(root)
        self.system = os.path.join(self.root, SYSTEM_DIR)
        self.tmp = os.path.join(self.system, "tmp")
        self.meta = os.path.join(self.system, "meta")
        self.multipart = os.path.join(self.system, "multipart")

    def ensure(self) -> None:
        for path in (self.root, self.tmp, self.meta, self.multipart):
            os.makedirs(path, mode=0o750, exist_ok=True)

    def object_path(self, key: str) -> str:
        validate_key(key)
        if key.split("/", 1)[0] == SYSTEM_DIR or key.rsplit("/", 1)[-1] == FOLDER_MARKER:
            raise InvalidKey("This key is reserved")
        if key.endswith("/"):
            # a folder marker (s3fs, Hadoop S3A, "create folder" of consoles)
            key = key + FOLDER_MARKER
        if any(len(part.encode("utf-8")) > MAX_SEGMENT_BYTES for part in key.split("/")):
            # each segment is a file or directory name on disk
            raise InvalidKey(f"Each '/'-separated part of a key must be at most {MAX_SEGMENT_BYTES} bytes",
                             "KeyTooLongError")
        path = os.path.abspath(os.path.join(self.root, *key.split("/")))
        if not path.startswith(self.root + os.sep):
            raise InvalidKey("Object key escapes the bucket")
        return path

    def meta_path(self, key: str) -> str:
        """Sidecar of ``key``, named by the key's hash: no key can collide with another's sidecar
        (``x`` vs ``x.json/y``) and the sidecar tree never mirrors object directories."""
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
        return os.path.join(self.meta, digest[:2], digest + ".json")


class ObjectStore:
    """Blocking storage operations on whole objects (run them in a thread); multipart uploads are
    added by :class:`stdaemon.s3.multipart.StorageEngine`."""

    def __init__(self, buckets: Mapping[str, str], created_at: float = 0.0):
        self.buckets = {name: Bucket(name, path) for name, path in buckets.items()}
        self.created_at = created_at
        self._commit_lock = threading.Lock()  # conditional writes: check and rename as one step
        self.live_temp_files: set[str] = set()

    # ------------------------------------------------------------------ buckets

    async def start(self) -> None:
        """Nothing to prepare on local disk."""

    def check(self) -> str:
        """Local disk is checked by the daemon's own ``disk`` health component."""
        return "local disk"

    def has_bucket(self, name: str) -> bool:
        return name in self.buckets

    def follow_bucket_root(self, name: str, root: str) -> None:
        """New uploads to bucket ``name`` land in ``root`` from now on."""
        current = self.buckets.get(name)
        if current is None or current.root != os.path.abspath(root):
            self.buckets[name] = Bucket(name, root)

    def bucket(self, name: str) -> Bucket:
        bucket = self.buckets.get(name)
        if bucket is None:
            raise no_such_bucket(name)
        bucket.ensure()
        return bucket

    def list_buckets(self) -> list[tuple[str, float]]:
        out = []
        for name, bucket in sorted(self.buckets.items()):
            try:
                created = os.stat(bucket.root).st_mtime
            except OSError:
                created = self.created_at
            out.append((name, created))
        return out

    def startup_cleanup(self) -> int:
        """Remove temp files left by a crash (nothing is in flight at start-up)."""
        removed = 0
        for bucket in self.buckets.values():
            if not os.path.isdir(bucket.tmp):
                continue
            for name in os.listdir(bucket.tmp):
                if os.path.join(bucket.tmp, name) in self.live_temp_files:
                    continue
                try:
                    os.unlink(os.path.join(bucket.tmp, name))
                    removed += 1
                except OSError:
                    pass
        return removed

    # ------------------------------------------------------------------ objects

    def begin_put(self, bucket_name: str, key: str, checksum_algorithms: Iterable[str] = (),
                  max_size: Optional[int] = MAX_OBJECT_SIZE, sha256: bool = True) -> PendingWrite:
        bucket = self.bucket(bucket_name)
        bucket.object_path(key)  # validate before any byte is written
        return PendingWrite(bucket.tmp, checksum_algorithms, max_size, sha256, self.live_temp_files)

    def commit_put(self, bucket_name: str, key: str, pending: PendingWrite, now: float,
                   content_type: Optional[str] = None, metadata: Optional[dict] = None,
                   checksums: Optional[dict] = None, etag: Optional[str] = None,
                   parts: int = 0, headers: Optional[dict] = None, part_sizes: Optional[list] = None,
                   checksum_type: str = "", if_match: Optional[str] = None,
                   if_none_match: bool = False) -> ObjectInfo:
        """Place the object. ``if_none_match`` (``If-None-Match: *``) and ``if_match`` (an ETag
        list or ``*``) make the write conditional: checked and placed under one lock, so two
        conditional writers of one key cannot both succeed."""
        # begin_put made the bucket's directories; _place and the sidecar make what is missing since
        bucket = self.buckets.get(bucket_name) or self.bucket(bucket_name)
        path = bucket.object_path(key)
        if not pending.closed:
            pending.flush()
        info = ObjectInfo(
            key=key, size=pending.size, etag=etag or f'"{pending.md5.hexdigest()}"', last_modified=now,
            content_type=content_type or "binary/octet-stream", metadata=dict(metadata or {}),
            checksums=dict(checksums or {}), parts=parts, headers=dict(headers or {}),
            part_sizes=list(part_sizes or []), checksum_type=checksum_type,
        )
        conditional = if_none_match or if_match is not None
        try:
            if conditional:
                self._commit_lock.acquire()
            try:
                if conditional:
                    self._check_write_conditions(bucket, key, path, if_match, if_none_match)
                self._place(bucket, path, pending.path)
            finally:
                if conditional:
                    self._commit_lock.release()
        except Exception:
            pending.abort()
            raise
        pending.release()
        meta = asdict(info)
        meta["mtime_ns"] = pending.mtime_ns if pending.mtime_ns is not None else os.stat(path).st_mtime_ns
        _write_json_atomic(bucket.meta_path(key), meta, bucket.tmp)
        return info

    def _check_write_conditions(self, bucket: Bucket, key: str, path: str, if_match: Optional[str],
                                if_none_match: bool) -> None:
        exists = os.path.isfile(path)
        if if_none_match and exists:
            raise precondition_failed("If-None-Match")
        if if_match is not None:
            if not exists:
                raise no_such_key(key)
            if not etag_matches(if_match, self._info(bucket, key, path).etag):
                raise precondition_failed("If-Match")

    def _place(self, bucket: Bucket, path: str, tmp_path: str) -> None:
        parent = os.path.dirname(path)
        # a key may not be both an object and a "directory" of other objects; when the parent is a
        # directory, none of its ancestors is a file (one stat instead of one per level)
        probe = bucket.root if os.path.isdir(parent) else parent
        while probe != bucket.root and len(probe) > len(bucket.root):
            if os.path.isfile(probe):
                raise StorageError(
                    "InvalidArgument", "The key conflicts with an existing object (a prefix of it is an object)", 409
                )
            probe = os.path.dirname(probe)
        if os.path.isdir(path):
            raise StorageError("InvalidArgument", "The key conflicts with existing objects under it", 409)
        for attempt in range(3):
            os.makedirs(parent, exist_ok=True)
            try:
                os.replace(tmp_path, path)
                break
            except FileNotFoundError:
                # a concurrent delete pruned the (then empty) parent directory: make it again
                if attempt == 2 or not os.path.exists(tmp_path):
                    raise
        fsync_dir(parent)

    def head(self, bucket_name: str, key: str) -> ObjectInfo:
        bucket = self.bucket(bucket_name)
        try:
            path = bucket.object_path(key)
        except InvalidKey:
            raise no_such_key(key) from None
        return self._info(bucket, key, path)

    def _info(self, bucket: Bucket, key: str, path: str) -> ObjectInfo:
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise no_such_key(key) from None
        if not os.path.isfile(path):
            raise no_such_key(key)
        meta = None
        try:
            with open(bucket.meta_path(key), encoding="utf-8") as fh:
                meta = json.load(fh)
        except (OSError, ValueError):
            meta = None
        if isinstance(meta, dict) and meta.get("key") == key and meta.get("size") == st.st_size \
                and meta.get("mtime_ns") == st.st_mtime_ns:
            meta.pop("mtime_ns", None)
            try:
                return ObjectInfo(**meta)
            except TypeError:  # a sidecar from another version: fall back to what the file says
                pass
        # a file placed by hand, or a sidecar lost to a crash: derive what we can
        return ObjectInfo(
            key=key, size=st.st_size, etag=f'"{st.st_size:x}-{st.st_mtime_ns:x}"', last_modified=st.st_mtime,
        )

    def open_read(self, bucket_name: str, key: str):
        """(open binary file, ObjectInfo)."""
        bucket = self.bucket(bucket_name)
        try:
            path = bucket.object_path(key)
        except InvalidKey:
            raise no_such_key(key) from None
        info = self._info(bucket, key, path)
        try:
            fh = open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise no_such_key(key) from None
        return fh, info

    def delete(self, bucket_name: str, key: str) -> None:
        bucket = self.bucket(bucket_name)
        try:
            path = bucket.object_path(key)
        except InvalidKey:
            return
        for target in (path, bucket.meta_path(key)):
            try:
                if os.path.isfile(target):
                    os.unlink(target)
            except FileNotFoundError:
                pass
        # prune empty directories up to the bucket root
        parent = os.path.dirname(path)
        while parent != bucket.root and parent.startswith(bucket.root + os.sep):
            try:
                os.rmdir(parent)
            except OSError:
                break
            parent = os.path.dirname(parent)
        fsync_dir(os.path.dirname(path) if os.path.isdir(os.path.dirname(path)) else bucket.root)

    def iter_keys(self, bucket_name: str, prefix: str = "") -> list[str]:
        """Every object key of the bucket that starts with ``prefix``, in S3 (UTF-8 byte) order."""
        bucket = self.bucket(bucket_name)
        start = bucket.root
        # descend straight to the deepest directory the prefix names
        head = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        if head:
            try:
                candidate = bucket.object_path(head)
            except InvalidKey:
                return []
            if not os.path.isdir(candidate):
                return []
            start = candidate
        keys = []
        for dirpath, dirnames, filenames in os.walk(start):
            if dirpath == bucket.root and SYSTEM_DIR in dirnames:
                dirnames.remove(SYSTEM_DIR)
            rel = os.path.relpath(dirpath, bucket.root)
            rel = "" if rel == "." else rel.replace(os.sep, "/") + "/"
            for name in filenames:
                key = rel if name == FOLDER_MARKER else rel + name
                if not key:
                    continue  # a marker at the root names no key
                if key.startswith(prefix):
                    try:
                        key.encode("utf-8")
                    except UnicodeEncodeError:
                        continue  # a file placed by hand whose name is not UTF-8: not an S3 key
                    keys.append(key)
        keys.sort(key=lambda k: k.encode("utf-8", "surrogateescape"))
        return keys

    def list_objects(self, bucket_name: str, prefix: str = "", delimiter: str = "", start_after: str = "",
                     max_keys: int = 1000) -> dict:
        """One page of a listing: ``{"contents": [ObjectInfo], "prefixes": [str], "truncated": bool,
        "next_marker": str}``; ``next_marker`` is the last key or common prefix returned."""
        bucket = self.bucket(bucket_name)
        contents: list[ObjectInfo] = []
        prefixes: list[str] = []
        truncated = False
        last = ""
        if max_keys <= 0:
            # S3 answers max-keys=0 with an empty, untruncated page (no token to follow)
            return {"contents": contents, "prefixes": prefixes, "truncated": False, "next_marker": last}
        after = start_after.encode("utf-8", "surrogateescape")
        count = 0
        for key in self.iter_keys(bucket_name, prefix):
            encoded = key.encode("utf-8", "surrogateescape")
            if after and encoded <= after:
                continue
            if delimiter:
                rest = key[len(prefix):]
                index = rest.find(delimiter)
                if index >= 0:
                    common = prefix + rest[: index + len(delimiter)]
                    if prefixes and prefixes[-1] == common:
                        continue
                    if after and common.encode("utf-8", "surrogateescape") <= after:
                        continue
                    if count >= max_keys:
                        truncated = True
                        break
                    prefixes.append(common)
                    last = common
                    count += 1
                    continue
            if count >= max_keys:
                truncated = True
                break
            try:
                contents.append(self._info(bucket, key, bucket.object_path(key)))
            except (StorageError, InvalidKey):
                continue
            last = key
            count += 1
        return {"contents": contents, "prefixes": prefixes, "truncated": truncated, "next_marker": last}


def content_md5_matches(header_value: str, md5_digest: bytes) -> bool:
    try:
        given = base64.b64decode(header_value.strip(), validate=True)
    except (ValueError, TypeError):
        return False
    return given == md5_digest
