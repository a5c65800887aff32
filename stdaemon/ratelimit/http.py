"""The rate-limit middleware (S11): the first thing every routed request meets
after its client IP is known.

Per request:

1. routes marked ``rate_limited=False`` (health) and the guide's excluded paths
   are not limited; neither are loopback clients when
   ``rate_limit.exempt_loopback`` is true (the default, for development);
2. the rule comes from :mod:`stdaemon.ratelimit.rules` (custom rules, the
   guide's table, then ``rate_limit.calls`` per ``rate_limit.period``); the
   bucket is the rule's name and the client IP derived by the root with the
   one S6 function (``stdaemon.http.client_ip``), so a spoofed
   ``X-Forwarded-For`` from an untrusted peer changes nothing; an IPv6 client
   counts as its /64 (``client_key``);
3. the decision comes from the configured backend (``app.rate_limiter``, a
   :class:`stdaemon.ratelimit.service.RateLimiting`), so several instances sharing
   Redis share limits;
4. an admitted request gets ``X-RateLimit-Limit``, ``X-RateLimit-Remaining``
   and ``X-RateLimit-Reset`` (unix seconds at which the oldest request counted
   against the client leaves the window — the true time a slot frees up);
5. a refused one gets 429 with the same headers, ``Retry-After`` (seconds
   until a request would be admitted) and
   ``{"detail": "Rate limit exceeded. Please try again later.", "error": "rate_limited"}``.

Backend unavailable: fail-open (default) serves the request without the
headers (the figures are unknown); fail-closed answers 503
``rate_limiter_unavailable`` with ``Retry-After``.

Violations are counted in ``app.metrics.rate_limit_violations`` (every one)
and audited as ``rate_limited`` (ip, endpoint, method, user agent) through a
sampler so that a flood cannot flood the audit log: at most one entry per
client IP per minute and at most 60 entries a minute in all; each entry says
in ``details.suppressed`` how many violations of that client it stands for.
The tracked-clients gauge (``app.metrics.rate_limit_tracked_clients()``, fed by
:meth:`RateLimitMiddleware.tracked_clients`) is the number of distinct clients
limited in the last window, per instance.

The composition root (``stdaemon.service.build_app``) builds it, puts it first
among the root's middlewares, registers the ``rate_limiter`` health component
and the ``rate-limit-clients-sweep`` timer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from stdaemon.http.client_ip import is_loopback
from stdaemon.http.errors import ApiError
from stdaemon.logs import get_logger
from stdaemon.metrics.service import Metrics
from stdaemon.ratelimit.rules import RuleSet, client_key, normalize_path
from stdaemon.ratelimit.service import RateLimiting
from stdaemon.ratelimit.sliding_window import RecentKeys, SampledCounter

if TYPE_CHECKING:
    from stdaemon.audit.service import AuditLog

__all__ = ["RateLimitMiddleware", "RATE_LIMITED_DETAIL"]

log = get_logger("stdaemon.http.rate_limit")

RATE_LIMITED_DETAIL = "Rate limit exceeded. Please try again later."
_MAX_UA = 256
_MAX_ENDPOINT = 512


def _printable(text: str, limit: int) -> str:
    """Client-supplied text for logs and the audit log: bounded, no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


def _audit_sampler() -> SampledCounter:
    """At most one audit entry per client a minute, and 60 a minute in all."""
    return SampledCounter(per_key_interval=60.0, global_limit=60, global_period=60.0)


@dataclass(eq=False)
class RateLimitMiddleware:
    limiting: RateLimiting
    rules: RuleSet
    clock: Any = field(kw_only=True)
    metrics: Metrics = field(kw_only=True)
    audit: "AuditLog" = field(kw_only=True)
    exempt_loopback: bool = field(default=True, kw_only=True)
    sampler: SampledCounter = field(default_factory=_audit_sampler, kw_only=True)
    #: clients limited within the longest rule's window (the tracked-clients gauge)
    clients: RecentKeys = field(init=False)
    violations: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        longest = max([r.period for r in self.rules.rules] + [self.rules.default.period])
        self.clients = RecentKeys(horizon=longest)

    def tracked_clients(self) -> int:
        """Distinct clients limited in the last window (this instance)."""
        return len(self.clients)

    def sweep(self) -> None:
        now = self.clock.seconds()
        self.clients.sweep(now)
        self.sampler.sweep(now)

    async def __call__(self, request: Any, match: Any) -> Optional[bytes]:
        if match is not None and not match.info.rate_limited:
            return None
        if not self.rules.enabled:
            return None
        # A surface may exempt some of its own requests (S3 multipart parts).
        exempt = getattr(match.surface, "rate_limit_exempt", None) if match is not None else None
        if exempt is not None and exempt(request, match):
            return None
        method = request.method.decode("latin-1").upper()
        path = normalize_path(request.path)
        rule = self.rules.match(method, path)
        if rule is None:
            return None
        ip = request.client_ip
        if self.exempt_loopback and is_loopback(ip):
            return None
        now = self.clock.seconds()
        client = client_key(ip)
        self.clients.touch(client, now)
        outcome = await self.limiting.hit(f"http.{rule.name}:{client}", rule.calls, rule.period)
        state = outcome.state
        if state is None:
            if outcome.allowed:
                return None
            raise ApiError(503, "rate_limiter_unavailable",
                           "Rate limiting is unavailable; please try again later.",
                           headers={"Retry-After": "5"})
        headers = {
            "X-RateLimit-Limit": str(state.limit),
            "X-RateLimit-Remaining": str(state.remaining),
            "X-RateLimit-Reset": str(state.reset_epoch),
        }
        if state.allowed:
            for name, value in headers.items():
                request.setHeader(name, value)
            return None
        headers["Retry-After"] = str(state.retry_after_seconds)
        self._violation(request, ip, client, method, path, rule.name, now)
        raise ApiError(429, "rate_limited", RATE_LIMITED_DETAIL, headers=headers)

    def _violation(self, request: Any, ip: str, client: str, method: str, path: str, rule: str,
                   now: float) -> None:
        self.violations += 1
        self.metrics.rate_limited()
        record, suppressed = self.sampler.record(client, now)
        if not record:
            return
        user_agent = _printable(request.getHeader("user-agent") or "", _MAX_UA)
        endpoint = _printable(path, _MAX_ENDPOINT)
        log.warning("Rate limit exceeded by {ip}: {method} {endpoint} (rule {rule})",
                    ip=ip, method=method, endpoint=endpoint, rule=rule, suppressed=suppressed)
        details = {"endpoint": endpoint, "method": method, "user_agent": user_agent,
                   "rule": rule, "suppressed": suppressed}
        # The 429 does not wait for the audit write; a failed write is logged.
        self.audit.record_soon("rate_limited", actor="system", ip=ip, target=endpoint, action=method,
                               details=details)
