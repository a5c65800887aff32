"""The audit log over HTTP (S7): list with filters and paging, verify the chain.

``GET /api/audit?event_type=&actor=&since=&until=&limit=&offset=`` answers
``{"entries": [...newest first...], "total": n, "limit", "offset"}`` (each entry
has every stored column, ``details`` decoded, plus ``time`` in ISO 8601) where
``total`` is the real number of matching entries.  ``since``/``until`` are
POSIX seconds or ISO 8601 times (UTC when no offset is given).

``GET /api/audit/verify`` walks the whole chain (in batches on reader
threads) and answers ``{"valid", "checked", "first_broken_id", "reason",
"anchor", "entries"}``.

Both are for operators and admins.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Optional

from klein import Klein

from stdaemon.http.errors import ApiError, bad_request
from stdaemon.http.surface import OPERATOR, Surface, query_arg, query_int, route

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def parse_time(name: str, raw: Optional[str]) -> Optional[float]:
    """POSIX seconds or ISO 8601 → seconds; a 400 naming the parameter otherwise."""
    if raw is None or raw.strip() == "":
        return None
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise bad_request(f"{name} must be POSIX seconds or an ISO 8601 time",
                              code="invalid_query") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        value = moment.timestamp()
    if not math.isfinite(value):
        raise bad_request(f"{name} must be a finite time", code="invalid_query")
    return value


class AuditSurface(Surface):
    app = Klein()
    prefixes = ("/api/audit",)

    def _log(self) -> Any:
        audit = getattr(self.ctx, "audit", None)
        if audit is None:
            raise ApiError(503, "audit_unavailable", "The audit log is not installed")
        return audit

    @route(app, "/api/audit", access=OPERATOR)
    async def list_entries(self, request: Any) -> dict:
        event_type = query_arg(request, "event_type") or None
        actor = query_arg(request, "actor") or None
        since = parse_time("since", query_arg(request, "since"))
        until = parse_time("until", query_arg(request, "until"))
        if since is not None and until is not None and since > until:
            raise bad_request("since must not be after until", code="invalid_query")
        limit = query_int(request, "limit", DEFAULT_LIMIT, minimum=1, maximum=MAX_LIMIT)
        offset = query_int(request, "offset", 0, minimum=0, maximum=2**62)
        for name, value in (("event_type", event_type), ("actor", actor)):
            if value is not None and len(value) > 512:
                raise bad_request(f"{name} is too long", code="invalid_query")
        page = await self._log().query(event_type=event_type, actor=actor, since=since,
                                       until=until, limit=limit, offset=offset)
        for entry in page["entries"]:
            entry["time"] = datetime.fromtimestamp(entry["timestamp"], tz=timezone.utc).isoformat()
        return page

    @route(app, "/api/audit/verify", access=OPERATOR)
    async def verify(self, request: Any) -> dict:
        return await self._log().verify()
