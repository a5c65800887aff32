"""The bare peer of the small-GET benchmark: plain ``twisted.web`` resources doing the
same work as stdaemon's routes and nothing else (no routing table, middleware,
authentication, metrics or correlation ids), i.e. the framework limit.

* ``GET /live``         → ``{"status": "ok"}`` (as ``/api/cloud/health/live``);
* ``GET /jobs/<id>``    → the job row read from the daemon's SQLite database on a
  thread (one connection per thread, like the daemon's readers) as JSON, 404 when absent;
* ``GET /klein/live``   → the same JSON from a bare Klein route (the "minimal Klein app");
* ``GET /keyjob/<id>``  → with ``--job-body FILE --key-hash HEX``: checks ``X-API-Key`` (SHA-256
  against the hash, constant-time compare; 401 otherwise) and answers the bytes of stdaemon's own
  answer to ``GET /api/cloud/jobs/<id>`` (the job-GET peer: authentication and the same bytes,
  nothing else);
* ``GET /ready``        → 200 once listening (start-to-serving time).

Usage: ``python -m bench.peer --port N [--db PATH] [--job-body FILE --key-hash HEX]``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import sqlite3
import threading

from klein import Klein
from twisted.internet import reactor, threads
from twisted.web import resource, server

LIVE = json.dumps({"status": "ok"}).encode()


def _json(request, body: bytes, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return body


class Live(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        return _json(request, LIVE)


class Jobs(resource.Resource):
    isLeaf = True

    def __init__(self, db: str | None):
        super().__init__()
        self.db = db
        self.local = threading.local()

    def _read(self, job_id: str):
        conn = getattr(self.local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            self.local.conn = conn
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        return dict(row) if row is not None else None

    def render_GET(self, request):
        job_id = b"/".join(request.postpath).decode("utf-8", "replace")
        if not self.db:
            return _json(request, b'{"error": "no_database"}', 404)

        def done(row):
            if row is None:
                request.write(_json(request, json.dumps({"error": "not_found"}).encode(), 404))
            else:
                request.write(_json(request, json.dumps({"job": row}).encode()))
            request.finish()

        def failed(failure):
            request.setResponseCode(500)
            request.finish()

        threads.deferToThread(self._read, job_id).addCallbacks(done, failed)
        return server.NOT_DONE_YET


class KeyJob(resource.Resource):
    """Checks the API key and answers fixed bytes: the framework limit of an authenticated GET."""

    isLeaf = True

    def __init__(self, body: bytes, key_hash: str):
        super().__init__()
        self.body = body
        self.key_hash = key_hash.encode()

    def render_GET(self, request):
        key = request.getHeader(b"x-api-key") or b""
        if not hmac.compare_digest(hashlib.sha256(key).hexdigest().encode(), self.key_hash):
            return _json(request, b'{"error":"unauthorized"}', 401)
        return _json(request, self.body)


klein_app = Klein()


@klein_app.route("/live")
def klein_live(request):
    request.setHeader(b"content-type", b"application/json")
    return LIVE


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--db", default=None)
    parser.add_argument("--job-body", default=None, help="file with stdaemon's job GET answer")
    parser.add_argument("--key-hash", default=None, help="SHA-256 hex of the accepted X-API-Key")
    args = parser.parse_args()
    root = resource.Resource()
    root.putChild(b"live", Live())
    root.putChild(b"ready", Live())
    root.putChild(b"jobs", Jobs(args.db))
    root.putChild(b"klein", klein_app.resource())
    if args.job_body and args.key_hash:
        with open(args.job_body, "rb") as fh:
            root.putChild(b"keyjob", KeyJob(fh.read(), args.key_hash))
    site = server.Site(root)
    site.displayTracebacks = False
    reactor.listenTCP(args.port, site, interface="127.0.0.1")
    reactor.run()


if __name__ == "__main__":
    main()
