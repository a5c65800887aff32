"""Request authentication: who is calling, from headers or cookies.

Strategies are tried in order; the API-key strategy is built in and the
session-cookie strategy is added by the users module.  The root calls
``Authenticator.authenticate(request)`` for every non-public route before the
handler runs (see ``stdaemon/http/root.py``).  A loopback peer gets no
implicit trust: tunnels arrive on loopback.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from stdaemon.store import api_keys
from stdaemon.store.api_keys import Principal

Strategy = Callable[[Any], Awaitable[Optional[Principal]]]

_CACHE_SECONDS = 5.0
_CACHE_MAX = 10_000


def presented_api_key(request: Any) -> Optional[str]:
    key = request.getHeader("x-api-key")
    if key:
        return key.strip()
    authorization = request.getHeader("authorization") or ""
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() == "bearer" and token.strip().startswith(api_keys.KEY_PREFIX):
        return token.strip()
    return None


class Authenticator:
    def __init__(self, db: Any, clock: Any):
        self.db = db
        self.clock = clock
        self.strategies: list[Strategy] = [self._api_key]
        # hash → (principal, cached_at); short-lived so a scrape or a busy
        # client does not hit SQLite on every request.  Revocation calls
        # ``invalidate()``.
        self._cache: dict[str, tuple[Principal, float]] = {}

    def add_strategy(self, strategy: Strategy) -> None:
        self.strategies.append(strategy)

    def invalidate(self) -> None:
        self._cache.clear()

    async def authenticate(self, request: Any) -> Optional[Principal]:
        for strategy in self.strategies:
            principal = await strategy(request)
            if principal is not None:
                return principal
        return None

    async def _api_key(self, request: Any) -> Optional[Principal]:
        key = presented_api_key(request)
        if not key:
            return None
        now = self.clock.seconds()
        digest = api_keys.hash_key(key)
        cached = self._cache.get(digest)
        if cached is not None and now - cached[1] < _CACHE_SECONDS:
            return cached[0]
        principal = await self.db.run_read(api_keys.lookup, key, now)
        if principal is not None:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[digest] = (principal, now)
        else:
            self._cache.pop(digest, None)
        return principal
