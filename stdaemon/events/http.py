"""``GET /api/events/stream``: Server-Sent Events of job changes (S4).

Authenticated (viewer and up; a browser's EventSource sends the session
cookie), never rate limited (S11), bounded per user (429 beyond
``ctx.events.max_per_user``), resumable with ``Last-Event-ID`` (header, or
``?last_event_id=`` for clients that cannot set headers).  Each caller only
receives jobs they may see (``stdaemon.events.service.can_see_job``).

The handler stays suspended until the stream ends (client gone or daemon
draining): Klein finishes a request when its handler returns.
"""

from __future__ import annotations

from typing import Optional

from klein import Klein
from pydantic import Field
from twisted.web.server import NOT_DONE_YET

from stdaemon.events.service import TooManyStreams
from stdaemon.http.errors import ApiError
from stdaemon.http.surface import VIEWER, Surface, route
from stdaemon.http.validation import QueryModel


class StreamQuery(QueryModel):
    last_event_id: Optional[str] = Field(None, max_length=64)


class EventsSurface(Surface):
    app = Klein()
    prefixes = ("/api/events",)

    @route(app, "/api/events/stream", access=VIEWER, rate_limited=False, query=StreamQuery, stream=True,
           produces=("text/event-stream",))
    async def stream(self, request, query: StreamQuery):
        """Server-Sent Events of job changes the caller may see (HEAD: headers only, see ``stream``)."""
        bus = self.ctx.events
        last_id = request.getHeader("last-event-id") or query.last_event_id
        if last_id is not None and len(last_id) > 64:
            last_id = None
        try:
            stream = bus.open(request, request.principal, last_id)
        except TooManyStreams:
            raise ApiError(429, "too_many_streams",
                           f"At most {bus.max_per_user} event streams per user are allowed",
                           headers={"Retry-After": "5"}) from None
        await stream.closed
        return NOT_DONE_YET
