"""CSRF rules for cookie-authenticated requests (pure; S12).

Double submit: the login sets ``st_csrf`` (readable by the console's
JavaScript) next to the HttpOnly ``st_session`` cookie; a state-changing
request authenticated by the session must carry ``X-CSRF-Token`` equal to
that cookie, and the token must be the one issued with this session (its
hash is stored with the session, so a cookie planted by a sibling site does
not help).  Its ``Origin`` (or, lacking one, its ``Referer``) must be the
daemon's own origin or ``server.public_url``'s.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Iterable, Optional
from urllib.parse import urlsplit

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> Optional[str]:
    """``scheme://host[:port]`` normalised (lower case, default port
    dropped), or None for anything that is not an http(s) URL."""
    try:
        parts = urlsplit(url.strip())
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").lower()
        port = parts.port
    except (ValueError, AttributeError):
        return None
    if scheme not in _DEFAULT_PORTS or not host:
        return None
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def allowed_origins(host_header: Optional[str], secure: bool, public_url: str = "") -> set[str]:
    """The daemon's own origin as the request reached it, plus the public URL's."""
    out = set()
    if host_header:
        own = origin_of(f"{'https' if secure else 'http'}://{host_header}")
        if own:
            out.add(own)
    if public_url:
        public = origin_of(public_url)
        if public:
            out.add(public)
    return out


def origin_allowed(origin: Optional[str], referer: Optional[str], allowed: Iterable[str]) -> bool:
    """True when the request's Origin (else Referer) is one of ``allowed``.

    A request with neither header is not a browser's cross-site request (every
    current browser sends Origin on cross-origin state-changing requests) and
    is left to the token check."""
    allowed = set(allowed)
    if origin is not None and origin != "":
        if origin == "null":
            return False
        return origin_of(origin) in allowed
    if referer:
        return origin_of(referer) in allowed
    return True


def token_matches(header_token: Optional[str], cookie_token: Optional[str],
                  session_csrf_hash: str) -> bool:
    """Header equals cookie, and both are the token issued with this session."""
    if not header_token or not cookie_token or len(header_token) > 200:
        return False
    if not hmac.compare_digest(header_token.encode(), cookie_token.encode()):
        return False
    digest = hashlib.sha256(header_token.encode("utf-8")).hexdigest()
    return hmac.compare_digest(digest, session_csrf_hash)
