"""The root resource: every request passes through here, once.

Pipeline per request (in its own ``contextvars`` context so log lines and
outbound calls carry its correlation id):

1. correlation id: a valid incoming ``X-Correlation-ID`` or a new one (a per-process prefix and a
   counter), echoed;
2. route match, ONCE per request: :class:`Dispatch` is built at start-up from every surface's
   routes (static paths in a dict, one combined werkzeug ``Map`` for the rest); the match taken
   when the headers arrive (for the body policy) is the one the handler runs with (404/405 JSON
   when nothing matches);
3. client IP derivation (S6 rules, one function for every surface);
4. middlewares (rate limiting, …), each may answer instead of the handler;
5. authentication and authorisation from the matched route's access policy
   (``stdaemon.http.surface.route``) — nothing reaches a handler otherwise;
6. the matched handler runs (declared on the surface's Klein app, called as Klein would call it; Klein's own
   routing is not run again);
7. metrics: request count, errors and latency per ``METHOD_<route template>``.

Body limits are enforced earlier, while the body arrives
(``stdaemon/http/request.py``), from :meth:`Root.body_policy`.
"""

from __future__ import annotations

import contextvars
import itertools
import os
import re
from typing import Any, Awaitable, Callable, Optional
from urllib.parse import unquote

from twisted.internet import defer
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import NOT_DONE_YET

from stdaemon.http.client_ip import derive_client_ip
from stdaemon.http.dispatch import Dispatch, RouteMatch, route_table
from stdaemon.http.errors import ApiError, forbidden, unauthorized
from stdaemon.http.request import BodyPolicy
from stdaemon.http.surface import Access, RouteInfo, Surface, render_error
from stdaemon.logs import correlation_id_var, debug_enabled, get_logger

log = get_logger("stdaemon.http")

_VALID_CORRELATION_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")

# Methods any route may use. Anything else is a 405 that is not counted: the metrics label sets
# stay bounded by the route table (METHOD_<template>, METHOD ∈ this set).
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


# Correlation ids generated here: 32 hex digits (as uuid4().hex was), a random per-process prefix
# and a counter: distinct across processes and restarts, no uuid formatting per request.
_CID_PREFIX = os.urandom(8).hex()
_cid_counter = itertools.count(1)


Middleware = Callable[[Any, RouteMatch], Awaitable[Optional[bytes]]]


class _Flight:
    """What the root keeps about one request between its start and its finish."""

    __slots__ = ("started", "method", "match", "pipeline", "running", "observed")

    def __init__(self, started: float):
        self.started = started
        self.method = ""                  # set once known; unknown methods are not counted
        self.match: Optional[RouteMatch] = None
        self.pipeline: Optional[defer.Deferred] = None
        self.running = False              # the endpoint is running (a client gone cancels it)
        self.observed = True              # counted and logged when it finishes


class Root(Resource):
    isLeaf = True

    def __init__(self, ctx: Any, surfaces: list[Surface]):
        super().__init__()
        self.ctx = ctx
        self.surfaces = surfaces
        self.middlewares: list[Middleware] = []
        self.dispatch = Dispatch(surfaces)
        self._labels: dict[tuple[str, str], str] = {}    # (method, template) → metrics label
        self._peer_ips: dict[str, str] = {}               # peer host → client IP (no forwarding headers)
        self.inflight = 0                                  # requests not yet finished (graceful stop)
        self._idle: list[defer.Deferred] = []

    # -- routing --------------------------------------------------------------

    def routes(self) -> list[tuple[str, tuple[str, ...], str, RouteInfo]]:
        """Every registered route: (template, methods, endpoint, info)."""
        return route_table(self.surfaces)

    def match(self, method: str, path: str) -> RouteMatch:
        return self.dispatch.match(method, path)

    def match_request(self, request: Any) -> RouteMatch:
        """The request's route, matched once: the match taken for the body policy when the headers
        arrived is reused (raises the same ``ApiError`` for 400/404/405)."""
        taken = request.__dict__.get("_stdaemon_match")
        if taken is not None and taken[0] == request.method and taken[1] == request.uri:
            result = taken[2]
        else:
            result = self._match_raw(request.method, request.uri)
        if isinstance(result, ApiError):
            raise result
        return result

    def _match_raw(self, method: bytes, uri: bytes) -> Any:
        """A RouteMatch, or the ApiError that answers the request."""
        try:
            path = _unquote_path(uri.split(b"?", 1)[0].decode("latin-1"))
        except UnicodeDecodeError:
            return ApiError(400, "invalid_path", "The request path is not valid UTF-8 once decoded")
        try:
            return self.dispatch.match(method.decode("latin-1").upper(), path)
        except ApiError as error:
            return error

    def body_policy(self, method: bytes, raw_path: bytes, headers: Any,
                    request: Any = None) -> BodyPolicy:
        default = self.ctx.config.server.max_body_bytes
        match = self._match_raw(method, raw_path)
        if request is not None:
            request._stdaemon_match = (method, raw_path, match)
        if isinstance(match, ApiError):
            return BodyPolicy(max_bytes=default)
        chooser = getattr(match.surface, "body_policy", None)
        if chooser is not None:
            return chooser(method, raw_path, headers, match)
        if match.info.max_body_from is not None:  # its own key (job submissions)
            return BodyPolicy(max_bytes=int(match.info.max_body_from(self.ctx.config)))
        # server.max_body_bytes bounds every body; a route or surface may only lower it.
        limit = min(match.info.max_body or default, match.surface.max_body or default, default)
        return BodyPolicy(max_bytes=limit)

    # -- rendering ------------------------------------------------------------

    def render(self, request: Any) -> Any:
        context = contextvars.copy_context()
        context.run(self._start, request)
        return NOT_DONE_YET

    def _start(self, request: Any) -> None:
        incoming = request.getHeader("x-correlation-id")
        if incoming and _VALID_CORRELATION_ID.match(incoming):
            cid = incoming
        else:
            cid = f"{_CID_PREFIX}{next(_cid_counter):016x}"
        correlation_id_var.set(cid)
        request.correlation_id = cid
        headers = request.responseHeaders
        headers.setRawHeaders(b"X-Correlation-ID", [cid.encode("ascii")])
        headers.setRawHeaders(b"X-Content-Type-Options", [b"nosniff"])
        flight = _Flight(self.ctx.clock.seconds())
        self.inflight += 1
        # ONE finish notification per request: the metrics/log line (in a copy of this request's
        # context: the finish callback runs outside it), cancelling a handler whose client left,
        # and the in-flight count the graceful stop waits on.
        context = contextvars.copy_context()
        request.notifyFinish().addBoth(lambda outcome: context.run(self._done, outcome, request, flight))
        # One Deferred drives the whole pipeline, the handler included (it is awaited, not
        # wrapped in a Deferred of its own).
        flight.pipeline = defer.Deferred.fromCoroutine(self._handle(request, flight))
        flight.pipeline.addErrback(self._pipeline_failed, request)

    async def _handle(self, request: Any, flight: "_Flight") -> None:
        method = request.method.decode("latin-1").upper()
        flight.method = method
        match: Optional[RouteMatch] = None
        if method not in KNOWN_METHODS:
            error = ApiError(405, "method_not_allowed", f"Method {method[:32]!r} is not allowed here",
                             headers={"Allow": ", ".join(sorted(KNOWN_METHODS - {"OPTIONS"}))})
            flight.observed = False
            self._write(request, self.render_error(request, None, _request_path(request), error))
            return
        try:
            match = self.match_request(request)
            request.route = flight.match = match
            request.client_ip = self.client_ip(request)
            for middleware in self.middlewares:
                answer = await middleware(request, match)
                if answer is not None:
                    flight.observed = False
                    self._write(request, answer)
                    return
            await self._authorise(request, match)
        except ApiError as error:
            self._write(request, self.render_error(request, match, _request_path(request), error))
            return
        # The matched endpoint runs as Klein's executor would run it (the surface's instance first),
        # without Klein matching again or wrapping the coroutine in a Deferred of its own; a client
        # gone cancels it (``_done``).
        flight.running = True
        result = await match.info.handler(match.surface, request, **match.args)
        flight.running = False
        if request.finished or getattr(request, "_disconnected", False):
            return
        if isinstance(result, str):
            result = result.encode("utf-8")
        # bytes: the whole answer; NOT_DONE_YET: the handler wrote to the request itself and has
        # returned (a stream that ended); it is finished here, as Klein did.
        self._write(request, result if isinstance(result, bytes) else b"")

    def _done(self, outcome: Any, request: Any, flight: "_Flight") -> None:
        """The request finished, or its client went away (``outcome`` a Failure)."""
        if flight.running and isinstance(outcome, Failure) and flight.pipeline is not None:
            flight.running = False
            flight.pipeline.cancel()
        if flight.observed and flight.method:
            self._observe(request, flight.match, flight.method, flight.started)
        self.inflight -= 1
        if self.inflight == 0 and self._idle:
            waiting, self._idle = self._idle, []
            for d in waiting:
                d.callback(None)

    def idle(self) -> defer.Deferred:
        """Fires once no request is in flight (at once when none is)."""
        if not self.inflight:
            return defer.succeed(None)
        d: defer.Deferred = defer.Deferred()
        self._idle.append(d)
        return d

    def _pipeline_failed(self, failure: Any, request: Any) -> None:
        if failure.check(defer.CancelledError) and (
                request.finished or getattr(request, "_disconnected", False)):
            return None
        self._crashed(failure, request)

    def render_error(self, request: Any, match: Optional[RouteMatch], path: str, error: ApiError) -> bytes:
        """JSON, unless the surface that owns the path speaks another error format (S3 XML): a
        surface may define ``render_api_error(request, error) -> bytes``; it is used for what the
        root itself answers there too (405, 429 from the rate limiter)."""
        surface = match.surface if match is not None else self.surface_for(path)
        renderer = getattr(surface, "render_api_error", None)
        if renderer is not None:
            return renderer(request, error)
        return render_error(request, error)

    def surface_for(self, path: str) -> Optional[Surface]:
        """The surface whose ``prefixes`` own ``path`` (``None`` when none does)."""
        for surface in self.surfaces:
            for prefix in getattr(surface, "prefixes", ()) or ():
                if path == prefix or path.startswith(prefix.rstrip("/") + "/"):
                    return surface
        return None

    async def _authorise(self, request: Any, match: RouteMatch) -> None:
        required = match.info.access
        if required == Access.PUBLIC:
            request.principal = await self._optional_principal(request)
            return
        principal = await self.ctx.auth.authenticate(request)
        if principal is None:
            raise unauthorized("A valid API key or session is required")
        request.principal = principal
        role_level = {"viewer": Access.VIEWER, "operator": Access.OPERATOR,
                      "admin": Access.ADMIN}.get(principal.role, Access.PUBLIC)
        if role_level < required:
            raise forbidden(f"This action requires the {required.name.lower()} role")

    async def _optional_principal(self, request: Any) -> Any:
        """Public routes that also serve operators (S3 reads) see who is calling
        when credentials are presented; they never fail for lack of them."""
        if request.getHeader("x-api-key") is None and request.getHeader("authorization") is None \
                and not request.received_cookies:
            return None
        try:
            return await self.ctx.auth.authenticate(request)
        except Exception:
            return None

    def client_ip(self, request: Any) -> str:
        if not request.requestHeaders.hasHeader(b"x-forwarded-for") \
                and not request.requestHeaders.hasHeader(b"x-real-ip"):
            # Without forwarding headers the answer depends on the peer alone: kept per peer
            # host (bounded), so the address is not parsed again for every request.
            host = getattr(request.getClientAddress(), "host", None) or "unknown"
            known = self._peer_ips.get(host)
            if known is None:
                if len(self._peer_ips) >= 4096:
                    self._peer_ips.clear()
                known = self._peer_ips[host] = client_ip(request, self.ctx.trusted_proxies)
            return known
        return client_ip(request, self.ctx.trusted_proxies)

    def _write(self, request: Any, body: Any) -> None:
        """Send ``body`` as the whole answer and finish: with its ``Content-Length`` (no chunked
        framing) unless the handler already started writing or set one itself."""
        if request.finished or getattr(request, "_disconnected", False):
            return
        if isinstance(body, str):
            body = body.encode()
        if (not request.startedWriting and request.method != b"HEAD"
                and request.code not in NO_BODY_CODES
                and not request.responseHeaders.hasHeader(b"content-length")):
            request.responseHeaders.setRawHeaders(b"Content-Length", [b"%d" % len(body)])
        if body:
            request.write(body)
        request.finish()

    def _observe(self, request: Any, match: Optional[RouteMatch], method: str, started: float) -> None:
        if method not in _READ_METHODS:
            # what the request changed shows in the next health report (kept results forgotten)
            self.ctx.health.invalidate()
        template = match.label if match else "unmatched"
        label = self._labels.get((method, template))
        if label is None:   # bounded: methods of KNOWN_METHODS × route templates
            label = self._labels[(method, template)] = f"{method}_{template}"
        latency_ms = (self.ctx.clock.seconds() - started) * 1000.0
        status = request.code
        try:
            self.ctx.metrics.observe_http(label, status, latency_ms)
        except Exception:
            log.failure("metrics hook failed")
        phase = self.ctx.health.phase
        if status == 503 and phase != "ready":
            # Expected while starting or stopping (probes, retried webhooks): not an error.
            emit = log.debug if match is not None and match.template.startswith(
                ("/api/cloud/health", "/health")) else log.info
            emit("{method} {path} -> {status} ({phase})", method=method, path=_request_path(request),
                 status=status, phase=phase, latency_ms=round(latency_ms, 3))
        elif status >= 500:
            log.error("{method} {path} -> {status}", method=method, path=_request_path(request),
                      status=status, latency_ms=round(latency_ms, 3))
        elif debug_enabled():
            log.debug("{method} {path} -> {status}", method=method, path=_request_path(request),
                      status=status, latency_ms=round(latency_ms, 3))

    def _crashed(self, failure: Any, request: Any) -> None:
        log.failure("Request pipeline failed", failure=failure)
        if not request.finished and not getattr(request, "_disconnected", False):
            if not request.startedWriting:
                request.setResponseCode(500)
                request.setHeader("Content-Type", "application/json")
                request.write(b'{"error":"internal_error","detail":"Internal server error"}')
            request.finish()


def client_ip(request: Any, trusted_proxies: Any) -> str:
    """The caller's address by the S6 rules (also usable before the body, from the head)."""
    peer = request.getClientAddress()
    host = getattr(peer, "host", None) or "unknown"
    return derive_client_ip(
        host,
        request.requestHeaders.getRawHeaders("x-forwarded-for", []),
        request.getHeader("x-real-ip"),
        trusted_proxies,
    )


def _request_path(request: Any) -> str:
    """The decoded request path, computed once (Klein later moves segments
    from ``postpath`` to ``prepath``)."""
    cached = getattr(request, "_stdaemon_path", None)
    if cached is None:
        raw = request.path.decode("latin-1")
        try:
            cached = _unquote_path(raw)
        except UnicodeDecodeError:   # answered 400 invalid_path; kept for logs and error bodies
            cached = unquote(raw, errors="replace")
        request._stdaemon_path = cached
    return cached


def _unquote_path(path: str) -> str:
    """Percent-decoded path text; ``UnicodeDecodeError`` when the escapes are not UTF-8."""
    if "%" not in path:
        return path
    return unquote(path, errors="strict")
