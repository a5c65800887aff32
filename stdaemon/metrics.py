"""Prometheus metrics (S10): one object owning its own CollectorRegistry.

No module-level metrics on the global registry: each :class:`Metrics`
instance has its own ``CollectorRegistry``, so tests and several daemons in
one process never collide.  Counters are updated where events happen;
gauges that describe state are computed on scrape by collectors that read
in-memory counters (never a full table scan).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry


class Metrics:
    def __init__(self, clock: Any):
        self.clock = clock
        self.registry = CollectorRegistry(auto_describe=True)
        # endpoint → [count, total latency ms]; endpoint_status → count
        self.http_requests: dict[str, list] = {}
        self.http_errors: dict[str, int] = {}
        # Rate limiting (S11): the middleware (stdaemon/http/rate_limit.py) counts
        # every violation here and installs the tracked-clients reader.
        self.rate_limit_violations = 0
        self.rate_limit_tracked_clients: Any = lambda: 0

    def observe_http(self, endpoint: str, status: int, latency_ms: float) -> None:
        entry = self.http_requests.get(endpoint)
        if entry is None:
            entry = self.http_requests[endpoint] = [0, 0.0]
        entry[0] += 1
        entry[1] += latency_ms
        if status >= 400:
            key = f"{endpoint}_{status}"
            self.http_errors[key] = self.http_errors.get(key, 0) + 1
