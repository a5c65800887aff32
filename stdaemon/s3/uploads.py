"""The streaming path of an upload (PutObject, UploadPart): :class:`UploadSink` is the request's
``content`` once the request was admitted (:mod:`stdaemon.s3.http`).

Twisted feeds the sink the body as it arrives (HTTP ``chunked`` framing already removed). The sink
queues the bytes and a worker thread of the S3 service decodes ``aws-chunked`` (verifying chunk
signatures as they come), hashes (MD5 for the ETag, SHA-256, requested CRCs) and writes a temp
file. The transport is paused while too much is queued, so memory stays flat. The handler then
waits for :meth:`UploadSink.finished`; any failure deletes the temp file.

The last bytes of a body whose length is known are not sent to the pool on their own: they wait
for :meth:`UploadSink.finished`, which writes them, ends the stream, fsyncs and runs the handler's
verify-and-commit step in one call in the pool. A small PutObject costs one thread hop, not one per
step.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure

from stdaemon.http.request import NullSink
from stdaemon.logs import get_logger
from stdaemon.s3 import checksums as s3_checksums, sigv4, xml_documents as s3_xml
from stdaemon.s3.auth import Caller, first, parsed_headers
from stdaemon.s3.aws_chunked import AwsChunkedDecoder, ChunkedError
from stdaemon.s3.errors import REASONS, S3Error, StorageError, as_s3_error, internal_error
from stdaemon.s3.keys import InvalidKey
from stdaemon.s3.service import S3Service, Target


log = get_logger("stdaemon.http.storage")

HIGH_WATER = 8 * 1024 * 1024
LOW_WATER = 2 * 1024 * 1024
BATCH_BYTES = 4 * 1024 * 1024
#: A batch goes to the pool once this much is queued, or FLUSH_DELAY after it began to queue: large
#: bodies are decoded, hashed and written in big blocks, not one pool call per network read.
MIN_BATCH = 1024 * 1024
FLUSH_DELAY = 0.005


class UploadSink(NullSink):
    """``request.content`` for uploads: decodes and writes the body off the reactor thread."""

    def __init__(self, storage: S3Service, request: Any, length: Optional[int], target: Target, max_size: int,
                 caller: Optional[Caller] = None):
        self.storage = storage
        self.request = request
        self.target = target
        self.caller = caller
        self.error: Optional[Exception] = None
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
        self.length = length  # the HTTP body's length when the client declared it
        self._tail = False  # every byte arrived: the queue waits for finished()
        self._timer: Any = None  # the delayed dispatch of a batch smaller than MIN_BATCH
        parsed = parsed_headers(request)
        headers = request.requestHeaders
        payload = first(parsed, "x-amz-content-sha256") or ""
        encoding = ",".join(parsed.get("content-encoding", ())).lower()
        self.streaming = payload in sigv4.STREAMING_PAYLOADS or "aws-chunked" in encoding
        # the body's SHA-256 is needed only when the client signed it (64 hex digits)
        self.signed_payload = len(payload) == 64 and not self.streaming
        self.max_size = max_size
        self.decoder: Optional[AwsChunkedDecoder] = None
        self.checksum_algorithms: list[str] = s3_checksums.requested_algorithms(parsed)
        # the body's size when the head says it (where a multipart part may be written in place)
        self.expected_size: Optional[int] = None if self.streaming else length
        if self.streaming:
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
                self.expected_size = int(decoded) if decoded.strip() else None
            except (ChunkedError, ValueError) as exc:
                self.error = S3Error("InvalidRequest", getattr(exc, "message", "invalid aws-chunked headers"))
        elif length is not None and length > self.max_size:
            self.error = S3Error("EntityTooLarge", "Your proposed upload exceeds the maximum allowed size")
        self.job_id = caller.job_id if caller is not None and caller.kind == "job" else storage.job_for(target)
        self.progress_token = None
        if self.job_id and caller is not None:
            self.progress_token = storage.progress.start(self.job_id, target.key)

    # file-like surface Twisted expects ------------------------------------------------------

    def write(self, data: bytes) -> None:
        if self.closed or not data:
            return
        self.received += len(data)
        if self.progress_token is not None:
            self.storage.progress.add(self.job_id, self.progress_token, len(data))
        if self.error is not None:
            return  # refused already: drain and drop
        self._queue += data
        self._queued += len(data)
        budget = self.storage.body_budget
        budget.add(len(data))
        if self.length is not None and self.received >= self.length:
            self._tail = True
        over_budget = budget.over()
        if (self._queued > HIGH_WATER or over_budget) and not self._paused:
            transport = getattr(getattr(self.request, "channel", None), "transport", None)
            if transport is not None:
                transport.pauseProducing()
                self._paused = True
        if over_budget and self._paused:
            budget.wait(self)
        self._kick()

    def close(self) -> None:
        """Twisted closes ``content`` when the request ends or the connection is lost."""
        if self.closed:
            return
        self.closed = True
        self._cancel_timer()
        if not self._finalised:
            self._finalised = True
            self._queue.clear()
            self.storage.body_budget.forget(self)
            self._release_budget(self._queued)
            self._queued = 0
            self._after_idle(self._abort_in_thread)
            if self.progress_token is not None:
                self.storage.progress.finish(self.job_id, self.progress_token, failed=True)
                self.progress_token = None

    # worker -------------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._busy:
            return
        if not self._queue or self._tail:
            self._cancel_timer()
            self._wake()  # idle: nothing to do before finished()
            return
        if len(self._queue) < MIN_BATCH:
            if self._timer is None:
                self._timer = self.storage.clock.callLater(FLUSH_DELAY, self._flush_small)
            return
        self._dispatch()

    def _flush_small(self) -> None:
        self._timer = None
        if not self._busy and self._queue and not self._tail and not self.closed:
            self._dispatch()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            if self._timer.active():
                self._timer.cancel()
            self._timer = None

    def _dispatch(self) -> None:
        self._cancel_timer()
        if len(self._queue) <= BATCH_BYTES:
            batch = bytes(self._queue)  # the usual case: one copy, not a slice and a copy
            self._queue.clear()
        else:
            batch = bytes(self._queue[:BATCH_BYTES])
            del self._queue[:BATCH_BYTES]
        size = len(batch)
        self._busy = True
        d = self.storage.run(self._process, batch)
        d.addBoth(self._processed, size)

    def _processed(self, result: Any, size: int) -> None:
        self._busy = False
        if not self.closed:   # (close gave back everything still held)
            self._queued -= size
            self._release_budget(size)
        if isinstance(result, Failure) and self.error is None:
            log.failure("Upload worker failed", failure=result)
            self.error = internal_error()
        if self.error is not None and not self.closed and getattr(self.request, "receiving", False):
            # a bad chunk (signature, size) while the body still arrives: answer now, drop the rest
            err = as_s3_error(self.error)
            body = s3_xml.error(err.code, err.message, "", f"/{self.target.bucket}/{self.target.key}", **err.extra)
            self.request.refuse_body(err.status, REASONS.get(err.status, b"Error"), b"application/xml", body)
        self._maybe_resume()
        self._kick()

    def _release_budget(self, size: int) -> None:
        if size:
            self.storage.body_budget.remove(size)

    def _maybe_resume(self) -> None:
        if self._paused and self._queued < LOW_WATER:
            if self.storage.body_budget.over():
                self.storage.body_budget.wait(self)   # offered again once the sum is low
                return
            self._paused = False
            transport = getattr(getattr(self.request, "channel", None), "transport", None)
            if transport is not None:
                transport.resumeProducing()

    def resume_if_drained(self) -> None:
        """The daemon-wide body budget is low again: read on when this upload's own queue allows."""
        if not self.closed:
            self._maybe_resume()

    def _process(self, batch: bytes) -> None:
        """In a worker thread: decode, hash and write one batch."""
        if self.error is not None or self.closed:
            return
        try:
            if self.pending is None:
                self.pending = self.storage.begin_write(self.target, self.checksum_algorithms, self.max_size,
                                                       self.signed_payload, self.expected_size)
            pieces = self.decoder.feed(batch) if self.decoder is not None else (batch,)
            for piece in pieces:
                self.pending.write(piece)
        except (ChunkedError, StorageError, InvalidKey, S3Error) as exc:
            self.error = as_s3_error(exc)
        except Exception:  # disk full, permissions, …: a server fault, logged with its traceback
            log.failure("Upload write failed")
            self.error = internal_error()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def _after_idle(self, fn: Any) -> None:
        d = self._drained()
        d.addCallback(lambda _: self.storage.run(fn))
        d.addErrback(lambda f: log.failure("Upload clean-up failed", failure=f))

    def _abort_in_thread(self) -> None:
        if self.pending is not None:
            self.pending.abort()

    def _drained(self) -> defer.Deferred:
        """Fires once every queued chunk has been written by the I/O thread."""
        d = defer.Deferred()
        if not self._busy and (not self._queue or self._tail):
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    async def finished(self, then: Optional[Callable[[Any], Any]] = None) -> Any:
        """Wait for every byte to be written and the stream to end; raise ``S3Error`` if it failed.

        ``then(pending)``, when given, runs in the same pool call once the temp file is durable
        (verification and commit: blocking, raising ``S3Error``); its result is returned."""
        self._tail = True  # the handler runs once the whole body arrived
        self._cancel_timer()
        await self._drained()
        rest = self._take_rest()
        result = await self.storage.run(self._end_in_thread, rest, then)
        if self.error is not None:
            raise as_s3_error(self.error)
        return result

    def _take_rest(self) -> bytes:
        rest = bytes(self._queue)
        self._queue.clear()
        self._queued -= len(rest)
        self._release_budget(len(rest))
        self._maybe_resume()
        return rest

    def _end_in_thread(self, rest: bytes = b"", then: Optional[Callable[[Any], Any]] = None) -> Any:
        if rest:
            self._process(rest)
        if self.error is not None:
            return None
        try:
            if self.pending is None:
                self.pending = self.storage.begin_write(self.target, self.checksum_algorithms, self.max_size,
                                                       self.signed_payload, self.expected_size)
            if self.decoder is not None:
                self.decoder.finish()
            self.pending.flush()
        except (ChunkedError, StorageError, InvalidKey, S3Error) as exc:
            self.error = as_s3_error(exc)
            return None
        return then(self.pending) if then is not None else None

    async def discard(self) -> None:
        """Delete what was written (refused request)."""
        if self._finalised:
            return
        self._finalised = True
        self._take_rest()  # bytes never written: nothing to delete
        self._cancel_timer()
        await self._drained()
        await self.storage.run(self._abort_in_thread)
        if self.progress_token is not None:
            self.storage.progress.finish(self.job_id, self.progress_token, failed=True)
            self.progress_token = None

    def committed(self, stored: int, object_completed: bool) -> None:
        self._finalised = True
        if self.progress_token is not None:
            self.storage.progress.finish(self.job_id, self.progress_token, stored, object_completed)
            self.progress_token = None
