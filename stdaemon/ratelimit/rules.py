"""Which rate limit applies to a request: pure logic, no I/O.

The built-in table is the operations guide's (S11), matched in order after
any custom rules from the config; the first rule whose regular expression
matches the normalised path and whose methods include the request's method
wins, and everything else falls back to ``rate_limit.calls`` per
``rate_limit.period`` (``RATE_LIMIT_CALLS``/``RATE_LIMIT_PERIOD``, default
100 per 60 s).  ``calls = 0`` (globally, or ``rate_limit.enabled = false``)
disables limiting; a custom rule with ``calls = 0`` leaves the requests it
matches unlimited.

Paths are normalised before anything is matched (percent-decoding, merged
slashes, resolved dot segments, no trailing slash), so ``/api/auth//login``,
``/api/auth/%6Cogin`` or ``/health/../api/auth/login`` neither dodge a rule
nor hide behind an exclusion.

Each rule has its own bucket per client: the bucket key is
``"<rule name>:<client ip>"``, so the 5 logins a minute do not eat into the
100 general requests.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence
from urllib.parse import unquote

from stdaemon.invalid import InvalidValue

__all__ = [
    "RateRule",
    "RuleSet",
    "DEFAULT_RULES",
    "DEFAULT_CALLS",
    "DEFAULT_PERIOD",
    "normalize_path",
    "is_excluded",
    "parse_rules",
    "build_rule_set",
    "client_key",
]

DEFAULT_CALLS = 100
DEFAULT_PERIOD = 60

#: Largest ``calls`` accepted for a rule: every admitted request of a window
#: is remembered, so this bounds memory per tracked client.
MAX_CALLS = 100_000
#: Longest ``period`` accepted for a rule (one day).
MAX_PERIOD = 86_400

_METHOD_TOKEN = re.compile(r"^[A-Z]+$")
_ALL_METHODS = {"*", "ALL", "ANY"}


@dataclass(frozen=True)
class RateRule:
    name: str
    pattern: str
    calls: int
    period: float
    methods: Optional[frozenset] = None  # None: every method
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # DOTALL: a decoded newline in a path must not make ``.*`` stop short
        # and let the request fall through to a looser rule.
        object.__setattr__(self, "regex", re.compile(self.pattern, re.DOTALL))

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return self.regex.search(path) is not None

    @property
    def unlimited(self) -> bool:
        return self.calls <= 0


def _rule(name: str, pattern: str, calls: int, methods: Optional[Iterable[str]]) -> RateRule:
    return RateRule(name, pattern, calls, 60,
                    frozenset(methods) if methods is not None else None)


#: The guide's table.  Job submission matches both real paths,
#: ``POST /api/cloud/jobs/submit`` and ``POST /api/cloud/jobs``.
DEFAULT_RULES: tuple[RateRule, ...] = (
    _rule("login", r"^/api/auth/login$", 5, ["POST"]),
    _rule("register", r"^/api/auth/register$", 3, ["POST"]),
    _rule("api_keys", r"^/api/auth/api-keys(/.*)?$", 10, ["POST"]),
    _rule("job_submit", r"^/api/cloud/jobs(/submit)?$", 20, ["POST"]),
    _rule("job_cancel", r"^/api/cloud/jobs/[^/]+/cancel$", 30, ["POST"]),
    _rule("webhooks", r"^/api/webhooks(/.*)?$", 100, None),
    _rule("storage", r"^/api/cloud/storage(/.*)?$", 50, None),
    _rule("quotas", r"^/api/quotas(/.*)?$", 30, None),
)


def normalize_path(raw: str | bytes) -> str:
    """The path as routing sees it: no query, decoded, merged slashes, no dot segments."""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    path = raw.split("?", 1)[0].split("#", 1)[0]
    path = unquote(path, errors="replace")
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return "/" + "/".join(out)


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def is_excluded(method: str, path: str) -> bool:
    """Never rate limited: health, the event stream, static files, hints,
    ``/api/users/me`` and the provider list (GET).  ``path`` is normalised."""
    if _under(path, "/health") or path.startswith("/api/cloud/health"):
        return True
    if _under(path, "/api/events/stream") or _under(path, "/static"):
        return True
    if _under(path, "/api/cloud/hints") or _under(path, "/api/users/me"):
        return True
    if path == "/api/cloud/providers" and method in ("GET", "HEAD"):
        return True
    return False


@dataclass(frozen=True)
class RuleSet:
    """Custom rules, then the guide's table, then the default."""

    rules: tuple[RateRule, ...]
    default: RateRule
    enabled: bool = True

    def match(self, method: str, path: str) -> Optional[RateRule]:
        """The rule for a request, or ``None`` when it is not limited.

        ``method`` is upper case; ``path`` is normalised (see :func:`normalize_path`).
        """
        if not self.enabled or is_excluded(method, path):
            return None
        for rule in self.rules:
            if rule.matches(method, path):
                return None if rule.unlimited else rule
        return None if self.default.unlimited else self.default

    def bucket(self, rule: RateRule, client: str) -> str:
        return f"{rule.name}:{client}"


def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    """The rate-limit identity of a client address.

    IPv4 addresses count one by one; an IPv6 client counts as its /64 (one
    host or site usually holds a whole /64, so per-address limits would be
    trivially dodged).  Anything unparseable is used as it is.
    """
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


def _as_int(path: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        raise InvalidValue(path, "must be an integer")
    if isinstance(value, str):
        value = value.strip()
        if not re.fullmatch(r"\d+", value):
            raise InvalidValue(path, f"must be an integer, got {value!r}")
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int):
        raise InvalidValue(path, f"must be an integer, got {value!r}")
    if not low <= value <= high:
        raise InvalidValue(path, f"must be between {low} and {high}, got {value}")
    return value


def _methods(path: str, value: Any) -> Optional[frozenset]:
    if value is None:
        return None
    if isinstance(value, str):
        items = [m for m in re.split(r"[\s,|]+", value) if m]
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        raise InvalidValue(path, "must be a list of HTTP methods or null for all")
    methods = set()
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise InvalidValue(f"{path}[{i}]", "must be an HTTP method name")
        name = item.strip().upper()
        if name in _ALL_METHODS:
            return None
        if not _METHOD_TOKEN.match(name):
            raise InvalidValue(f"{path}[{i}]", f"not an HTTP method: {item!r}")
        methods.add(name)
    if not methods:
        return None
    return frozenset(methods)


def parse_rules(raw: Sequence[Any], path: str = "rate_limit.rules") -> tuple[RateRule, ...]:
    """Custom rules from config, each ``(pattern, calls, period, methods)``.

    A rule is a mapping ``{pattern, calls, period, methods}``, a sequence
    ``[pattern, calls, period(, methods)]`` or (for INI files) a string
    ``"pattern calls period [METHOD,METHOD|*]"``.  Errors carry the key path.
    """
    if raw is None:
        return ()
    if isinstance(raw, (str, bytes, Mapping)) or not isinstance(raw, Sequence):
        raise InvalidValue(path, "must be a list of rules")
    rules = []
    for i, item in enumerate(raw):
        rpath = f"{path}[{i}]"
        if isinstance(item, str):
            parts = item.split()
            if len(parts) not in (3, 4):
                raise InvalidValue(rpath, "a rule string is 'pattern calls period [methods]'")
            item = parts
        if isinstance(item, (list, tuple)):
            if len(item) not in (3, 4):
                raise InvalidValue(rpath, "a rule is (pattern, calls, period, methods)")
            item = {"pattern": item[0], "calls": item[1], "period": item[2],
                    "methods": item[3] if len(item) == 4 else None}
        if not isinstance(item, Mapping):
            raise InvalidValue(rpath, "a rule is {pattern, calls, period, methods}")
        unknown = sorted(set(item) - {"pattern", "calls", "period", "methods", "name"})
        if unknown:
            raise InvalidValue(f"{rpath}.{unknown[0]}", "unknown rule key")
        pattern = item.get("pattern")
        if not isinstance(pattern, str) or not pattern:
            raise InvalidValue(f"{rpath}.pattern", "required: a regular expression")
        try:
            re.compile(pattern)
        except re.error as e:
            raise InvalidValue(f"{rpath}.pattern", f"invalid regular expression: {e}") from None
        if "calls" not in item:
            raise InvalidValue(f"{rpath}.calls", "required")
        if "period" not in item:
            raise InvalidValue(f"{rpath}.period", "required")
        calls = _as_int(f"{rpath}.calls", item["calls"], 0, MAX_CALLS)
        period = _as_int(f"{rpath}.period", item["period"], 1, MAX_PERIOD)
        methods = _methods(f"{rpath}.methods", item.get("methods"))
        name = item.get("name") or f"rule{i}"
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
            raise InvalidValue(f"{rpath}.name", "letters, digits, '_', '.', '-' (at most 64)")
        rules.append(RateRule(f"custom.{name}", pattern, calls, period, methods))
    return tuple(rules)


def build_rule_set(calls: Any = DEFAULT_CALLS, period: Any = DEFAULT_PERIOD,
                   rules: Sequence[Any] = (), enabled: bool = True,
                   path: str = "rate_limit") -> RuleSet:
    """The rule set from config values (``rate_limit.calls|period|rules|enabled``).

    ``calls = 0`` disables rate limiting entirely, as the guide says.
    """
    calls = _as_int(f"{path}.calls", calls, 0, MAX_CALLS)
    period = _as_int(f"{path}.period", period, 1, MAX_PERIOD)
    custom = parse_rules(rules, f"{path}.rules")
    default = RateRule("default", r"", calls, period, None)
    return RuleSet(rules=custom + DEFAULT_RULES, default=default,
                   enabled=bool(enabled) and calls > 0)


def rule_set_from_config(rate_limit_config: Any) -> RuleSet:
    """Build from a ``RateLimitConfig`` section (anything with the same attributes)."""
    return build_rule_set(
        calls=getattr(rate_limit_config, "calls", DEFAULT_CALLS),
        period=getattr(rate_limit_config, "period", DEFAULT_PERIOD),
        rules=tuple(getattr(rate_limit_config, "rules", ()) or ()),
        enabled=getattr(rate_limit_config, "enabled", True),
    )
