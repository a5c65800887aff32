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
3. the decision comes from the configured backend (``ctx.rate_limiter``, a
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

Violations are counted in ``ctx.metrics.rate_limit_violations`` (every one)
and audited as ``rate_limited`` (ip, endpoint, method, user agent) through a
sampler so that a flood cannot flood the audit log: at most one entry per
client IP per minute and at most 60 entries a minute in all; each entry says
in ``details.suppressed`` how many violations of that client it stands for.
The tracked-clients gauge (``ctx.metrics.rate_limit_tracked_clients()``) is
the number of distinct clients limited in the last window, per instance.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet import defer

from stdaemon.http.client_ip import is_loopback
from stdaemon.ratelimit.rules import RuleSet, client_key, normalize_path, rule_set_from_config
from stdaemon.ratelimit.sliding_window import RecentKeys, SampledCounter
from stdaemon.http.errors import ApiError
from stdaemon.logs import get_logger
from stdaemon.ratelimit.service import RateLimiting, install as install_limiting, make_rate_limiting

__all__ = ["RateLimitMiddleware", "install", "RATE_LIMITED_DETAIL"]

log = get_logger("stdaemon.http.rate_limit")

RATE_LIMITED_DETAIL = "Rate limit exceeded. Please try again later."
_MAX_UA = 256
_MAX_ENDPOINT = 512


def _printable(text: str, limit: int) -> str:
    """Client-supplied text for logs and the audit log: bounded, no control characters."""
    return "".join(c if c.isprintable() else "?" for c in text[:limit])


class RateLimitMiddleware:
    def __init__(self, ctx: Any, limiting: RateLimiting, rules: RuleSet,
                 exempt_loopback: bool = True, sampler: Optional[SampledCounter] = None):
        self.ctx = ctx
        self.limiting = limiting
        self.rules = rules
        self.exempt_loopback = exempt_loopback
        self.sampler = sampler or SampledCounter(per_key_interval=60.0, global_limit=60,
                                                 global_period=60.0)
        longest = max([r.period for r in rules.rules] + [rules.default.period])
        self.clients = RecentKeys(horizon=longest)
        self.violations = 0

    def sweep(self) -> None:
        now = self.ctx.clock.seconds()
        self.clients.sweep(now)
        self.sampler.sweep(now)

    async def __call__(self, request: Any, match: Any) -> Optional[bytes]:
        if match is not None and not match.info.rate_limited:
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
        now = self.ctx.clock.seconds()
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
        metrics = self.ctx.metrics
        if hasattr(metrics, "rate_limit_violations"):
            metrics.rate_limit_violations += 1
        record, suppressed = self.sampler.record(client, now)
        if not record:
            return
        user_agent = _printable(request.getHeader("user-agent") or "", _MAX_UA)
        endpoint = _printable(path, _MAX_ENDPOINT)
        log.warning("Rate limit exceeded by {ip}: {method} {endpoint} (rule {rule})",
                    ip=ip, method=method, endpoint=endpoint, rule=rule, suppressed=suppressed)
        audit = getattr(self.ctx, "audit", None)
        if audit is None:
            return
        details = {"endpoint": endpoint, "method": method, "user_agent": user_agent,
                   "rule": rule, "suppressed": suppressed}
        # The 429 does not wait for the audit write; a failed write is logged.
        d = defer.maybeDeferred(audit.record, "rate_limited", actor="system", ip=ip,
                                target=endpoint, action=method, details=details)
        d.addErrback(lambda f: log.failure("Could not audit a rate limit violation", failure=f))


def install(ctx: Any, root: Any) -> RateLimitMiddleware:
    """Wire rate limiting: ``ctx.rate_limiter``, the middleware (first in the
    chain), the ``rate_limiter`` health component, metrics and sweep timer.

    Malformed rules stop start-up with a :class:`~stdaemon.invalid.InvalidValue` naming the key path.
    """
    config = ctx.config.rate_limit
    rules = rule_set_from_config(config)
    limiting = make_rate_limiting(config, ctx.clock, ctx.reactor, ctx.state_dir)
    limiting.setName("rate-limiter")
    limiting.setServiceParent(ctx.services)
    ctx.rate_limiter = limiting
    install_limiting(limiting)
    middleware = RateLimitMiddleware(ctx, limiting, rules,
                                     exempt_loopback=config.exempt_loopback)
    root.middlewares.insert(0, middleware)
    root.rate_limit = middleware
    ctx.rate_limit_middleware = middleware  # surfaces that refuse before the body count those too
    ctx.health.register("rate_limiter", limiting.health)
    metrics = ctx.metrics
    if hasattr(metrics, "rate_limit_tracked_clients"):
        metrics.rate_limit_tracked_clients = lambda: len(middleware.clients)
    ctx.add_timer("rate-limit-clients-sweep", 30.0, middleware.sweep)
    return middleware
