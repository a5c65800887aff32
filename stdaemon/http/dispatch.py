"""The route table of every surface, built once at start-up: one match per request.

Static paths are looked up in a dict; the others go through ONE werkzeug ``Map`` of every
surface's rules (recent matches of paths with parameters are kept, bounded). The root
(``stdaemon/http/root.py``) matches a request here when its headers arrive and runs the handler
with that match.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Map, RequestRedirect, Rule

from stdaemon.http.errors import ApiError
from stdaemon.http.surface import RouteInfo, Surface, route_info

#: Bound of the dispatch table's kept matches of paths with parameters.
RECENT_MATCHES = 4096


@dataclass
class RouteMatch:
    surface: Surface
    app: Any               # the surface's bound Klein app (where the route is declared)
    endpoint: str
    template: str          # the route template, e.g. /api/cloud/jobs/<job_id>
    args: dict
    info: RouteInfo

    @property
    def label(self) -> str:
        """Bounded-cardinality metrics label: ``METHOD_<route template>``."""
        return self.template


class _MatchOnlyRule(Rule):
    """A copy of a surface's rule for the combined map, which only matches: werkzeug compiles two
    URL builders per rule (Python ``compile``), the larger part of building a map; the surfaces'
    own maps keep theirs."""

    def _compile_builder(self, append_unknown: bool = True) -> Any:
        def unused(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise NotImplementedError("the dispatch table does not build URLs")
        return unused


def _match_only(rule: Rule) -> Rule:
    return _MatchOnlyRule(rule.rule, **rule.get_empty_kwargs())   # what Rule.empty() copies


@dataclass(frozen=True)
class _Route:
    surface: Surface
    app: Any
    endpoint: str
    template: str
    info: RouteInfo


class Dispatch:
    """The route table of every surface, built once: match a (method, path) in one step.

    Paths without converters are looked up in a dict (``path → {method: route}``); the others go
    through ONE werkzeug ``Map`` holding every surface's rules. Surfaces keep their Klein apps to
    declare routes; the root calls the matched handler as Klein's executor would, without Klein
    routing the request a second time. Where two surfaces' rules could match the same path, the surface listed
    first wins, as when each surface's map was tried in turn (``tests/test_dispatch.py``)."""

    def __init__(self, surfaces: list[Surface]):
        self.static: dict[str, dict[str, _Route]] = {}
        self.routes: dict[str, _Route] = {}
        self._order = {id(surface): index for index, surface in enumerate(surfaces)}
        # per surface: its own adapter and the literal beginnings of its rules with converters,
        # to tell when an earlier surface could claim a path the combined map gave a later one
        self._earlier: list[tuple[tuple[str, ...], Any]] = []
        rules = []
        for surface in surfaces:
            app = surface.app
            for rule in app.url_map.iter_rules():
                info = route_info(app, rule.endpoint)
                if info is None:
                    raise UnprotectedRoute(
                        f"{type(surface).__name__}: route {rule.rule} has no access policy; "
                        "register it with stdaemon.http.surface.route")
                entry = _Route(surface, app, rule.endpoint, rule.rule, info)
                self.routes[rule.endpoint] = entry
                rules.append(_match_only(rule))
                if not rule.arguments:
                    by_method = self.static.setdefault(rule.rule, {})
                    for method in rule.methods or ():
                        by_method.setdefault(method, entry)
        self.map = Map(rules)
        self.adapter = self.map.bind("localhost")
        # (method, path) → (route, args) of recent matches of rules with converters: clients poll
        # the same few job ids, and werkzeug's matcher is most of the cost of such a request's
        # routing. The table never changes after start-up; bounded, cleared when full.
        self._recent: dict[tuple[str, str], tuple[_Route, dict]] = {}
        for surface in surfaces:
            prefixes = tuple(rule.rule.split("<", 1)[0] for rule in surface.app.url_map.iter_rules()
                             if rule.arguments)
            self._earlier.append((prefixes, surface.app.url_map.bind("localhost")))
        self._check_precedence(surfaces)

    def _check_precedence(self, surfaces: list[Surface]) -> None:
        """A static path served by an earlier surface's dynamic rule must keep going there: such
        paths are taken out of the static dict (rare; none in the daemon's own table)."""
        for path, by_method in list(self.static.items()):
            for method, entry in list(by_method.items()):
                for surface, (prefixes, adapter) in zip(surfaces, self._earlier):
                    if surface is entry.surface:
                        break
                    if not (prefixes and path.startswith(prefixes)):
                        continue   # only its rules with converters could claim the path first
                    try:
                        rule, _ = adapter.match(path, method, return_rule=True)
                    except (NotFound, MethodNotAllowed, RequestRedirect):
                        continue
                    if rule.endpoint != entry.endpoint:
                        del by_method[method]
                        break

    def match(self, method: str, path: str) -> RouteMatch:
        by_method = self.static.get(path)
        if by_method is not None:
            entry = by_method.get(method)
            if entry is not None:
                return RouteMatch(entry.surface, entry.app, entry.endpoint, entry.template, {},
                                  entry.info)
        recent = self._recent.get((method, path))
        if recent is not None:
            entry, args = recent
            return RouteMatch(entry.surface, entry.app, entry.endpoint, entry.template, dict(args),
                              entry.info)
        try:
            rule, args = self.adapter.match(path, method, return_rule=True)
        except MethodNotAllowed as e:
            raise ApiError(405, "method_not_allowed", f"Method {method} is not allowed here",
                           headers={"Allow": ", ".join(sorted(e.valid_methods or ()))}) from None
        except (NotFound, RequestRedirect):
            raise ApiError(404, "not_found", f"No route for {path}") from None
        entry = self.routes[rule.endpoint]
        # werkzeug ranks rules of one map by how specific they are; surfaces are ranked by their
        # order: an earlier surface whose own rule matches too keeps the path.
        for prefixes, adapter in self._earlier[:self._order[id(entry.surface)]]:
            if prefixes and path.startswith(prefixes):
                try:
                    rule, args = adapter.match(path, method, return_rule=True)
                except (NotFound, MethodNotAllowed, RequestRedirect):
                    continue
                entry = self.routes[rule.endpoint]
                break
        if len(self._recent) >= RECENT_MATCHES:
            self._recent.clear()
        self._recent[(method, path)] = (entry, dict(args))
        return RouteMatch(entry.surface, entry.app, entry.endpoint, entry.template, args, entry.info)



class UnprotectedRoute(RuntimeError):
    """A surface registered a Klein route without ``stdaemon.http.surface.route``."""


def route_table(surfaces: list[Surface]) -> list[tuple[str, tuple[str, ...], str, RouteInfo]]:
    """Every route of ``surfaces``: (template, methods without HEAD/OPTIONS, endpoint, info)."""
    out = []
    for surface in surfaces:
        for rule in surface.app.url_map.iter_rules():
            methods = tuple(sorted(m for m in (rule.methods or ()) if m not in ("HEAD", "OPTIONS")))
            out.append((rule.rule, methods, rule.endpoint, route_info(surface.app, rule.endpoint)))
    return out
