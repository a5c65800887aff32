"""Browser sessions: the ``st_session`` cookie strategy, CSRF and expiry (S12).

``build_app`` builds one :class:`SessionManager` (``app.sessions``), registers
its strategy with ``app.auth.add_strategy`` (after the API-key strategy, so a
request with a key is authenticated by the key and is exempt from CSRF) and
its sweep timer; the manager
- refuses (403) a state-changing session request whose ``X-CSRF-Token`` does
  not match its ``st_csrf`` cookie and session, or whose ``Origin`` is not the
  daemon's own origin or ``server.public_url`` (see ``stdaemon.users.csrf``);
- hashes and verifies passwords on its own small thread pool (Argon2 is
  memory-hard: at most two hashes at a time, never on the reactor thread);
- sweeps expired sessions (the ``session-sweep`` timer).  Lookups
  also check expiry, so a session is dead the moment it expires.
"""

from __future__ import annotations

from typing import Any, Optional

from twisted.internet.interfaces import IReactorTime

from stdaemon.store.database import Database
from stdaemon.users import csrf
from stdaemon.http.errors import ApiError
from stdaemon.logs import get_logger
from stdaemon.users import store as users
from stdaemon.users.api_keys import Principal
from stdaemon.threads import BlockingPool

log = get_logger("stdaemon.sessions")

SESSION_COOKIE = "st_session"
CSRF_COOKIE = "st_csrf"
CSRF_HEADER = "X-CSRF-Token"
SWEEP_INTERVAL = 60.0


def cookie(request: Any, name: str) -> Optional[str]:
    value = request.getCookie(name.encode())
    if not value:
        return None
    try:
        return value.decode("ascii")
    except UnicodeDecodeError:
        return None


def request_is_https(request: Any, public_url: str = "") -> bool:
    if request.isSecure():
        return True
    # Behind a TLS-terminating proxy the public URL says https.
    proto = (request.getHeader("x-forwarded-proto") or "").lower()
    return proto == "https" and public_url.lower().startswith("https://")


class SessionManager:
    """``passwords`` is the pool Argon2 runs on; ``ttl`` is ``auth.session_ttl``;
    ``public_url`` is ``server.public_url``."""

    def __init__(self, db: Database, clock: IReactorTime, passwords: BlockingPool, ttl: float,
                 public_url: str):
        self.db = db
        self.clock = clock
        self._pool = passwords
        self.ttl = float(ttl)
        self.public_url = public_url
        self.swept = 0

    @property
    def sweep_interval(self) -> float:
        """Seconds between two runs of the ``session-sweep`` timer."""
        return min(SWEEP_INTERVAL, max(self.ttl, 1.0))

    # -- passwords (off the reactor thread) -------------------------------------

    def hash_password(self, password: str) -> Any:
        return self._pool.run(users.hash_password, password)

    def verify_password(self, password_hash: Optional[str], password: str) -> Any:
        return self._pool.run(users.verify_password, password_hash, password)

    # -- the strategy ------------------------------------------------------------

    async def authenticate(self, request: Any) -> Optional[Principal]:
        token = cookie(request, SESSION_COOKIE)
        if not token:
            return None
        info = await self.db.run_read(users.lookup_session, token, self.clock.seconds())
        if info is None:
            return None
        method = request.method.decode("latin-1").upper()
        if method not in csrf.SAFE_METHODS:
            self.check_csrf(request, info.csrf_hash)
        return info.principal

    def allowed_origins(self, request: Any) -> set[str]:
        return csrf.allowed_origins(request.getHeader("host"),
                                    request_is_https(request, self.public_url), self.public_url)

    def check_origin(self, request: Any) -> None:
        if not csrf.origin_allowed(request.getHeader("origin"), request.getHeader("referer"),
                                   self.allowed_origins(request)):
            raise ApiError(403, "csrf_origin", "Cross-origin request refused: the Origin is not "
                                               "this daemon's origin or server.public_url")

    def check_csrf(self, request: Any, csrf_hash: str) -> None:
        self.check_origin(request)
        if not csrf.token_matches(request.getHeader(CSRF_HEADER), cookie(request, CSRF_COOKIE),
                                  csrf_hash):
            raise ApiError(403, "csrf_failed", f"Missing or invalid {CSRF_HEADER} header; it must "
                                               f"equal the {CSRF_COOKIE} cookie set at login")

    # -- cookies -----------------------------------------------------------------

    def set_cookies(self, request: Any, session: users.NewSession) -> None:
        secure = request_is_https(request, self.public_url)
        max_age = str(int(self.ttl))
        request.addCookie(SESSION_COOKIE, session.token, path="/", httpOnly=True, secure=secure,
                          sameSite="strict", max_age=max_age)
        request.addCookie(CSRF_COOKIE, session.csrf, path="/", httpOnly=False, secure=secure,
                          sameSite="strict", max_age=max_age)

    def clear_cookies(self, request: Any) -> None:
        secure = request_is_https(request, self.public_url)
        for name, http_only in ((SESSION_COOKIE, True), (CSRF_COOKIE, False)):
            request.addCookie(name, "", path="/", httpOnly=http_only, secure=secure,
                              sameSite="strict", max_age="0",
                              expires="Thu, 01 Jan 1970 00:00:00 GMT")

    # -- expiry ------------------------------------------------------------------

    async def sweep(self) -> int:
        removed = await self.db.run_write(users.sweep_sessions, self.clock.seconds())
        self.swept += removed
        if removed:
            log.info("Removed {count} expired session(s)", count=removed)
        return removed

