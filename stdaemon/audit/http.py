"""The audit log over HTTP (S7): list with filters and paging, verify the chain.

``GET /api/audit?event_type=&actor=&actor_id=&target_type=&target_id=&since=&until=&limit=&offset=``
answers ``{"entries": [...newest first...], "total": n, "limit", "offset",
"has_more"}`` where ``total`` is the real number of matching entries.  Each
entry has the stored columns with ``details`` decoded and ``timestamp`` as
ISO 8601 UTC with milliseconds (S18; ``time`` is the same value), plus the
names SimpleTuner's CLI reads: ``actor_username`` (the actor), ``actor_id``
(the user id when the actor is a user), ``actor_ip`` (the ip),
``target_type``/``target_id`` (``target`` split at its first ``:``).
``since``/``until`` are POSIX seconds or ISO 8601 times (UTC when no offset
is given).

``GET /api/audit/verify`` walks the whole chain (in batches on reader
threads) and answers ``{"valid", "checked", "first_broken_id", "reason",
"anchor", "entries"}`` and the CLI's ``entries_checked``, ``first_id``,
``last_id``, ``broken_links``.  The CLI's ``start_id``/``end_id`` are
accepted; the whole chain is always checked (a link can only be trusted
from the start).

``GET /api/audit/stats``, ``GET /api/audit/types``,
``GET /api/audit/user/{id}`` (entries by or about that user) and
``GET /api/audit/security`` (authentication, keys, users, rejections) are the
CLI's ``auth audit`` commands.  All are for operators and admins.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Optional

from klein import Klein
from pydantic import Field

from stdaemon.timestamps import iso
from stdaemon.http.errors import bad_request, not_found
from stdaemon.http.surface import OPERATOR, Surface, path_id, route
from stdaemon.http.validation import SQLITE_MAX_INT, QueryModel
from stdaemon.users import store as users_store
from stdaemon.audit import store as audit_store
from stdaemon.audit.chain import EVENT_TYPES

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100

# Event types ``GET /api/audit/security`` shows.
SECURITY_PREFIXES = ("auth.", "api_key.", "user.", "webhook_rejected", "rate_limited",
                     "upload.denied", "provider.configured", "backup.restored")


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
            raise bad_request(f"{name}: must be POSIX seconds or an ISO 8601 time",
                              code="invalid_query", field=name) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        value = moment.timestamp()
    if not math.isfinite(value):
        raise bad_request(f"{name}: must be a finite time", code="invalid_query", field=name)
    return value


# -- request models (stdaemon.http.validation) -----------------------------------------------

class Paging(QueryModel):
    limit: int = Field(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    offset: int = Field(0, ge=0, le=SQLITE_MAX_INT)


class AuditQuery(Paging):
    event_type: Optional[str] = Field(None, max_length=512)
    actor: Optional[str] = Field(None, max_length=512)
    actor_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)
    target_type: Optional[str] = Field(None, max_length=512)
    target_id: Optional[str] = Field(None, max_length=512)
    since: Optional[str] = Field(None, max_length=64, description="POSIX seconds or ISO 8601")
    until: Optional[str] = Field(None, max_length=64, description="POSIX seconds or ISO 8601")


class VerifyQuery(QueryModel):
    # Accepted (SimpleTuner's CLI sends them); the whole chain is always checked.
    start_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)
    end_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)


def public_entry(entry: dict, user_ids: dict) -> dict:
    """One entry as the API shows it (S7 columns + the CLI's names, ISO time)."""
    out = dict(entry)
    out["timestamp"] = out["time"] = iso(entry["timestamp"])
    out["action"] = entry.get("action") or ""
    out["actor_username"] = entry.get("actor")
    out["actor_id"] = user_ids.get(entry.get("actor"))
    out["actor_ip"] = entry.get("ip")
    target = entry.get("target")
    if isinstance(target, str) and ":" in target:
        out["target_type"], out["target_id"] = target.split(":", 1)
    else:
        out["target_type"], out["target_id"] = None, target
    return out


class AuditSurface(Surface):
    app = Klein()
    prefixes = ("/api/audit",)

    async def _page(self, limit: int, offset: int, **filters: Any) -> dict:
        def read(conn: Any) -> dict:
            page = audit_store.query_entries(conn, limit=limit, offset=offset, **filters)
            ids = users_store.ids_by_username(conn, {e["actor"] for e in page["entries"] if e.get("actor")})
            page["entries"] = [public_entry(e, ids) for e in page["entries"]]
            page["has_more"] = offset + len(page["entries"]) < page["total"]
            return page

        return await self.ctx.db.run_read(read)

    @route(app, "/api/audit", access=OPERATOR, query=AuditQuery)
    async def list_entries(self, request: Any, query: AuditQuery) -> dict:
        """Audit entries, newest first, with the real total."""
        event_type, actor, target_type, target_id = query.event_type, query.actor, query.target_type, \
            query.target_id
        since = parse_time("since", query.since)
        until = parse_time("until", query.until)
        if since is not None and until is not None and since > until:
            raise bad_request("since must not be after until", code="invalid_query")
        limit, offset = query.limit, query.offset
        actor_id = query.actor_id
        if actor_id is not None:
            name = await self.ctx.db.run_read(users_store.username_of, actor_id)
            if name is None or (actor is not None and actor != name):
                return {"entries": [], "total": 0, "limit": limit, "offset": offset, "has_more": False}
            actor = name
        target = None
        if target_id is not None:
            target = f"{target_type}:{target_id}" if target_type else target_id
        elif target_type is not None:
            raise bad_request("target_type needs target_id", code="invalid_query")
        return await self._page(limit, offset, event_type=event_type, actor=actor, since=since,
                                until=until, target=target)

    @route(app, "/api/audit/user/<user_id>", access=OPERATOR, query=Paging)
    async def user_entries(self, request: Any, user_id: str, query: Paging) -> dict:
        """Entries by or about one user."""
        uid = path_id(user_id, "User")
        name = await self.ctx.db.run_read(users_store.username_of, uid)
        if name is None:
            raise not_found(f"User {user_id} not found")
        return await self._page(query.limit, query.offset, actor_or_target=(name, f"user:{uid}"))

    @route(app, "/api/audit/security", access=OPERATOR, query=Paging)
    async def security_entries(self, request: Any, query: Paging) -> dict:
        """Security-related entries (authentication, keys, users, rejections)."""
        limit, offset = query.limit, query.offset
        seen = await self.ctx.audit.seen_event_types()
        types = sorted(t for t in set(seen) | set(EVENT_TYPES)
                       if t.startswith(SECURITY_PREFIXES))
        return await self._page(limit, offset, event_types=types)

    @route(app, "/api/audit/stats", access=OPERATOR)
    async def stats(self, request: Any) -> dict:
        """Entry counts by type and the first/last entries."""
        audit = self.ctx.audit
        summary = await audit.summary()
        return {
            "total_entries": sum(summary["by_type"].values()),
            "by_type": summary["by_type"],
            "last_24h": audit.count_last_24h(),
            "first_entry": iso(summary["first_timestamp"]),
            "last_entry": iso(summary["last_timestamp"]),
            "first_id": summary["first_id"],
            "last_id": summary["last_id"],
        }

    @route(app, "/api/audit/types", access=OPERATOR)
    async def types(self, request: Any) -> dict:
        """Event types known or seen."""
        seen = await self.ctx.audit.seen_event_types()
        names = sorted(set(EVENT_TYPES) | set(seen))
        return {"event_types": [{"value": value, "name": value.upper().replace(".", "_")}
                                for value in names]}

    @route(app, "/api/audit/verify", access=OPERATOR, query=VerifyQuery)
    async def verify(self, request: Any, query: VerifyQuery) -> dict:
        """Verify the audit hash chain."""
        result = await self.ctx.audit.verify()
        summary = await self.ctx.audit.summary()
        result["entries_checked"] = result["checked"]
        result["first_id"] = summary["first_id"]
        result["last_id"] = summary["last_id"]
        result["broken_links"] = ([{"id": result["first_broken_id"], "reason": result["reason"]}]
                                  if not result["valid"] else [])
        return result
