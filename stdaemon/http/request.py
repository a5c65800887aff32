"""The daemon's Request: body limits enforced before the body is read.

twisted.web reads the whole request body before any resource runs and has no
size limit of its own.  ``StdaemonRequest.gotLength`` runs when the headers
are complete (before ``Expect: 100-continue`` is answered): it asks the site
for the route's :class:`BodyPolicy` and answers 413 at once when the declared
``Content-Length`` is over the cap; chunked bodies are counted as they arrive
and cut off the same way.  A policy may also supply the sink the body is
written to, so a surface (S3 uploads) can stream bodies to disk itself.

A policy may also *admit* the body (``BodyPolicy.admit``): an asynchronous
decision taken from the head alone (S3 authenticates the caller there).  Until
it is taken the transport is paused, ``100 Continue`` is not sent and the few
bytes already read (at most one socket read) are held in memory; nothing
reaches the sink.  Admitted: the sink is created, ``100 Continue`` sent when
the client asked for it, the held bytes replayed and reading resumes.
Refused: the answer goes out at once; a client that did not wait for
``100 Continue`` may still be sending, so up to :data:`LINGER_BYTES` more are
read and dropped (a bounded discard, so it can read the answer rather than a
reset) before the connection is closed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web import http, server
from twisted.web.http_headers import Headers

from stdaemon.logs import get_logger

log = get_logger("stdaemon.http.request")

MEBIBYTE = 1024 * 1024
#: What a refused sender may still send (and have dropped) before the connection is closed.
LINGER_BYTES = 4 * MEBIBYTE
LINGER_SECONDS = 5.0
#: Bound of the body bytes held while the admission is pending (the transport is paused after the
#: first read, so this is never reached by a well-behaved stack).
HOLD_BYTES = 2 * MEBIBYTE


@dataclass(frozen=True)
class BodyPolicy:
    max_bytes: int
    # ``sink_factory(request, length)`` returns a file-like object with
    # ``write(bytes)``, ``seek``/``tell`` and ``read``; ``None`` = Twisted's
    # default (memory for small bodies, a temporary file for larger ones).
    sink_factory: Optional[Callable[["StdaemonRequest", Optional[int]], Any]] = None
    # The body an over-size request is answered with (S3 answers XML).
    too_large: Optional[Callable[[int], tuple[bytes, bytes]]] = None
    # ``admit(request, length)`` decides from the head whether the body may be read: returns
    # ``None`` (go on) or a Deferred that fires (go on) or fails with ``RejectBody`` (refuse).
    admit: Optional[Callable[["StdaemonRequest", Optional[int]], Optional[defer.Deferred]]] = None


class RejectBody(Exception):
    """Raised by a ``sink_factory`` or an ``admit`` decision to answer at once, before the body is
    read: the daemon answers ``status`` and closes the connection (after a bounded discard when
    the client is already sending), and ``100 Continue`` is never sent. S3 uses it to refuse
    strangers and bad signatures without storing what they send."""

    def __init__(self, status: int, reason: bytes, content_type: bytes, body: bytes,
                 headers: Optional[dict] = None):
        super().__init__(status)
        self.status = status
        self.reason = reason
        self.content_type = content_type
        self.body = body
        self.headers = headers or {}  # extra response headers (Retry-After, …)


# Headers are bytes until proven text (S19). Twisted decodes a header as UTF-8 whenever code asks
# for it by a ``str`` name, and raises on anything else: every header is checked once here, when the
# headers are complete and before anything reads them. Advisory headers whose absence is safe are
# dropped when they are not text (forwarding headers fall back to the peer address; a correlation
# id is generated); any other undecodable header (credentials, cookies, signed S3 headers, …) is
# refused with a 400 before the body is read.
DROPPABLE_HEADERS = frozenset({
    b"x-forwarded-for", b"x-real-ip", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded",
    b"x-correlation-id", b"user-agent", b"referer", b"accept", b"accept-language", b"accept-encoding",
    b"last-event-id", b"if-none-match", b"cache-control", b"pragma", b"dnt",
})
S3_PREFIX = b"/api/cloud/storage"


def undecodable_header(headers: Any) -> Optional[str]:
    """Drop advisory headers that are not UTF-8 text; the name of the first other header that is
    not (or ``None``): the one decoding check of request headers."""
    refused = None
    for name, values in list(headers.getAllRawHeaders()):
        try:
            name.decode("ascii")
        except UnicodeDecodeError:
            headers.removeHeader(name)
            refused = refused or name.decode("latin-1")
            continue
        try:
            for value in values:
                value.decode("utf-8")
        except UnicodeDecodeError:
            lower = name.lower()
            if lower in DROPPABLE_HEADERS:
                headers.removeHeader(name)
            else:
                refused = refused or name.decode("ascii")
    return refused


def invalid_header_body(name: str, path: bytes) -> tuple[bytes, bytes]:
    detail = f"Header {name[:64]!r} is not valid UTF-8 text"
    if path.startswith(S3_PREFIX):
        from stdaemon.s3 import xml_documents as s3_xml

        return b"application/xml", s3_xml.error("InvalidArgument", detail)
    return b"application/json", json.dumps({"error": "invalid_header", "detail": detail,
                                            "field": name[:64]}).encode()


def json_too_large(max_bytes: int) -> tuple[bytes, bytes]:
    body = json.dumps({
        "error": "payload_too_large",
        "detail": f"Request body exceeds the limit of {max_bytes} bytes",
    }).encode()
    return b"application/json", body


class NullSink:
    """A body sink that keeps nothing: where a rejected body goes, ``request.content`` while the
    admission is pending (the request holds those bytes itself), and the base of sinks that
    stream bodies elsewhere (they override ``write`` and ``close``)."""

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
    _held: Optional[bytearray] = None     # body bytes read while the admission is pending
    _pending_request: Optional[tuple] = None
    _expect_continue = False
    _paused = False
    _linger: Optional[int] = None         # bytes a refused sender may still send
    _linger_timer: Any = None
    _all_received = False

    def gotLength(self, length: Optional[int]) -> None:
        refused = undecodable_header(self.requestHeaders)
        if refused is not None:
            content_type, body = invalid_header_body(refused, getattr(self.channel, "_path", b"/"))
            self._reject_now(400, b"Bad Request", content_type, body)
            return
        policy = self._policy()
        self._body_limit = policy.max_bytes
        self._too_large = policy.too_large or json_too_large
        if length is not None and length > policy.max_bytes:
            self._reject_too_large()
            return
        if policy.admit is not None:
            self._await_admission(policy, length)
            return
        self._open_sink(policy, length)

    def _open_sink(self, policy: BodyPolicy, length: Optional[int]) -> bool:
        if policy.sink_factory is not None:
            try:
                self.content = policy.sink_factory(self, length)
            except RejectBody as refusal:
                self._reject_now(refusal.status, refusal.reason, refusal.content_type, refusal.body)
                return False
        else:
            super().gotLength(length)
        return True

    # -- admission ----------------------------------------------------------------

    def _await_admission(self, policy: BodyPolicy, length: Optional[int]) -> None:
        try:
            verdict = policy.admit(self, length)
        except RejectBody as refusal:
            self._refuse(refusal)
            return
        if verdict is None:
            self._open_sink(policy, length)
            return
        self._held = bytearray()
        self.content = NullSink()
        expect = b",".join(self.requestHeaders.getRawHeaders(b"expect") or []).lower()
        if b"100-continue" in expect:
            # Twisted sends 100 Continue as soon as this method returns: only admitted bodies get it.
            self._expect_continue = True
            self.requestHeaders.removeHeader(b"expect")
        self._pause()
        verdict.addCallbacks(self._admitted, self._not_admitted, callbackArgs=(policy, length))
        verdict.addErrback(self._admission_failed)

    def _admitted(self, _: Any, policy: BodyPolicy, length: Optional[int]) -> None:
        if self._rejected or self.channel is None:
            self._held = None
            return
        held, self._held = self._held, None
        if not self._open_sink(policy, length):
            return
        if self._expect_continue:
            self.requestHeaders.setRawHeaders(b"expect", [b"100-continue"])
            if not held and not self._all_received and getattr(self.channel, "_version", b"") == b"HTTP/1.1":
                self.channel.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if held:
            self.content.write(bytes(held))
        self._resume()
        pending, self._pending_request = self._pending_request, None
        if pending is not None and not self._rejected:
            super().requestReceived(*pending)

    def _not_admitted(self, failure: Failure) -> None:
        refusal = failure.check(RejectBody) and failure.value
        if not refusal:
            return failure
        self._held = None
        if not self._rejected and self.channel is not None:
            self._refuse(refusal)
        return None

    def _admission_failed(self, failure: Failure) -> None:
        log.failure("Body admission failed", failure=failure)
        self._held = None
        if not self._rejected and self.channel is not None:
            body = json.dumps({"error": "internal_error", "detail": "The request could not be processed"}).encode()
            self._reject_now(500, b"Internal Server Error", b"application/json", body)

    @property
    def receiving(self) -> bool:
        """The body is still arriving (the handler has not been started)."""
        return not self._all_received and not self._rejected and self.channel is not None

    def refuse_body(self, status: int, reason: bytes, content_type: bytes, body: bytes) -> None:
        """For a sink that finds the body bad while it arrives (a chunk signature, a size): answer
        now, drop the rest (bounded) and hang up; the handler never runs. The sink is closed."""
        if self.receiving:
            self._reject_now(status, reason, content_type, body, linger=True)

    def _refuse(self, refusal: RejectBody) -> None:
        self._reject_now(refusal.status, refusal.reason, refusal.content_type, refusal.body,
                         linger=not self._expect_continue, headers=refusal.headers)

    def _pause(self) -> None:
        transport = getattr(self.channel, "transport", None)
        if transport is not None and not self._paused:
            self._paused = True
            transport.pauseProducing()

    def _resume(self) -> None:
        transport = getattr(self.channel, "transport", None)
        if transport is not None and self._paused:
            self._paused = False
            transport.resumeProducing()

    def _policy(self) -> BodyPolicy:
        site = getattr(self.channel, "site", None)
        chooser = getattr(site, "body_policy", None)
        command = getattr(self.channel, "_command", b"GET")
        path = getattr(self.channel, "_path", b"/")
        if chooser is None:
            return BodyPolicy(max_bytes=MEBIBYTE)
        # The root keeps the route it matched here on the request: the handler runs with it.
        return chooser(command, path, self.requestHeaders, request=self)

    def handleContentChunk(self, data: bytes) -> None:
        if self._rejected:
            if self._linger is not None:
                self._linger -= len(data)
                if self._linger < 0:
                    self._hang_up()
            return
        self._body_received += len(data)
        if self._body_limit is not None and self._body_received > self._body_limit:
            self._reject_too_large()
            return
        if self._held is not None:
            self._held += data
            if len(self._held) > HOLD_BYTES:
                self._reject_now(503, b"Service Unavailable", b"application/json", json.dumps({
                    "error": "slow_down", "detail": "Too much body before the request was authenticated"}).encode())
            return
        self.content.write(data)

    def _reject_too_large(self) -> None:
        """Answer 413 now, before (more of) the body is read, and hang up."""
        content_type, body = self._too_large(self._body_limit or 0)
        self._reject_now(413, b"Payload Too Large", content_type, body)

    def _reject_now(self, status: int, reason: bytes, content_type: bytes, body: bytes,
                    linger: bool = False, headers: Optional[dict] = None) -> None:
        """Answer now, before (more of) the body is read, and hang up (``linger``: after reading and
        dropping what the client may still be sending, bounded in bytes and time)."""
        self._rejected = True
        self._held = None
        old = getattr(self, "content", None)
        self.content = NullSink()
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
        head += [f"{name}: {value}".encode("latin-1") for name, value in (headers or {}).items()]
        transport = self.channel.transport
        transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.channel.persistent = False
        if self._pending_request is not None:
            self._finish_rejected(*self._pending_request)
            self._pending_request = None
        if linger and not self._all_received:
            self._linger = LINGER_BYTES
            self._linger_timer = self.channel.callLater(LINGER_SECONDS, self._hang_up)
            self._resume()
            return
        transport.loseConnection()

    def _hang_up(self) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._linger = None
        channel = self.channel
        if channel is not None and channel.transport is not None:
            channel.transport.loseConnection()

    def _finish_rejected(self, command: bytes, path: bytes, version: bytes) -> None:
        self.method, self.uri, self.clientproto = command, path, version
        self.finished = 1

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        self._all_received = True
        if self._rejected:
            # The answer (413, or a refusal) has been sent; the rest of the body (if any) was
            # discarded; nothing must run for this request.
            self._finish_rejected(command, path, version)
            if self._linger is not None:
                self._hang_up()
            return
        if self._held is not None:
            # the whole body arrived while the admission is pending: run once it is admitted
            self._pending_request = (command, path, version)
            return
        super().requestReceived(command, path, version)

    def process(self) -> None:
        """Hand the request to the site's one resource, the root (a leaf that routes by itself).

        twisted.web's own ``process`` sets its ``Server`` header (replaced here by stdaemon's),
        splits and percent-decodes every path segment into ``postpath`` and walks the resource
        tree, about a twentieth of a small request's CPU that nothing here uses: the root matches
        the raw path once (``stdaemon.http.dispatch.Dispatch``). ``OPTIONS *`` and sites serving
        another resource keep twisted's behaviour."""
        site = self.channel.site
        resource = getattr(site, "resource", None)
        if self.path == b"*" or not getattr(resource, "isLeaf", False):
            super().process()
            return
        self.site = site
        self.sitepath = []
        self.prepath = []
        self.postpath = []
        headers = self.responseHeaders
        headers.setRawHeaders(b"Server", [b"stdaemon"])
        headers.setRawHeaders(b"Date", [http.datetimeToString()])
        try:
            resource.render(self)
        except BaseException:
            self.processingFailed(Failure())

    def connectionLost(self, reason: Any) -> None:
        timer, self._linger_timer = self._linger_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._held = None
        super().connectionLost(reason)


def _protocol_error(status: bytes, code: str, detail: str) -> bytes:
    body = json.dumps({"error": code, "detail": detail}).encode()
    return (b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)


class StdaemonChannel(http.HTTPChannel):
    """twisted.web's HTTP/1.1 channel, answering its own protocol errors (malformed request line
    or headers, bad Content-Length or Transfer-Encoding, over-long lines) with the JSON error shape
    every other answer has, instead of an empty 400 or a silent hang-up."""

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.transport.write(_protocol_error(b"400 Bad Request", "bad_request",
                                             "The request is not valid HTTP/1.1"))
        self.loseConnection()

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        """The status line and headers as ONE bytes object: twisted.web hands the transport a
        sequence of four pieces per header, each checked and buffered on its own, a tenth of a
        small answer's CPU. Same bytes on the wire; the values were sanitised when set."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        parts = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                parts += (name, b": ", value, b"\r\n")
        parts.append(b"\r\n")
        self.transport.write(b"".join(parts))

    def lineLengthExceeded(self, line: bytes) -> None:
        self.transport.write(_protocol_error(b"431 Request Header Fields Too Large", "header_too_large",
                                             "The request line or a header line is too long"))
        self.loseConnection()


class StdaemonSite(server.Site):
    requestFactory = StdaemonRequest

    def protocol(self) -> Any:
        # Twisted's own factory (``http._genericHTTPChannelProtocolFactory``) with our channel;
        # the wrapper keeps HTTP/2 negotiation as it is (no public hook for the channel class).
        return http._GenericHTTPChannelProtocol(StdaemonChannel())

    def __init__(self, resource: Any, body_policy: Callable[[bytes, bytes, Any], BodyPolicy],
                 **kwargs: Any):
        # Every body is read by its route (JSON, S3 streams): twisted.web's own form parsing of
        # POST bodies would only run the e-mail header parser over each Content-Type (about a tenth
        # of a webhook's reactor time) to fill ``request.args``, which nothing here reads for bodies.
        kwargs.setdefault("parsePOSTFormSubmission", False)
        super().__init__(resource, **kwargs)
        self.body_policy = body_policy
        # No Server: header revealing versions; no access log through
        # twisted's combined-log observer (the root logs requests itself).
        self.displayTracebacks = False

    def log(self, request: Any) -> None:
        pass

