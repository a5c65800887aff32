"""Checks Schemathesis runs on every response of the fuzz test (loaded with SCHEMATHESIS_HOOKS).

Schemathesis' own checks cover 5xx, status codes, content types and response schemas; these add
what stdaemon promises beyond the document (S0, S19)."""

from __future__ import annotations

import json

import schemathesis

TRACE_MARKERS = (b"Traceback (most recent call last)", b'File "/', b"twisted.python.failure",
                 b"<title>Processing Failed</title>")


@schemathesis.check
def no_traceback_text(ctx, response, case):
    """No answer ever shows a traceback or Twisted's HTML error page."""
    body = response.content or b""
    for marker in TRACE_MARKERS:
        if marker in body:
            raise AssertionError(f"traceback text in the answer: {marker!r}")


@schemathesis.check
def json_error_bodies(ctx, response, case):
    """Every 4xx/5xx outside the S3 surface is JSON with ``error`` and ``detail``."""
    if response.status_code < 400 or case.path.startswith("/api/cloud/storage"):
        return
    content_type = response.headers.get("content-type", [""])
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if not content_type.startswith("application/json"):
        raise AssertionError(f"{response.status_code} answered as {content_type!r}, not JSON")
    try:
        body = json.loads(response.content or b"")
    except ValueError:
        raise AssertionError("error body is not JSON") from None
    if not isinstance(body, dict) or not body.get("error") or not isinstance(body.get("detail"), str):
        raise AssertionError(f"error body without error/detail: {str(body)[:200]}")


@schemathesis.hook
def map_body(ctx, body):
    """A generated backup path could name any writable place on this machine (tests run as root):
    fuzz backups into the daemon's own backup directory."""
    operation = getattr(ctx, "operation", None)
    if operation is not None and operation.path == "/api/admin/backups" and isinstance(body, dict):
        body.pop("path", None)
    return body
