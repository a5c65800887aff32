"""How an HTTP surface is written: a Klein app per class, routes with access.

A surface module looks like::

    class HealthSurface(Surface):
        app = Klein()
        prefixes = ("/api/cloud/health", "/health")

        @route(app, "/api/cloud/health/live", access=PUBLIC)
        async def live(self, request):
            return {"status": "ok"}

Routes use full paths (grep for the path to find its handler).  ``route``
records the access policy of every endpoint; the root refuses to mount a
surface with a Klein route registered any other way, and authenticates every
request *before* the handler runs, from the matched route's policy.  Nothing
is public unless it says ``access=PUBLIC``.

Handlers return a dict/list (JSON, 200), a :class:`Response`, or bytes, or
raise :class:`ApiError`.  Any other exception is logged with its traceback
and answered as a JSON 500 without it.
"""

from __future__ import annotations

import enum
import functools
import inspect
import json
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

from klein import Klein
from twisted.internet import defer
from twisted.web.server import NOT_DONE_YET
from werkzeug.routing import Map, Rule

from stdaemon.http import validation
from stdaemon.http.errors import ApiError, not_found
from stdaemon.logs import get_logger

log = get_logger("stdaemon.http")


class Access(enum.IntEnum):
    """Who may call a route.  Roles are ordered: admin ⊇ operator ⊇ viewer."""

    PUBLIC = 0
    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3


PUBLIC = Access.PUBLIC
VIEWER = Access.VIEWER
OPERATOR = Access.OPERATOR
ADMIN = Access.ADMIN

ROLE_ACCESS = {"viewer": Access.VIEWER, "operator": Access.OPERATOR, "admin": Access.ADMIN}


@dataclass
class RouteInfo:
    access: Access
    max_body: Optional[int] = None   # None = server.max_body_bytes; may only lower it
    rate_limited: bool = True
    path: str = ""
    methods: tuple[str, ...] = ("GET",)
    body: Optional[type] = None      # a validation.BodyModel subclass
    query: Optional[type] = None     # a validation.QueryModel subclass
    body_required: bool = True
    stream: bool = False             # answers a long-lived stream (HEAD answers headers only)
    error_extra: dict = field(default_factory=dict)   # added to every error body of the route
    path_ids: dict = field(default_factory=dict)      # path argument → what it names (404 if impossible)
    produces: tuple[str, ...] = ("application/json",)  # content types of a success (OpenAPI)
    signed_body: bool = False        # the handler verifies the raw body's signature, then validates
    summary: str = ""
    # A cap read from its own config key (``config -> bytes``), which may exceed
    # server.max_body_bytes (job submissions: jobs.max_submit_bytes).
    max_body_from: Optional[Callable[[Any], int]] = None
    # The coroutine function ``route`` registered with Klein, called by the root as
    # ``handler(surface, request, **args)``: what Klein's executor does, without its Deferred.
    handler: Optional[Callable] = field(default=None, compare=False, repr=False)


@dataclass
class Response:
    body: Any = None                 # dict/list → JSON; bytes/str → as is
    status: int = 200
    headers: dict = field(default_factory=dict)
    content_type: Optional[str] = None


class _LazyBuilderRule(Rule):
    """A rule whose two URL builders are compiled the first time a URL is built from it.

    werkzeug compiles both (generated Python, ``compile``) as soon as a rule joins a map, about
    a quarter of stdaemon's route declarations at import; the surfaces match with their rules and
    build no URLs, so the builders are left until something asks (then it works as before)."""

    def _compile_builder(self, append_unknown: bool = True) -> Any:
        compile_now = super()._compile_builder
        compiled: list = []

        def build(rule: Any, *args: Any, **kwargs: Any) -> Any:
            if not compiled:
                compiled.append(compile_now(append_unknown))
            return compiled[0](rule, *args, **kwargs)

        return build


class _LazyBuilderMap(Map):
    """A surface's map: each rule Klein adds joins it as a :class:`_LazyBuilderRule` copy."""

    def add(self, rulefactory: Any) -> None:
        if type(rulefactory) is Rule:
            rulefactory = _LazyBuilderRule(rulefactory.rule, **rulefactory.get_empty_kwargs())
        super().add(rulefactory)


def _lazy_builders(klein: Klein) -> None:
    """Give a surface's Klein app (still without routes) the lazy-builder map."""
    if type(klein.url_map) is Map and next(klein.url_map.iter_rules(), None) is None:
        klein._url_map = _LazyBuilderMap()


def route_info(app: Klein, endpoint: str) -> Optional[RouteInfo]:
    """The access policy and models ``route`` gave an endpoint of ``app`` (None: not declared
    with ``route``). The info travels with the endpoint's handler: there is no global table."""
    return getattr(app.endpoints.get(endpoint), "route_info", None)


def route(app: Klein, path: str, methods: Iterable[str] = ("GET",), *,
          access: Access = Access.ADMIN, max_body: Optional[int] = None,
          rate_limited: bool = True, body: Optional[type] = None, query: Optional[type] = None,
          body_required: bool = True, stream: bool = False,
          error_extra: Optional[dict] = None, path_ids: Optional[dict] = None,
          max_body_from: Optional[Callable[[Any], int]] = None,
          produces: Iterable[str] = ("application/json",), signed_body: bool = False) -> Callable:
    """Register a handler on ``app`` with an explicit access policy.

    ``body``/``query`` name the route's request models (``stdaemon.http.validation``): they are
    validated before the handler runs (400 ``{error, detail, field}`` otherwise) and the handler
    receives the instances as its ``body=`` / ``query=`` keyword arguments. ``body_required=False``
    validates an empty body as ``{}``. ``stream=True`` marks a route that answers a long-lived
    stream: ``HEAD`` on it answers the headers without opening one. ``error_extra`` fields are
    added to the route's error bodies (the submission API's ``success: false``). ``path_ids``
    (``{"user_id": "User"}``) names numeric path ids checked first: an id that cannot exist is a
    404 before the body is looked at. ``max_body`` may only lower ``server.max_body_bytes``;
    ``max_body_from`` (``config -> bytes``) takes a larger cap from the route's own config key
    (job submissions: ``jobs.max_submit_bytes``). ``produces`` lists the content types a success
    answers with (for the OpenAPI document; JSON by default). ``signed_body=True``: the body is
    signed (webhooks), so the handler checks the signature over the raw bytes first and then
    validates the body with ``validation.validate_raw(raw, model)``; nothing of an unsigned body
    is parsed.
    """

    methods = tuple(m.upper() for m in methods)

    def decorator(fn: Callable) -> Callable:
        endpoint = f"{fn.__module__}.{fn.__qualname__}"
        info = RouteInfo(access=access, max_body=max_body, rate_limited=rate_limited, path=path,
                         methods=methods, body=body, query=query, body_required=body_required,
                         stream=stream, error_extra=dict(error_extra or {}),
                         path_ids=dict(path_ids or {}), max_body_from=max_body_from,
                         produces=tuple(produces), signed_body=signed_body,
                         summary=(inspect.getdoc(fn) or "").split("\n", 1)[0])

        @functools.wraps(fn)
        async def handler(self: Any, request: Any, **kwargs: Any) -> Any:
            try:
                for name, what in info.path_ids.items():
                    path_id(kwargs[name], what)
                if info.query is not None:
                    kwargs["query"] = validation.validate_query(request, info.query)
                if info.body is not None and not info.signed_body:
                    kwargs["body"] = validation.validate_body(request, info.body, info.body_required)
                if info.stream and request.method == b"HEAD":
                    # Headers only: the stream is not opened (no slot, no task left behind).
                    return render_result(request, Response(b"", content_type=info.produces[0]))
                result = fn(self, request, **kwargs)
                if inspect.isawaitable(result):
                    result = await result
            except ApiError as error:
                for name, value in info.error_extra.items():
                    error.extra.setdefault(name, value)
                return render_error(request, error)
            except defer.CancelledError:
                raise   # the client went away (the root cancels the handler): nothing to answer or log
            except Exception:
                log.failure("Unhandled error in {endpoint}", endpoint=endpoint)
                return render_error(request, ApiError(500, "internal_error",
                                                      "Internal server error"))
            return render_result(request, result)

        handler.route_info = info  # type: ignore[attr-defined]  (read back by route_info)
        info.handler = handler
        _lazy_builders(app)
        app.route(path, methods=list(methods), endpoint=endpoint)(handler)
        return fn

    return decorator


def render_result(request: Any, result: Any) -> Any:
    if result is NOT_DONE_YET or result is None and request.finished:
        return NOT_DONE_YET
    if isinstance(result, Response):
        request.setResponseCode(result.status)
        for name, value in result.headers.items():
            request.setHeader(name, value)
        if result.content_type:
            request.setHeader("Content-Type", result.content_type)
        result = result.body
        if result is None:
            return b""
    if isinstance(result, (dict, list)):
        if not request.responseHeaders.hasHeader(b"content-type"):
            request.setHeader("Content-Type", "application/json")
        return json.dumps(result, separators=(",", ":"), default=str).encode()
    if isinstance(result, str):
        return result.encode()
    return result


def render_error(request: Any, error: ApiError) -> bytes:
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        request.setHeader(name, value)
    request.setHeader("Content-Type", "application/json")
    return json.dumps(error.body()).encode()


def path_id(value: Any, what: str) -> int:
    """A numeric id from a path or body: a positive integer SQLite can hold,
    else 404 (an id that cannot exist is simply not found)."""
    try:
        number = int(str(value), 10)
    except ValueError:
        raise not_found(f"{what} {str(value)[:64]} not found") from None
    if not 0 < number <= validation.SQLITE_MAX_INT:
        raise not_found(f"{what} {str(value)[:64]} not found")
    return number


class Surface:
    """Base class of every HTTP surface.  Subclasses set ``app`` and
    ``prefixes`` (path prefixes the surface serves, for body limits and
    routing) and take the :class:`stdaemon.app.App` context."""

    app: Klein
    prefixes: tuple[str, ...] = ()
    # Body limit for this surface's routes when the route does not set one
    # (None = ``server.max_body_bytes``).
    max_body: Optional[int] = None

    def __init__(self, ctx: Any):
        self.ctx = ctx
