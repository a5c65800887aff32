"""The S3-compatible storage surface (S8), path-style under ``/api/cloud/storage``.

Request flow for an upload (PutObject / UploadPart):

1. when the headers are complete (``body_policy`` → ``admit``), before a byte of the body is
   read, the caller is authenticated from the head (:mod:`stdaemon.s3.auth`: SigV4
   header/presigned, SigV2, operator API key, ``X-Upload-Token``/``X-SimpleTuner-Secret``) and
   the key checked against its scope; a refusal is answered at once and nothing is stored.
2. admitted, the surface installs an :class:`UploadSink` as ``request.content``; Twisted feeds it
   the body as it arrives (HTTP ``chunked`` framing already removed). The sink queues the bytes
   and a worker thread decodes ``aws-chunked`` (verifying chunk signatures as they come), hashes
   (MD5 for the ETag, SHA-256, requested CRCs) and writes a temp file. The transport is paused
   while too much is queued, so memory stays flat.
3. when the body is complete the handler waits for the sink, verifies the payload hash and
   checksums, and only then renames the temp file into place (:mod:`stdaemon.s3.objects`).
   Any failure deletes the temp file: nothing partial is ever visible.

Errors are S3 XML documents with S3 codes and statuses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote_to_bytes

from klein import Klein
from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.server import NOT_DONE_YET

from stdaemon.s3 import (
    checksums as s3_checksums, metadata as s3_metadata, subresources as s3_subresources,
    xml_documents as s3_xml, sigv4,
)
from stdaemon.s3.aws_chunked import AwsChunkedDecoder, ChunkedError
from stdaemon.s3.keys import InvalidKey, validate_key
from stdaemon.timestamps import iso
from stdaemon.http.request import BodyPolicy, NullSink, RejectBody
from stdaemon.http.errors import ApiError
from stdaemon.http.root import client_ip
from stdaemon.s3.auth import AuthError, Caller, S3Authenticator
from stdaemon.http.surface import PUBLIC, Response, Surface, route
from stdaemon.logs import get_logger
from stdaemon.s3 import credentials as credentials_store
from stdaemon.threads import install_pool
from stdaemon.s3.objects import MAX_PART_SIZE, Bucket, StorageEngine, StorageError

log = get_logger("stdaemon.http.storage")

PREFIX = "/api/cloud/storage"
GIB = 1024 ** 3
#: PutObject's single-request limit (S3: 5 GiB); larger objects use multipart.
MAX_PUT_BYTES = 5 * GIB
#: Slack for aws-chunked framing on top of the decoded limit.
CHUNK_OVERHEAD = 64 * 1024 * 1024
#: XML request bodies (CompleteMultipartUpload of 10 000 parts, DeleteObjects of 1 000 keys).
SMALL_BODY = 4 * 1024 * 1024
HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024
READ_CHUNK = 256 * 1024
#: GetObject query parameters that override response headers (presigned downloads use them).
RESPONSE_OVERRIDES = {
    "response-content-type": "Content-Type",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
    "response-content-language": "Content-Language",
    "response-cache-control": "Cache-Control",
    "response-expires": "Expires",
}


_REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 429: b"Too Many Requests",
            500: b"Internal Server Error", 501: b"Not Implemented"}


class S3Error(Exception):
    def __init__(self, code: str, message: str, status: Optional[int] = None, **extra: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status or s3_xml.status_for(code)
        self.extra = extra


def _from(exc: Exception) -> S3Error:
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, StorageError):
        return S3Error(exc.code, exc.message, exc.status if exc.status != 400 else None, **exc.extra)
    if isinstance(exc, (ChunkedError, sigv4.SignatureError, InvalidKey)):
        return S3Error(exc.code, exc.message)
    if isinstance(exc, AuthError):
        return S3Error(exc.code, exc.message, **exc.extra)
    raise exc


# --------------------------------------------------------------------------- progress


class UploadProgress:
    """Per-job upload progress (``ctx.upload_progress``) for ``GET /api/cloud/jobs/{id}``.

    ``snapshot(job_id)`` → ``{objects_completed, bytes_received, in_flight: [{key, bytes_received,
    started_at}]}``. Also keeps totals for metrics (``uploads_total``, ``upload_bytes_total``).
    Only authenticated uploads are counted, against the job whose credential sent them (an
    operator's upload counts for the job whose prefix it writes to): the sink that reports here
    exists only once the request was admitted. A job whose only uploads failed is forgotten.
    """

    def __init__(self, clock: Any):
        self.clock = clock
        self._jobs: dict[str, dict] = {}
        self._next = 0
        self.uploads_total = 0
        self.upload_bytes_total = 0
        self.upload_failures_total = 0

    def _job(self, job_id: str) -> dict:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = {"objects_completed": 0, "bytes_received": 0, "in_flight": {}}
        return job

    def start(self, job_id: str, key: str) -> int:
        self._next += 1
        self._job(job_id)["in_flight"][self._next] = {"key": key, "bytes_received": 0,
                                                      "started_at": self.clock.seconds()}
        return self._next

    def add(self, job_id: str, token: int, count: int) -> None:
        entry = self._job(job_id)["in_flight"].get(token)
        if entry is not None:
            entry["bytes_received"] += count

    def finish(self, job_id: str, token: int, stored_bytes: int = 0, object_completed: bool = False,
               failed: bool = False) -> None:
        job = self._job(job_id)
        job["in_flight"].pop(token, None)
        if failed:
            self.upload_failures_total += 1
            if not job["in_flight"] and not job["objects_completed"] and not job["bytes_received"]:
                del self._jobs[job_id]  # a failed first upload leaves nothing behind
            return
        job["bytes_received"] += stored_bytes
        self.upload_bytes_total += stored_bytes
        if object_completed:
            job["objects_completed"] += 1
            self.uploads_total += 1

    def complete_object(self, job_id: str) -> None:
        self._job(job_id)["objects_completed"] += 1
        self.uploads_total += 1

    def __call__(self, job_id: str) -> dict:
        return self.snapshot(job_id)

    def tracked_jobs(self) -> int:
        """How many jobs have progress in memory (only jobs with authenticated uploads)."""
        return len(self._jobs)

    def snapshot(self, job_id: str) -> dict:
        job = self._jobs.get(job_id) or {"objects_completed": 0, "bytes_received": 0, "in_flight": {}}
        return {
            "objects_completed": job["objects_completed"],
            "bytes_received": job["bytes_received"] + sum(e["bytes_received"] for e in job["in_flight"].values()),
            "in_flight": [dict(e, started_at=iso(e["started_at"])) for e in job["in_flight"].values()],
        }


# --------------------------------------------------------------------------- body sink


@dataclass
class Target:
    bucket: str
    key: str
    upload_id: Optional[str] = None
    part_number: Optional[int] = None


class UploadSink(NullSink):
    """``request.content`` for uploads: decodes and writes the body off the reactor thread."""

    def __init__(self, surface: "StorageSurface", request: Any, length: Optional[int], target: Target,
                 error: Optional[S3Error] = None, caller: Optional[Caller] = None):
        self.surface = surface
        self.request = request
        self.target = target
        self.caller = caller
        self.error: Optional[Exception] = error
        self.pending = None
        self.closed = False
        # one growing buffer, not a list of pieces: a body sent in tiny HTTP chunks costs its bytes,
        # not an object per piece
        self._queue = bytearray()
        self._queued = 0  # queued + being processed
        self._busy = False
        self._paused = False
        self._eof = False
        self._waiters: list[defer.Deferred] = []
        self._finalised = False
        self.received = 0
        headers = request.requestHeaders
        payload = (headers.getRawHeaders(b"x-amz-content-sha256") or [b""])[0].decode("latin-1")
        encoding = b",".join(headers.getRawHeaders(b"content-encoding") or []).decode("latin-1").lower()
        self.streaming = payload in sigv4.STREAMING_PAYLOADS or "aws-chunked" in encoding
        # the body's SHA-256 is needed only when the client signed it (64 hex digits)
        self.signed_payload = len(payload) == 64 and not self.streaming
        self.max_size = MAX_PART_SIZE if target.upload_id else surface.max_put_bytes
        self.decoder: Optional[AwsChunkedDecoder] = None
        self.checksum_algorithms: list[str] = []
        for name, _ in _header_items(headers):
            algorithm = s3_checksums.algorithm_from_header(name)
            if algorithm and algorithm not in self.checksum_algorithms:
                self.checksum_algorithms.append(algorithm)
        if self.streaming and self.error is None:
            trailer = b",".join(headers.getRawHeaders(b"x-amz-trailer") or []).decode("latin-1")
            decoded = (headers.getRawHeaders(b"x-amz-decoded-content-length") or [b""])[0]
            signer = caller.signer if caller is not None else None
            try:
                self.decoder = AwsChunkedDecoder(
                    signer=signer,
                    trailer_names=[t for t in trailer.split(",") if t.strip()],
                    signed_trailer=signer is not None and payload == sigv4.STREAMING_SIGNED_TRAILER,
                    decoded_length=int(decoded) if decoded.strip() else None,
                    max_decoded=self.max_size,
                )
            except (ChunkedError, ValueError) as exc:
                self.error = S3Error("InvalidRequest", getattr(exc, "message", "invalid aws-chunked headers"))
        elif length is not None and length > self.max_size and self.error is None:
            self.error = S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        self.job_id = caller.job_id if caller is not None and caller.kind == "job" else surface.job_for(target)
        self.progress_token = None
        if self.job_id and caller is not None:
            self.progress_token = surface.progress.start(self.job_id, target.key)

    # file-like surface Twisted expects ------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.received += len(data)
        if self.progress_token is not None:
            self.surface.progress.add(self.job_id, self.progress_token, len(data))
        if self.error is not None:
            return  # refused already: drain and drop
        self._queue += data
        self._queued += len(data)
        if self._queued > HIGH_WATER and not self._paused:
            transport = getattr(getattr(self.request, "channel", None), "transport", None)
            if transport is not None:
                transport.pauseProducing()
                self._paused = True
        self._kick()

    def close(self) -> None:
        """Twisted closes ``content`` when the request ends or the connection is lost."""
        if self.closed:
            return
        self.closed = True
        if not self._finalised:
            self._finalised = True
            self._queue.clear()
            self._queued = 0
            self._after_idle(self._abort_in_thread)
            if self.progress_token is not None:
                self.surface.progress.finish(self.job_id, self.progress_token, failed=True)
                self.progress_token = None

    # worker -------------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._busy or not self._queue:
            if not self._busy and not self._queue:
                self._wake()
            return
        batch = bytes(self._queue[:BATCH_BYTES])
        del self._queue[:BATCH_BYTES]
        size = len(batch)
        self._busy = True
        d = self.surface.run(self._process, batch)
        d.addBoth(self._processed, size)

    def _processed(self, result: Any, size: int) -> None:
        self._busy = False
        self._queued -= size
        if isinstance(result, Failure) and self.error is None:
            log.failure("Upload worker failed", failure=result)
            self.error = S3Error("InternalError", "We encountered an internal error. Please try again.")
        if self.error is not None and not self.closed and getattr(self.request, "receiving", False):
            # a bad chunk (signature, size) while the body still arrives: answer now, drop the rest
            err = _from(self.error)
            body = s3_xml.error(err.code, err.message, "", f"/{self.target.bucket}/{self.target.key}", **err.extra)
            self.request.refuse_body(err.status, _REASONS.get(err.status, b"Error"), b"application/xml", body)
        if self._paused and self._queued < LOW_WATER:
            self._paused = False
            transport = getattr(getattr(self.request, "channel", None), "transport", None)
            if transport is not None:
                transport.resumeProducing()
        self._kick()

    def _process(self, batch: bytes) -> None:
        """In a worker thread: decode, hash and write one batch."""
        if self.error is not None or self.closed:
            return
        try:
            if self.pending is None:
                self.pending = self.surface.begin_write(self.target, self.checksum_algorithms, self.max_size,
                                                       self.signed_payload)
            pieces = self.decoder.feed(batch) if self.decoder is not None else (batch,)
            for piece in pieces:
                self.pending.write(piece)
        except (ChunkedError, StorageError, InvalidKey, S3Error) as exc:
            self.error = _from(exc)
        except Exception:  # disk full, permissions, …: a server fault, logged with its traceback
            log.failure("Upload write failed")
            self.error = S3Error("InternalError", "We encountered an internal error. Please try again.")

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _after_idle(self, fn: Any) -> None:
        d = self._drained()
        d.addCallback(lambda _: self.surface.run(fn))
        d.addErrback(lambda f: log.failure("Upload clean-up failed", failure=f))

    def _abort_in_thread(self) -> None:
        if self.pending is not None:
            self.pending.abort()

    def _drained(self) -> defer.Deferred:
        """Fires once every queued chunk has been written by the I/O thread."""
        d = defer.Deferred()
        if not self._busy and not self._queue:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    async def finished(self) -> None:
        """Wait for every byte to be written and the stream to end; raise ``S3Error`` if it failed."""
        await self._drained()
        await self.surface.run(self._end_in_thread)
        if self.error is not None:
            raise _from(self.error)

    def _end_in_thread(self) -> None:
        if self.error is not None:
            return
        try:
            if self.pending is None:
                self.pending = self.surface.begin_write(self.target, self.checksum_algorithms, self.max_size,
                                                       self.signed_payload)
            if self.decoder is not None:
                self.decoder.finish()
            self.pending.flush()
        except (ChunkedError, StorageError, InvalidKey, S3Error) as exc:
            self.error = _from(exc)

    async def discard(self) -> None:
        """Delete what was written (refused request)."""
        if self._finalised:
            return
        self._finalised = True
        await self._drained()
        await self.surface.run(self._abort_in_thread)
        if self.progress_token is not None:
            self.surface.progress.finish(self.job_id, self.progress_token, failed=True)
            self.progress_token = None

    def committed(self, stored: int, object_completed: bool) -> None:
        self._finalised = True
        if self.progress_token is not None:
            self.surface.progress.finish(self.job_id, self.progress_token, stored, object_completed)
            self.progress_token = None


def _header_items(headers: Any):
    for name, values in headers.getAllRawHeaders():
        for value in values:
            yield name.decode("latin-1").lower(), value.decode("latin-1")


class _S3Headers(Headers):
    """Response headers that send ``x-amz-*`` names in lower case, as S3 does: clients keep the
    case of user-metadata names (``x-amz-meta-step`` → ``{"step": …}``), and Twisted would
    otherwise write ``X-Amz-Meta-Step``."""

    def getAllRawHeaders(self):
        for name, values in super().getAllRawHeaders():
            if name[:6].lower() == b"x-amz-":
                name = name.lower()
            yield name, values


#: S3 error codes for the statuses the root answers on S3 paths by itself.
API_ERROR_CODES = {
    400: "InvalidRequest", 401: "AccessDenied", 403: "AccessDenied", 404: "NoSuchKey",
    405: "MethodNotAllowed", 413: "EntityTooLarge", 429: "SlowDown", 500: "InternalError",
    503: "ServiceUnavailable",
}


def _splittable(raw_uri: bytes) -> bool:
    try:
        StorageSurface.split(raw_uri)
    except S3Error:
        return False
    return True


def _xml_error(request: Any, err: S3Error, resource: str = "") -> Response:
    body = s3_xml.error(err.code, err.message, getattr(request, "correlation_id", ""), resource, **err.extra)
    return Response(body=body, status=err.status, headers={"x-amz-request-id": getattr(request, "correlation_id", "")},
                    content_type="application/xml")


# --------------------------------------------------------------------------- the surface


class StorageSurface(Surface):
    app = Klein()
    prefixes = (PREFIX,)

    def __init__(self, ctx: Any, buckets: Optional[dict] = None, max_put_bytes: int = MAX_PUT_BYTES,
                 multipart_max_age: float = 7 * 86400.0, cleanup_interval: float = 3600.0):
        super().__init__(ctx)
        self.reactor = ctx.reactor
        self._fixed_buckets = buckets is not None
        buckets = buckets or {credentials_store.UPLOAD_BUCKET: ctx.outputs_dir()}
        self.engine = StorageEngine(buckets, created_at=ctx.clock.seconds())
        self.max_put_bytes = max_put_bytes
        self.multipart_max_age = multipart_max_age
        self.pool = install_pool(ctx, "s3-io", maxthreads=16)
        self.auth = S3Authenticator(ctx, PREFIX)
        self.progress = UploadProgress(ctx.clock)
        ctx.upload_progress = self.progress
        if getattr(ctx, "upload_credentials", None) is None or not isinstance(
                ctx.upload_credentials, credentials_store.UploadCredentials):
            credentials_store.install(ctx)
        self._cleaned_at_start = False
        ctx.add_timer("s3-multipart-cleanup", cleanup_interval, self.cleanup, now=True)

    # -- plumbing ------------------------------------------------------------------------------

    @property
    def credentials(self) -> credentials_store.UploadCredentials:
        return self.ctx.upload_credentials

    def run(self, fn: Any, *args: Any, **kwargs: Any) -> defer.Deferred:
        return self.pool.run(fn, *args, **kwargs)

    def rate_limit_exempt(self, request: Any, match: Any) -> bool:
        """UploadPart of a multipart upload in progress is not counted by the
        rate limiter: a checkpoint of a few GiB is hundreds of parts, and
        counting each against the storage rule (50/min per IP) would fail any
        large upload from a non-loopback client.  The CreateMultipartUpload
        that started the upload was counted, and a part still has to pass
        the upload's SigV4 authentication."""
        if request.method != b"PUT":
            return False
        upload_id = request.args.get(b"uploadId")
        part_number = request.args.get(b"partNumber")
        bucket = match.args.get("bucket")
        if not upload_id or not part_number or not bucket:
            return False
        try:
            return self.engine.upload_exists(bucket, upload_id[0].decode("ascii"))
        except UnicodeDecodeError:
            return False

    async def cleanup(self) -> None:
        self.refresh_buckets()
        if not self._cleaned_at_start:
            self._cleaned_at_start = True
            await self.run(self.engine.startup_cleanup)
        removed = await self.run(self.engine.cleanup_stale, self.ctx.clock.seconds(), self.multipart_max_age)
        if removed:
            log.info("Removed {count} stale multipart uploads", count=removed)

    def outputs_root(self) -> str:
        """Directory of the ``outputs`` bucket: provider setting ``s3_output_path`` when it was set
        (file, env or API), else ``<state>/outputs`` (``ctx.outputs_root()``)."""
        return self.ctx.outputs_root()

    def refresh_buckets(self) -> None:
        """Follow a changed ``s3_output_path`` (new uploads land in the new directory)."""
        if self._fixed_buckets:
            return
        root = self.outputs_root()
        current = self.engine.buckets.get(credentials_store.UPLOAD_BUCKET)
        if current is None or current.root != root:
            self.engine.buckets[credentials_store.UPLOAD_BUCKET] = Bucket(credentials_store.UPLOAD_BUCKET, root)

    def job_for(self, target: Target) -> Optional[str]:
        if target.bucket == credentials_store.UPLOAD_BUCKET and "/" in target.key:
            return target.key.split("/", 1)[0]
        return None

    def begin_write(self, target: Target, algorithms: list, max_size: int, sha256: bool = True):
        """In a worker thread: open the temp file for an upload."""
        if target.upload_id:
            return self.engine.begin_part(target.bucket, target.key, target.upload_id, target.part_number or 0,
                                          algorithms, sha256)
        return self.engine.begin_put(target.bucket, target.key, algorithms, max_size, sha256)

    @staticmethod
    def split(raw_uri: bytes) -> tuple[str, str, str, str]:
        """(raw path, raw query, bucket, key) from the request URI; the key is percent-decoded."""
        raw = raw_uri.decode("latin-1")
        raw_path, _, raw_query = raw.partition("?")
        rest = raw_path[len(PREFIX):] if raw_path.startswith(PREFIX) else raw_path
        rest = rest.lstrip("/")
        bucket, _, key = rest.partition("/")
        try:
            bucket = unquote_to_bytes(bucket).decode("utf-8")
            key = unquote_to_bytes(key).decode("utf-8")
        except UnicodeDecodeError:
            raise S3Error("InvalidURI", "Couldn't parse the specified URI.", 400) from None
        return raw_path, raw_query, bucket, key

    def body_policy(self, method: bytes, raw_path: bytes, headers: Any, match: Any) -> BodyPolicy:
        def too_large(limit: int) -> tuple[bytes, bytes]:
            return b"application/xml", s3_xml.error("EntityTooLarge",
                                                    "Your proposed upload exceeds the maximum allowed size")

        def admit_small(request: Any, length: Optional[int]) -> Optional[defer.Deferred]:
            if length == 0:
                return None  # nothing to store: the handler authenticates
            return defer.ensureDeferred(self.admit(request, raw_path, None, None, length, match))

        small = BodyPolicy(max_bytes=SMALL_BODY, too_large=too_large, admit=admit_small)
        if method.upper() != b"PUT":
            return small
        self.refresh_buckets()
        try:
            path_only, raw_query, bucket, key = self.split(raw_path)
        except S3Error:
            return small
        if not key:
            return small
        query = dict(sigv4.parse_query(raw_query))
        names = [n.decode("latin-1") for n in query]
        if s3_subresources.subresource_of(names) not in ("", "uploadId"):
            # PutObjectAcl, PutObjectTagging, …: a small XML body, never an object upload
            return small
        upload_id = query.get(b"uploadId")
        target = Target(bucket, key)
        error = None
        if upload_id is not None:
            target.upload_id = upload_id.decode("latin-1")
            try:
                target.part_number = int(query.get(b"partNumber", b"0"))
            except ValueError:
                error = S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive")
        try:
            validate_key(key)
        except InvalidKey as exc:
            error = S3Error(exc.code, exc.message)
        if headers.getRawHeaders(b"x-amz-copy-source"):
            error = S3Error("NotImplemented", "Copying objects is not supported by this endpoint", 400)
        limit = (MAX_PART_SIZE if upload_id is not None else self.max_put_bytes) + CHUNK_OVERHEAD

        def admit(request: Any, length: Optional[int]) -> defer.Deferred:
            return defer.ensureDeferred(self.admit(request, raw_path, target, error, length, match))

        def sink(request: Any, length: Optional[int]) -> UploadSink:
            return UploadSink(self, request, length, target, None, getattr(request, "s3_caller", None))

        return BodyPolicy(max_bytes=limit, sink_factory=sink, too_large=too_large, admit=admit)

    # -- authentication ------------------------------------------------------------------------

    async def admit(self, request: Any, raw_uri: bytes, target: Optional[Target], error: Optional[S3Error],
                    length: Optional[int], match: Any = None) -> None:
        """Before the body: authenticate the caller from the head and, for an upload, check what is
        certain to fail (scope, key, size). Raises ``RejectBody`` (S3 XML) to refuse; otherwise the
        caller is kept as ``request.s3_caller`` for the handler. A refusal counts against the
        client's rate limit as the request would have after its body (the root never sees it);
        once over the limit the answer is ``SlowDown`` (429) instead."""
        channel = request.channel
        method = getattr(channel, "_command", b"PUT")
        try:
            raw_path, raw_query, bucket, key = self.split(raw_uri)
            principal = await self.auth.principal_from_head(request, method)
            caller = await self.auth.authenticate(request, method.decode("latin-1"), raw_path, raw_query,
                                                  principal, target=raw_path)
            if target is not None:
                if bucket not in self.engine.buckets:
                    raise S3Error("NoSuchBucket", "The specified bucket does not exist", BucketName=bucket)
                if not caller.allowed(bucket, key, write=True) or not caller.can_write:
                    self.auth.denied(request, "key outside the credential's prefix", target=raw_path)
                    raise S3Error("AccessDenied", "Access Denied")
                if error is not None:
                    raise error
                streaming = (request.requestHeaders.getRawHeaders(b"x-amz-decoded-content-length")
                             or b"aws-chunked" in b",".join(request.requestHeaders.getRawHeaders(b"content-encoding")
                                                            or []).lower())
                if length is not None and not streaming \
                        and length > (MAX_PART_SIZE if target.upload_id else self.max_put_bytes):
                    raise S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        except Exception as exc:
            try:
                err = _from(exc)
            except Exception:
                log.failure("S3 admission failed")
                err = S3Error("InternalError", "We encountered an internal error. Please try again.")
            headers = {}
            if err.status < 500:
                slow_down = await self._count_refusal(request, raw_uri, match)
                if slow_down is not None:
                    err, headers = slow_down
            body = s3_xml.error(err.code, err.message, "", "", **err.extra)
            raise RejectBody(err.status, _REASONS.get(err.status, b"Error"), b"application/xml", body,
                             headers) from None
        request.s3_caller = caller

    async def _count_refusal(self, request: Any, raw_uri: bytes, match: Any) -> Optional[tuple]:
        """Count a refused request with the rate limiter; ``(S3Error, headers)`` when over the limit."""
        limiter = getattr(self.ctx, "rate_limit_middleware", None)
        if limiter is None or match is None:
            return None
        # what the limiter reads, before the request line was handed to the request
        request.path = raw_uri.split(b"?", 1)[0]
        request.args = {}
        request.client_ip = request.client_ip or client_ip(request, getattr(self.ctx, "trusted_proxies", ()))
        try:
            await limiter(request, match)
        except ApiError as exc:
            if exc.status != 429:
                return None
            return S3Error("SlowDown", "Please reduce your request rate.", 429), dict(exc.headers)
        except Exception:
            log.failure("Rate limiting a refused S3 request failed")
        return None

    async def authenticate(self, request: Any, raw_path: str, raw_query: str) -> Caller:
        """The caller of a request: admitted before its body (``request.s3_caller``) or
        authenticated now from its head (requests without a body)."""
        caller = getattr(request, "s3_caller", None)
        if caller is not None:
            return caller
        return await self.auth.authenticate(request, request.method.decode("latin-1"), raw_path, raw_query,
                                            getattr(request, "principal", None))

    def _denied(self, request: Any, reason: str, access_key: str = "", target: str = "") -> None:
        self.auth.denied(request, reason, access_key, target)

    def render_api_error(self, request: Any, error: Any) -> bytes:
        """What the root answers on S3 paths (405 for a method S3 does not have, 429 from the rate
        limiter, …) as an S3 XML error that SDKs parse (and retry, for ``SlowDown``)."""
        code = API_ERROR_CODES.get(error.status, "InvalidRequest" if error.status < 500 else "InternalError")
        message = error.detail
        extra = {}
        if code == "MethodNotAllowed":
            message = "The specified method is not allowed against this resource."
            extra = {"Method": request.method.decode("latin-1", "replace")[:32], "ResourceType": "OBJECT"}
        elif code == "SlowDown":
            message = "Please reduce your request rate."
        request.setResponseCode(error.status)
        for name, value in error.headers.items():
            request.setHeader(name, value)
        request.setHeader("x-amz-request-id", getattr(request, "correlation_id", ""))
        if request.method == b"HEAD":
            request.setHeader("x-amz-error-code", code)
            return b""
        request.setHeader("Content-Type", "application/xml")
        _, _, bucket, key = self.split(request.uri) if _splittable(request.uri) else ("", "", "", "")
        resource = f"/{bucket}/{key}" if key else (f"/{bucket}" if bucket else "/")
        return s3_xml.error(code, message, getattr(request, "correlation_id", ""), resource, **extra)

    # -- routes --------------------------------------------------------------------------------

    @route(app, PREFIX, methods=("GET", "HEAD"), access=PUBLIC)
    async def list_buckets(self, request: Any) -> Any:
        return await self._dispatch(request, self._list_buckets)

    @route(app, PREFIX + "/", methods=("GET", "HEAD"), access=PUBLIC)
    async def list_buckets_slash(self, request: Any) -> Any:
        return await self._dispatch(request, self._list_buckets)

    @route(app, PREFIX + "/<bucket>", methods=s3_subresources.METHODS, access=PUBLIC)
    async def bucket(self, request: Any, bucket: str) -> Any:
        return await self._dispatch(request, self._bucket)

    @route(app, PREFIX + "/<bucket>/", methods=s3_subresources.METHODS, access=PUBLIC)
    async def bucket_slash(self, request: Any, bucket: str) -> Any:
        return await self._dispatch(request, self._bucket)

    @route(app, PREFIX + "/<bucket>/<path:key>", methods=s3_subresources.METHODS, access=PUBLIC)
    async def object(self, request: Any, bucket: str, key: str) -> Any:
        return await self._dispatch(request, self._object)

    async def _dispatch(self, request: Any, handler: Any) -> Any:
        if not isinstance(request.responseHeaders, _S3Headers):
            request.responseHeaders = _S3Headers(dict(request.responseHeaders.getAllRawHeaders()))
        request.setHeader("x-amz-request-id", getattr(request, "correlation_id", ""))
        if not isinstance(getattr(request, "content", None), UploadSink):
            self.refresh_buckets()
        resource = ""
        try:
            raw_path, raw_query, bucket, key = self.split(request.uri)
            resource = f"/{bucket}/{key}" if key else (f"/{bucket}" if bucket else "/")
            return await handler(request, raw_path, raw_query, bucket, key)
        except Exception as exc:
            content = getattr(request, "content", None)
            if isinstance(content, UploadSink):
                await content.discard()
            if _gone(request):
                # the client hung up (Klein cancels the handler): nobody to answer, nothing to log
                log.debug("S3 request ended by the client: {error!r}", error=exc)
                return NOT_DONE_YET
            try:
                err = _from(exc)
            except Exception:
                log.failure("S3 request failed")
                err = S3Error("InternalError", "We encountered an internal error. Please try again.")
            if request.method == b"HEAD":
                request.setResponseCode(err.status)
                request.setHeader("x-amz-error-code", err.code)
                return Response(body=b"", status=err.status)
            return _xml_error(request, err, resource)

    async def _delete_objects(self, request: Any, caller: Caller, bucket: str) -> Any:
        body = self._read_small_body(request)
        self._check_small_body(request, caller, body)
        try:
            keys, quiet = s3_xml.parse_delete(body)
        except s3_xml.MalformedXML:
            raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                          "against our published schema.") from None
        if len(keys) > 1000:
            raise S3Error("MalformedXML", "A DeleteObjects request may name at most 1000 keys")
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
        return Response(body=s3_xml.delete_result([] if quiet else deleted, errors), content_type="application/xml")

    def _check_small_body(self, request: Any, caller: Caller, body: bytes, checksums: bool = True) -> None:
        """Payload hash, Content-MD5 and x-amz-checksum-* of a small XML body."""
        claim = caller.claim
        if claim is not None and len(claim.payload_hash) == 64:
            if not hmac.compare_digest(claim.payload_hash.lower(), hashlib.sha256(body).hexdigest()):
                raise S3Error("XAmzContentSHA256Mismatch",
                              "The provided 'x-amz-content-sha256' header does not match what was computed.")
        md5_header = request.getHeader("content-md5")
        if md5_header is not None:
            try:
                given = base64.b64decode(md5_header.strip(), validate=True)
            except ValueError:
                raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.") from None
            if not hmac.compare_digest(given, hashlib.md5(body).digest()):
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")
        for name, value in _header_items(request.requestHeaders) if checksums else ():
            algorithm = s3_checksums.algorithm_from_header(name)
            if algorithm and not hmac.compare_digest(value.strip().encode(),
                                                     s3_checksums.checksum_b64(algorithm, body).encode()):
                raise S3Error("BadDigest",
                              f"The {algorithm.upper()} you specified did not match the calculated checksum.")

    async def _list_buckets(self, request, raw_path, raw_query, bucket, key) -> Any:
        caller = await self.authenticate(request, raw_path, raw_query)
        buckets = await self.run(self.engine.list_buckets)
        if caller.kind == "job":
            buckets = [b for b in buckets if b[0] == caller.credential.bucket]
        return Response(body=s3_xml.list_buckets(buckets), content_type="application/xml")

    async def _bucket(self, request, raw_path, raw_query, bucket, key) -> Any:
        caller = await self.authenticate(request, raw_path, raw_query)
        if bucket not in self.engine.buckets:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", BucketName=bucket)
        query = {n.decode("utf-8", "replace"): v.decode("utf-8", "replace") for n, v in sigv4.parse_query(raw_query)}
        op = s3_subresources.classify(s3_subresources.BUCKET, request.method.decode("latin-1"), query)
        own_bucket = caller.kind == "operator" or caller.credential.bucket == bucket
        if not op.implemented:
            raise S3Error("NotImplemented", s3_subresources.not_implemented_message(op))
        if op.method == "PUT" and not op.subresource:
            # CreateBucket: buckets are configured, never created; S3 clients (rclone by default)
            # create the bucket before their first upload and take this answer as success
            if not own_bucket:
                raise S3Error("AccessDenied", "Access Denied")
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the named bucket "
                          "succeeded and you already own it.", BucketName=bucket)
        if op.method == "POST":
            return await self._delete_objects(request, caller, bucket)
        if op.subresource in ("location", "acl", "versioning"):
            if not own_bucket:
                raise S3Error("AccessDenied", "Access Denied")
            body = {"location": s3_xml.location_constraint, "acl": s3_xml.access_control_policy,
                    "versioning": s3_xml.versioning_configuration}[op.subresource]()
            return Response(body=body, content_type="application/xml")
        if op.method == "HEAD":
            if not own_bucket:
                raise S3Error("AccessDenied", "Access Denied")
            return Response(body=b"", headers={"x-amz-bucket-region": "us-east-1"})
        if op.subresource == "uploads":
            if caller.kind != "operator":
                raise S3Error("AccessDenied", "Access Denied")
            uploads = await self.run(self.engine.list_uploads, bucket)
            return Response(body=s3_xml.list_uploads(bucket, uploads), content_type="application/xml")
        prefix = query.get("prefix", "")
        scope = None
        if caller.kind == "job":
            scope = caller.list_scope(bucket, prefix)
            if scope is None and bucket == caller.credential.bucket and caller.credential.prefix.startswith(prefix):
                # a listing of a parent of the job's prefix ("", "job") shows only the job's own
                # entries (s3fs checks the bucket with a listing of its root)
                scope = caller.credential.prefix
            if scope is None:
                raise S3Error("AccessDenied", "Access Denied")
        delimiter = query.get("delimiter", "")
        encoding = query.get("encoding-type", "")
        if encoding and encoding != "url":
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
        try:
            max_keys = int(query.get("max-keys", "1000"))
        except ValueError:
            raise S3Error("InvalidArgument", "Provided max-keys not an integer or within integer range") from None
        if max_keys < 0:
            raise S3Error("InvalidArgument", "max-keys must be non-negative")
        max_keys = min(max_keys, 1000)
        url = encoding == "url"
        if query.get("list-type") == "2":
            token = query.get("continuation-token")
            start_after = query.get("start-after", "")
            after = start_after
            if token:
                try:
                    after = base64.b64decode(token.encode("ascii"), altchars=b"-_", validate=True).decode("utf-8")
                    if not after:
                        raise ValueError("empty continuation token")
                except (ValueError, UnicodeError):
                    raise S3Error("InvalidArgument", "The continuation token provided is incorrect") from None
            page = await self._list_page(bucket, prefix, delimiter, after, max_keys, scope)
            next_token = None
            if page["truncated"]:
                next_token = base64.urlsafe_b64encode(page["next_marker"].encode("utf-8")).decode("ascii")
            body = s3_xml.list_objects_v2(bucket, page, prefix, delimiter, max_keys, url, token, next_token,
                                          start_after, fetch_owner=query.get("fetch-owner") == "true")
        else:
            marker = query.get("marker", "")
            page = await self._list_page(bucket, prefix, delimiter, marker, max_keys, scope)
            body = s3_xml.list_objects_v1(bucket, page, prefix, delimiter, max_keys, url, marker)
        return Response(body=body, content_type="application/xml")

    async def _list_page(self, bucket: str, prefix: str, delimiter: str, after: str, max_keys: int,
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

    async def _object(self, request, raw_path, raw_query, bucket, key) -> Any:
        method = request.method.decode("latin-1").upper()
        caller = await self.authenticate(request, raw_path, raw_query)
        if bucket not in self.engine.buckets:
            raise S3Error("NoSuchBucket", "The specified bucket does not exist", BucketName=bucket)
        if not caller.allowed(bucket, key, write=method not in ("GET", "HEAD")):
            self._denied(request, "key outside the credential's prefix")
            raise S3Error("AccessDenied", "Access Denied")
        if method in ("PUT", "POST", "DELETE") and not caller.can_write:
            raise S3Error("AccessDenied", "Access Denied")
        query = {n.decode("utf-8", "replace"): v.decode("utf-8", "replace") for n, v in sigv4.parse_query(raw_query)}
        try:
            validate_key(key)
        except InvalidKey as exc:
            if method in ("GET", "HEAD"):
                raise S3Error("NoSuchKey", "The specified key does not exist.", Key=key) from None
            raise
        if query.get("versionId", "null") != "null":
            # versioning is never enabled: "null" is the only version an object has, and a
            # DeleteObject naming another version must not delete the current one
            raise S3Error("InvalidArgument", "Invalid version id specified", ArgumentName="versionId",
                          ArgumentValue=query["versionId"][:128])
        op = s3_subresources.classify(s3_subresources.OBJECT, method, query)
        if not op.implemented:
            if op.method == "POST" and not op.subresource:
                raise S3Error("InvalidRequest", "This POST request is not supported")
            raise S3Error("NotImplemented", s3_subresources.not_implemented_message(op))
        if op.subresource in ("acl", "tagging"):
            return await self._object_subresource(request, caller, bucket, key, op)
        if method == "PUT":
            return await self._put(request, caller, bucket, key, query)
        if method == "POST":
            if op.subresource == "uploads":
                return await self._create_multipart(request, bucket, key)
            return await self._complete_multipart(request, caller, bucket, key, query["uploadId"])
        if method == "DELETE":
            if op.subresource == "uploadId":
                await self.run(self.engine.abort_multipart, bucket, key, query["uploadId"])
            else:
                await self.run(self.engine.delete, bucket, key)
            return Response(body=b"", status=204)
        if op.subresource == "uploadId":
            return await self._list_parts(request, bucket, key, query)
        return await self._get(request, bucket, key, query)

    async def _object_subresource(self, request: Any, caller: Caller, bucket: str, key: str,
                                  op: s3_subresources.Operation) -> Any:
        """The fixed ACL and empty tag set every object has; ``PUT ?acl`` accepts only the canned
        ``private`` ACL (what every object already is) and changes nothing."""
        await self.run(self.engine.head, bucket, key)  # NoSuchKey when absent
        if op.method == "PUT":
            body = self._read_small_body(request)
            self._check_small_body(request, caller, body)
            canned = (request.getHeader("x-amz-acl") or "").strip().lower()
            grants = any(name.startswith("x-amz-grant-") for name, _ in _header_items(request.requestHeaders))
            if canned != "private" or grants or body.strip():
                raise S3Error("NotImplemented", "Only the canned 'private' ACL is supported; objects are private "
                              "to their job and the operators. Nothing was changed.")
            return Response(body=b"")
        body = s3_xml.access_control_policy() if op.subresource == "acl" else s3_xml.empty_tagging()
        return Response(body=body, content_type="application/xml")

    # -- uploads -------------------------------------------------------------------------------

    @staticmethod
    def _metadata(request: Any) -> tuple[Optional[str], dict, dict]:
        """(content type, system headers, user metadata) to store with the object."""
        try:
            return s3_metadata.from_headers(_header_items(request.requestHeaders))
        except s3_metadata.MetadataTooLarge as exc:
            raise S3Error(exc.code, exc.message) from None

    @staticmethod
    def _write_conditions(request: Any) -> dict:
        """``If-None-Match: *`` / ``If-Match: <etag>`` of a conditional write (PutObject, Complete)."""
        conditions: dict = {}
        if_none = request.getHeader("if-none-match")
        if if_none is not None:
            if if_none.strip() != "*":
                raise S3Error("NotImplemented", "If-None-Match on writes supports only '*'")
            conditions["if_none_match"] = True
        if_match = request.getHeader("if-match")
        if if_match is not None:
            conditions["if_match"] = if_match
        return conditions

    async def _put(self, request: Any, caller: Caller, bucket: str, key: str, query: dict) -> Any:
        sink = request.content
        if not isinstance(sink, UploadSink):
            raise S3Error("InvalidRequest", "The request body could not be read")
        await sink.finished()
        pending = sink.pending
        headers = request.requestHeaders
        # chunk signatures were verified as the chunks arrived (the signer was known before the body)
        payload_hash = (headers.getRawHeaders(b"x-amz-content-sha256") or [b""])[0].decode("latin-1").strip()
        if sink.decoder is not None and payload_hash not in sigv4.STREAMING_PAYLOADS \
                and payload_hash not in ("", sigv4.UNSIGNED_PAYLOAD):
            # aws-chunked without a streaming payload hash: only the unsigned trailer form is acceptable
            raise S3Error("XAmzContentSHA256Mismatch",
                          "The provided 'x-amz-content-sha256' header does not match what was computed.")
        if len(payload_hash) == 64 and sink.decoder is None:
            if pending.sha256 is None or not hmac.compare_digest(payload_hash.lower(), pending.sha256.hexdigest()):
                raise S3Error("XAmzContentSHA256Mismatch",
                              "The provided 'x-amz-content-sha256' header does not match what was computed.")
        md5_header = request.getHeader("content-md5")
        if md5_header is not None:
            try:
                given = base64.b64decode(md5_header.strip(), validate=True)
            except ValueError:
                raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.") from None
            if len(given) != 16:
                raise S3Error("InvalidDigest", "The Content-MD5 you specified was invalid.")
            if not hmac.compare_digest(given, pending.md5.digest()):
                raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.")
        checksums = {}
        for algorithm in sink.checksum_algorithms:
            given = (headers.getRawHeaders(f"x-amz-checksum-{algorithm}") or [""])[0].strip()
            computed = pending.checksum_b64(algorithm)
            if not hmac.compare_digest(given.encode(), computed.encode()):
                raise S3Error("BadDigest",
                              f"The {algorithm.upper()} you specified did not match the calculated checksum.")
            checksums[algorithm] = computed
        if sink.decoder is not None:
            for name, value in sink.decoder.trailers.items():
                algorithm = s3_checksums.algorithm_from_header(name)
                if algorithm:
                    checksums[algorithm] = value
        now = self.ctx.clock.seconds()
        response_headers = {}
        for algorithm, value in checksums.items():
            response_headers[f"x-amz-checksum-{algorithm}"] = value
        if sink.target.upload_id:
            part = await self.run(self.engine.commit_part, bucket, key, sink.target.upload_id,
                                  sink.target.part_number, pending, now, checksums)
            sink.committed(part.size, object_completed=False)
            response_headers["ETag"] = part.etag
        else:
            content_type, system, user = self._metadata(request)
            info = await self.run(self.engine.commit_put, bucket, key, pending, now, content_type, user, checksums,
                                  headers=system, **self._write_conditions(request))
            sink.committed(info.size, object_completed=True)
            response_headers["ETag"] = info.etag
        return Response(body=b"", headers=response_headers)

    def _read_small_body(self, request: Any) -> bytes:
        content = request.content
        content.seek(0)
        return content.read(SMALL_BODY + 1)

    async def _create_multipart(self, request: Any, bucket: str, key: str) -> Any:
        algorithm = request.getHeader("x-amz-checksum-algorithm")
        if algorithm and algorithm.lower() not in s3_checksums.ALGORITHMS:
            raise S3Error("InvalidArgument", "Checksum algorithm provided is unsupported.")
        checksum_type = (request.getHeader("x-amz-checksum-type") or "").upper() or None
        if checksum_type not in (None, "COMPOSITE", "FULL_OBJECT"):
            raise S3Error("InvalidArgument", "Value for x-amz-checksum-type header is invalid.")
        content_type, system, user = self._metadata(request)
        upload_id = await self.run(self.engine.create_multipart, bucket, key, self.ctx.clock.seconds(),
                                   content_type, user, algorithm.lower() if algorithm else None,
                                   headers=system, checksum_type=checksum_type)
        headers = {}
        if algorithm:
            headers["x-amz-checksum-algorithm"] = algorithm
        if checksum_type:
            headers["x-amz-checksum-type"] = checksum_type
        return Response(body=s3_xml.initiate_multipart(bucket, key, upload_id), headers=headers,
                        content_type="application/xml")

    async def _complete_multipart(self, request: Any, caller: Caller, bucket: str, key: str, upload_id: str) -> Any:
        body = self._read_small_body(request)
        # x-amz-checksum-* on Complete describe the object, not this XML body
        self._check_small_body(request, caller, body, checksums=False)
        try:
            parts = s3_xml.parse_complete_multipart(body)
        except s3_xml.MalformedXML:
            raise S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                          "against our published schema.") from None
        object_checksum = None
        for name, value in _header_items(request.requestHeaders):
            algorithm = s3_checksums.algorithm_from_header(name)
            if algorithm:
                object_checksum = (algorithm, value)
        already = await self.run(self.engine.upload_exists, bucket, upload_id)
        info = await self.run(self.engine.complete_multipart, bucket, key, upload_id, parts,
                              self.ctx.clock.seconds(), object_checksum, **self._write_conditions(request))
        job_id = self.job_for(Target(bucket, key))
        if job_id and already:
            self.progress.complete_object(job_id)
        location = f"{PREFIX}/{bucket}/{key}"
        headers = {}
        for algorithm, value in info.checksums.items():
            headers[f"x-amz-checksum-{algorithm}"] = value
        if info.checksum_type:
            headers["x-amz-checksum-type"] = info.checksum_type
        return Response(body=s3_xml.complete_multipart(location, bucket, key, info.etag, info.checksums,
                                                       info.checksum_type),
                        headers=headers, content_type="application/xml")

    async def _list_parts(self, request: Any, bucket: str, key: str, query: dict) -> Any:
        upload, parts = await self.run(self.engine.list_parts, bucket, key, query["uploadId"])
        try:
            marker = int(query.get("part-number-marker", "0") or 0)
            max_parts = min(int(query.get("max-parts", "1000") or 1000), 1000)
        except ValueError:
            raise S3Error("InvalidArgument", "part-number-marker and max-parts must be integers") from None
        remaining = [p for p in parts if p.part_number > marker]
        page = remaining[:max_parts]
        truncated = len(remaining) > max_parts
        next_marker = page[-1].part_number if page else marker
        return Response(body=s3_xml.list_parts(bucket, key, query["uploadId"], page, max_parts, marker, truncated,
                                               next_marker), content_type="application/xml")

    # -- downloads -----------------------------------------------------------------------------

    async def _get(self, request: Any, bucket: str, key: str, query: Optional[dict] = None) -> Any:
        fh, info = await self.run(self.engine.open_read, bucket, key)
        try:
            return await self._send(request, fh, info, query or {})
        finally:
            await self.run(fh.close)

    async def _send(self, request: Any, fh: Any, info: Any, query: dict) -> Any:
        headers: dict = {
            "ETag": info.etag,
            "Last-Modified": s3_xml.http_date(info.last_modified),
            "Accept-Ranges": "bytes",
            "Content-Type": s3_metadata.wire(info.content_type or "binary/octet-stream"),
        }
        for name, value in info.headers.items():
            headers[name] = s3_metadata.wire(value)
        for param, header in RESPONSE_OVERRIDES.items():
            if param in query:
                value = query[param]
                if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
                    raise S3Error("InvalidArgument", f"{param} contains control characters")
                headers[header] = value
        for name, value in info.metadata.items():
            headers[f"x-amz-meta-{name}"] = s3_metadata.wire(value)
        if info.parts:
            headers["x-amz-mp-parts-count"] = str(info.parts)
        status = self._conditional(request, info)
        if status is not None:
            if status == 304:
                for name, value in headers.items():
                    request.setHeader(name, value)
                request.setResponseCode(304)
                return Response(body=b"", status=304, headers={"ETag": info.etag})
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                          Condition="If-Match")
        start, end = 0, info.size - 1
        range_header = request.getHeader("range")
        code = 200
        part = _part_range(query.get("partNumber"), info, range_header)
        if part is not None:
            start, end = part
            if info.part_sizes:
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{info.size}" if info.size else "bytes */0"
        elif range_header and info.size >= 0:
            parsed = _parse_range(range_header, info.size)
            if parsed == "invalid":
                request.setHeader("Content-Range", f"bytes */{info.size}")
                raise S3Error("InvalidRange", "The requested range is not satisfiable", RangeRequested=range_header,
                              ActualObjectSize=info.size)
            if parsed is not None:
                start, end = parsed
                code = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{info.size}"
        mode = (request.getHeader("x-amz-checksum-mode") or "").upper()
        if code == 200 and mode == "ENABLED":
            # clients validate full-object checksums of what they read; composite ones
            # ("<base64>-<N>" of a multipart object) they only report
            for algorithm, value in info.checksums.items():
                headers[f"x-amz-checksum-{algorithm}"] = value
            if info.checksums:
                headers["x-amz-checksum-type"] = info.checksum_type or "FULL_OBJECT"
        length = max(0, end - start + 1)
        request.setResponseCode(code)
        for name, value in headers.items():
            request.setHeader(name, value)
        request.setHeader("Content-Length", str(length))
        if request.method == b"HEAD" or length == 0:
            if not request.finished and not _gone(request):
                request.finish()
            return NOT_DONE_YET
        await self._stream(request, fh, start, length)
        return NOT_DONE_YET

    def _conditional(self, request: Any, info: Any) -> Optional[int]:
        etag = info.etag.strip('"')
        if_match = request.getHeader("if-match")
        if if_match is not None:
            tags = [t.strip().strip('"') for t in if_match.split(",")]
            if "*" not in tags and etag not in tags:
                return 412
        if_none = request.getHeader("if-none-match")
        if if_none is not None:
            tags = [t.strip().strip('"') for t in if_none.split(",")]
            if "*" in tags or etag in tags:
                return 304
        if_unmodified = request.getHeader("if-unmodified-since")
        if if_unmodified is not None and if_match is None:
            when = sigv4.parse_http_date(if_unmodified)
            if when is not None and int(info.last_modified) > when:
                return 412
        if_modified = request.getHeader("if-modified-since")
        if if_modified is not None and if_none is None:
            when = sigv4.parse_http_date(if_modified)
            if when is not None and int(info.last_modified) <= when:
                return 304
        return None

    async def _stream(self, request: Any, fh: Any, start: int, length: int) -> None:
        """Send ``length`` bytes from ``start``, pausing while the transport is full. A client that
        hangs up ends the loop quietly: Twisted then drops ``request.channel`` (and Klein cancels
        the handler), so every step checks the connection rather than a notification that may
        arrive after the cancellation."""
        if _gone(request):
            return
        producer = _Producer()
        request.registerProducer(producer, True)

        def read(offset: int, size: int) -> bytes:
            fh.seek(offset)
            return fh.read(size)

        offset, remaining = start, length
        try:
            while remaining > 0 and not _gone(request) and not producer.stopped:
                data = await self.run(read, offset, min(READ_CHUNK, remaining))
                if not data or _gone(request):
                    break
                request.write(data)
                offset += len(data)
                remaining -= len(data)
                await producer.wait()
        finally:
            if not _gone(request):
                request.unregisterProducer()
                if remaining > 0:
                    # the file shrank under us (or the transport stopped us): cut the connection
                    # rather than send a short body
                    request.channel.transport.loseConnection()
                elif not request.finished:
                    request.finish()


def _gone(request: Any) -> bool:
    """The client hung up: nothing more can be written to ``request``."""
    return request.channel is None or getattr(request, "_disconnected", False)


class _Producer:
    """Push-producer shim: the transport pauses/resumes us; ``wait`` blocks while paused."""

    def __init__(self) -> None:
        self._paused: Optional[defer.Deferred] = None
        self.stopped = False

    def pauseProducing(self) -> None:
        if self._paused is None:
            self._paused = defer.Deferred()

    def resumeProducing(self) -> None:
        d, self._paused = self._paused, None
        if d is not None:
            d.callback(None)

    def stopProducing(self) -> None:
        self.stopped = True
        self.resumeProducing()

    async def wait(self) -> None:
        if self._paused is not None:
            await self._paused


def _scope_page(page: dict, scope: Optional[str]) -> None:
    """Drop entries outside a job's prefix (a listing of ``job-1`` must not show ``job-10/``)."""
    if scope is None:
        return
    page["contents"] = [o for o in page["contents"] if o.key.startswith(scope)]
    page["prefixes"] = [p for p in page["prefixes"] if p.startswith(scope) or scope.startswith(p)]


def _part_range(value: Optional[str], info: Any, range_header: Optional[str]) -> Optional[tuple[int, int]]:
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


def _parse_range(value: str, size: int):
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
