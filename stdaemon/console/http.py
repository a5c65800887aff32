"""The web console (S15): static files from ``stdaemon/console/web`` at ``/``,
``/console/`` and ``/static/<name>``.

Public (the page itself holds nothing secret; every API call it makes is
authenticated), never rate limited, and served with a strict
Content-Security-Policy: scripts, styles and connections from this origin
only, no inline code, no framing.  The files are small and read once when the
surface is built, so serving them never touches the disk.
"""

from __future__ import annotations

import hashlib
import os

from klein import Klein

from stdaemon.http.errors import not_found
from stdaemon.http.surface import PUBLIC, Response, Surface, route

WEB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web")

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; "
       "base-uri 'none'")

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Permissions-Policy": "camera=(), microphone=(), geolocation=()",
}


def load_files(directory: str = WEB_DIR) -> dict[str, tuple[bytes, str, str]]:
    """``name → (body, content type, etag)`` for every servable file."""
    files = {}
    for name in sorted(os.listdir(directory)):
        ext = os.path.splitext(name)[1]
        path = os.path.join(directory, name)
        if ext not in CONTENT_TYPES or not os.path.isfile(path):
            continue
        with open(path, "rb") as handle:
            body = handle.read()
        files[name] = (body, CONTENT_TYPES[ext], '"' + hashlib.sha256(body).hexdigest()[:32] + '"')
    return files


class ConsoleSurface(Surface):
    app = Klein()
    prefixes = ("/console", "/static")

    def __init__(self, ctx):
        super().__init__(ctx)
        self.files = load_files()

    def _serve(self, request, name: str) -> Response:
        entry = self.files.get(name)
        if entry is None:
            raise not_found(f"No console file {name}")
        body, content_type, etag = entry
        headers = dict(SECURITY_HEADERS)
        headers["Cache-Control"] = "no-cache"
        headers["ETag"] = etag
        if request.getHeader("if-none-match") == etag:
            return Response(b"", status=304, headers=headers)
        return Response(body, headers=headers, content_type=content_type)

    @route(app, "/", access=PUBLIC, rate_limited=False, produces=("text/html",))
    def index(self, request):
        return self._serve(request, "index.html")

    @route(app, "/console", access=PUBLIC, rate_limited=False, produces=("text/html",))
    def console_bare(self, request):
        return Response(b"", status=301, headers={"Location": "/console/"})

    @route(app, "/console/", access=PUBLIC, rate_limited=False, produces=("text/html",))
    def console(self, request):
        return self._serve(request, "index.html")

    @route(app, "/static/<name>", access=PUBLIC, rate_limited=False,
           produces=tuple(sorted({t.split(";")[0] for t in CONTENT_TYPES.values()})))
    def static(self, request, name):
        if name == "index.html":
            raise not_found(f"No console file {name}")
        return self._serve(request, name)
