"""Sending an object (GetObject, HeadObject): response headers, preconditions, ranges, then the
bytes read in the S3 service's pool and written as the transport takes them."""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer
from twisted.web.server import NOT_DONE_YET

from stdaemon.http.surface import Response
from stdaemon.s3 import metadata as s3_metadata, xml_documents as s3_xml
from stdaemon.s3.errors import S3Error
from stdaemon.s3.reads import parse_range, part_range, read_precondition
from stdaemon.s3.service import S3Service

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


async def get_object(storage: S3Service, request: Any, bucket: str, key: str, query: dict) -> Any:
    fh, info = await storage.open_read(bucket, key)
    try:
        return await send_object(storage, request, fh, info, query)
    finally:
        await storage.run(fh.close)


async def send_object(storage: S3Service, request: Any, fh: Any, info: Any, query: dict) -> Any:
    """Answer a GetObject/HeadObject from the opened file ``fh``: headers, preconditions, range or
    part, then the bytes (``NOT_DONE_YET``: the request is finished here)."""
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
    status = read_precondition(info.etag, info.last_modified, request.getHeader("if-match"),
                               request.getHeader("if-none-match"), request.getHeader("if-unmodified-since"),
                               request.getHeader("if-modified-since"))
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
    part = part_range(query.get("partNumber"), info, range_header)
    if part is not None:
        start, end = part
        if info.part_sizes:
            code = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{info.size}" if info.size else "bytes */0"
    elif range_header and info.size >= 0:
        parsed = parse_range(range_header, info.size)
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
        if not request.finished and not gone(request):
            request.finish()
        return NOT_DONE_YET
    await stream(storage, request, fh, start, length)
    return NOT_DONE_YET


async def stream(storage: S3Service, request: Any, fh: Any, start: int, length: int) -> None:
    """Send ``length`` bytes from ``start``, pausing while the transport is full. A client that
    hangs up ends the loop quietly: Twisted then drops ``request.channel`` (and Klein cancels
    the handler), so every step checks the connection rather than a notification that may
    arrive after the cancellation."""
    if gone(request):
        return
    producer = _Producer()
    request.registerProducer(producer, True)

    def read(offset: int, size: int) -> bytes:
        fh.seek(offset)
        return fh.read(size)

    offset, remaining = start, length
    try:
        while remaining > 0 and not gone(request) and not producer.stopped:
            data = await storage.run(read, offset, min(READ_CHUNK, remaining))
            if not data or gone(request):
                break
            request.write(data)
            offset += len(data)
            remaining -= len(data)
            await producer.wait()
    finally:
        if not gone(request):
            request.unregisterProducer()
            if remaining > 0:
                # the file shrank under us (or the transport stopped us): cut the connection
                # rather than send a short body
                request.channel.transport.loseConnection()
            elif not request.finished:
                request.finish()


def gone(request: Any) -> bool:
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
