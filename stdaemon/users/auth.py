"""Request authentication: who is calling, from headers or cookies.

Strategies are tried in order; the API-key strategy is built in and the
session-cookie strategy is added by the users module.  The root calls
``Authenticator.authenticate(request)`` for every non-public route before the
handler runs (see ``stdaemon/http/root.py``).  A loopback peer gets no
implicit trust: tunnels arrive on loopback.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

from twisted.internet.interfaces import IReactorTime

from stdaemon.store.database import Database
from stdaemon.users import api_keys, store
from stdaemon.users.api_keys import Principal

Strategy = Callable[[Any], Awaitable[Optional[Principal]]]

# Verified keys are kept in memory (by SHA-256 of the key, never the key): a request with a known
# key reads nothing from SQLite. An entry ends at the key's own expiry, after _CACHE_SECONDS at
# most, and at once when anything can have withdrawn rights: ``invalidate()`` in this process
# (revocation, user changes, a restore), and a change of the database's ``auth`` change counter
# (bumped by triggers on api_keys/users, so another instance or stdaemon-admin is seen too),
# read every GENERATION_POLL_SECONDS on a reader thread by the ``change-counters`` timer
# (``App.poll_change_counters``, which also empties the cache at the settling polls after a move:
# ``Database.saw_counter``).
_CACHE_SECONDS = 60.0
_CACHE_MAX = 10_000
GENERATION_POLL_SECONDS = 1.0


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
    def __init__(self, db: Database, clock: IReactorTime):
        self.db = db
        self.clock = clock
        self.strategies: list[Strategy] = [self._api_key]
        # sha256(key) → (principal, valid_until); bounded (oldest entries dropped first).
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._epoch = 0                        # bumped by invalidate(): lookups begun before it are not cached

    def add_strategy(self, strategy: Strategy) -> None:
        self.strategies.append(strategy)

    def invalidate(self) -> None:
        self._cache.clear()
        self._epoch += 1

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
        if cached is not None:
            if now < cached[1]:
                return cached[0]
            del self._cache[digest]
        epoch = self._epoch
        principal, expires_at = await self.db.run_read(store.lookup_with_expiry, key, now)
        if principal is not None and epoch == self._epoch:
            while len(self._cache) >= _CACHE_MAX:
                del self._cache[next(iter(self._cache))]
            until = now + _CACHE_SECONDS
            if expires_at is not None:
                until = min(until, expires_at)
            self._cache[digest] = (principal, until)
        return principal
