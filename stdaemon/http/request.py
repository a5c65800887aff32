"""The daemon's Request: body limits enforced before the body is read.

twisted.web reads the whole request body before any resource runs and has no
size limit of its own.  ``StdaemonRequest.gotLength`` runs when the headers
are complete (before ``Expect: 100-continue`` is answered): it asks the site
for the route's :class:`BodyPolicy` and answers 413 at once when the declared
``Content-Length`` is over the cap; chunked bodies are counted as they arrive
and cut off the same way.  A policy may also supply the sink the body is
written to, so a surface (S3 uploads) can stream bodies to disk itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.web import server

MEBIBYTE = 1024 * 1024


@dataclass(frozen=True)
class BodyPolicy:
    max_bytes: int
    # ``sink_factory(request, length)`` returns a file-like object with
    # ``write(bytes)``, ``seek``/``tell`` and ``read``; ``None`` = Twisted's
    # default (memory for small bodies, a temporary file for larger ones).
    sink_factory: Optional[Callable[["StdaemonRequest", Optional[int]], Any]] = None
    # The body an over-size request is answered with (S3 answers XML).
    too_large: Optional[Callable[[int], tuple[bytes, bytes]]] = None


class RejectBody(Exception):
    """Raised by a ``sink_factory`` to answer at once, before the body is read.

    Use it only when the client sent ``Expect: 100-continue`` (it is waiting for the verdict and
    has sent no body yet): the daemon answers ``status`` and closes the connection, and the
    ``100 Continue`` is never sent. S3 uses it to refuse a bad signature without reading gigabytes.
    """

    def __init__(self, status: int, reason: bytes, content_type: bytes, body: bytes):
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.content_type = content_type
        self.body = body


def json_too_large(max_bytes: int) -> tuple[bytes, bytes]:
    body = json.dumps({
        "error": "payload_too_large",
        "detail": f"Request body exceeds the limit of {max_bytes} bytes",
    }).encode()
    return b"application/json", body


class _Discard:
    """Where the rest of a rejected body goes."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


class StdaemonRequest(server.Request):
    principal = None          # set by the root after authentication
    route = None              # the matched RouteMatch, set by the root
    correlation_id = ""
    client_ip = ""            # derived once by the root (S6 rules)
    _rejected = False
    _body_limit: Optional[int] = None
    _body_received = 0

    def gotLength(self, length: Optional[int]) -> None:
        policy = self._policy()
        self._body_limit = policy.max_bytes
        self._too_large = policy.too_large or json_too_large
        if length is not None and length > policy.max_bytes:
            self._reject_too_large()
            return
        if policy.sink_factory is not None:
            try:
                self.content = policy.sink_factory(self, length)
            except RejectBody as refusal:
                self._reject_now(refusal.status, refusal.reason, refusal.content_type, refusal.body)
                return
        else:
            super().gotLength(length)

    def _policy(self) -> BodyPolicy:
        site = getattr(self.channel, "site", None)
        chooser = getattr(site, "body_policy", None)
        command = getattr(self.channel, "_command", b"GET")
        path = getattr(self.channel, "_path", b"/")
        if chooser is None:
            return BodyPolicy(max_bytes=MEBIBYTE)
        return chooser(command, path, self.requestHeaders)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            return
        self._body_received += len(data)
        if self._body_limit is not None and self._body_received > self._body_limit:
            self._reject_too_large()
            return
        self.content.write(data)

    def _reject_too_large(self) -> None:
        """Answer 413 now, before (more of) the body is read, and hang up."""
        content_type, body = self._too_large(self._body_limit or 0)
        self._reject_now(413, b"Payload Too Large", content_type, body)

    def _reject_now(self, status: int, reason: bytes, content_type: bytes, body: bytes) -> None:
        """Answer now, before (more of) the body is read, and hang up."""
        self._rejected = True
        old = self.content
        self.content = _Discard()
        close = getattr(old, "close", None)
        if close is not None:
            close()
        # Do not promise the client we want the body.
        self.requestHeaders.removeHeader(b"expect")
        head = [
            b"HTTP/1.1 %d %s" % (status, reason),
            b"Content-Type: " + content_type,
            b"Content-Length: " + str(len(body)).encode(),
            b"Connection: close",
        ]
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.channel.persistent = False
        transport.loseConnection()

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self._rejected:
            # The answer (413, or a sink's refusal) has been sent; the rest of the body (if any) was
            # discarded; nothing must run for this request.
            self.method, self.uri, self.clientproto = command, path, version
            self.finished = 1
            return
        super().requestReceived(command, path, version)


class StdaemonSite(server.Site):
    requestFactory = StdaemonRequest

    def __init__(self, resource: Any, body_policy: Callable[[bytes, bytes, Any], BodyPolicy],
                 **kwargs: Any):
        super().__init__(resource, **kwargs)
        self.body_policy = body_policy
        # No Server: header revealing versions; no access log through
        # twisted's combined-log observer (the root logs requests itself).
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        pass

