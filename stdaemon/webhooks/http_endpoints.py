"""The webhook endpoints as SimpleTuner's ``simpletuner webhooks …`` sees them.

stdaemon receives webhooks (one endpoint per provider, ``POST
/api/webhooks/{provider}``, see :mod:`stdaemon.webhooks.http`); it does not
send them to user-defined URLs.  The CLI's read commands therefore describe
the receiving side, from the same settings and the same delivery records the
webhook surface uses (admin only):

- ``GET /api/webhooks`` and ``GET /api/webhooks/{id}`` (``id`` is the
  provider's position, 1 = replicate, or its name): URL, events, whether a
  signature is required and a secret is known, allowed IPs, last delivery;
- ``GET /api/webhooks/history`` and ``/api/webhooks/{id}/history``: the
  recorded deliveries (``webhook_deliveries``, kept 7 days), newest first;
- ``GET /api/webhooks/events``: the payloads the endpoints accept.

Creating, changing, deleting or test-firing outgoing webhooks answers 409
``not_supported`` with a detail saying so (the CLI prints it).
"""

from __future__ import annotations

from typing import Any, Optional

from klein import Klein
from pydantic import Field

from stdaemon.providers.replicate import DEFAULT_WEBHOOK_EVENTS
from stdaemon.providers import settings as ps
from stdaemon.timestamps import iso
from stdaemon.http.errors import ApiError, not_found
from stdaemon.http.surface import ADMIN, Surface, route
from stdaemon.http.validation import QueryModel
from stdaemon.webhooks import store
from stdaemon.webhooks.service import secret_name

NOT_SUPPORTED = ("stdaemon receives provider webhooks (POST /api/webhooks/<provider>) and does not send "
                 "webhooks to other URLs; configure the receiving side with PUT "
                 "/api/cloud/providers/<provider> (webhook_url, webhook_allowed_ips, "
                 "webhook_require_signature).")

EVENTS = [
    {"name": "prediction.start", "description": "Replicate: the prediction started"},
    {"name": "prediction.output", "description": "Replicate: the prediction produced output"},
    {"name": "prediction.logs", "description": "Replicate: new log lines"},
    {"name": "prediction.completed",
     "description": "Replicate: succeeded, failed or canceled (status, cost, output URL, error)"},
    {"name": "trainer.event", "description": "SimpleTuner trainer event (job_id, type, data.status)"},
]


class HistoryQuery(QueryModel):
    limit: int = Field(20, ge=1, le=1000)


def _deliveries(conn: Any, provider: Optional[str], limit: int) -> list[dict]:
    rows = store.deliveries(conn, provider, limit)
    return [{"timestamp": iso(r[2]), "webhook_id": ps.PROVIDERS.index(r[0]) + 1 if r[0] in ps.PROVIDERS else None,
             "provider": r[0], "delivery_id": r[1], "job_id": r[3], "outcome": r[4],
             # Only accepted deliveries are recorded (each was answered 200);
             # ``outcome`` says what it did to the job.
             "event_type": "prediction", "success": True, "response_status": 200} for r in rows]


class WebhookEndpointsSurface(Surface):
    app = Klein()
    prefixes = ("/api/webhooks",)

    def _provider(self, webhook_id: str) -> str:
        if webhook_id in ps.PROVIDERS:
            return webhook_id
        if webhook_id.isdigit() and 0 < int(webhook_id) <= len(ps.PROVIDERS):
            return ps.PROVIDERS[int(webhook_id) - 1]
        raise not_found(f"No webhook endpoint {webhook_id[:40]!r} (known: "
                        + ", ".join(f"{i} = {p}" for i, p in enumerate(ps.PROVIDERS, start=1)) + ")")

    async def _describe(self, provider: str) -> dict:
        values = self.ctx.providers.values(provider)
        public_url = (self.ctx.config.server.public_url or "").rstrip("/")
        url = values.get("webhook_url") or (f"{public_url}/api/webhooks/{provider}" if public_url
                                            else f"/api/webhooks/{provider}")
        has_secret = bool(self.ctx.secrets.known(secret_name(provider)))
        last = await self.ctx.db.run_read(store.last_delivery, provider)
        return {
            "id": ps.PROVIDERS.index(provider) + 1,
            "name": provider,
            "url": url,
            "events": list(DEFAULT_WEBHOOK_EVENTS),
            "enabled": True,
            "direction": "incoming",
            "require_signature": bool(values.get("webhook_require_signature", True)),
            "has_secret": has_secret,
            "allowed_ips": list(values.get("webhook_allowed_ips") or []),
            "created_at": None,
            "last_triggered": iso(last),
        }

    @route(app, "/api/webhooks", access=ADMIN)
    async def list_endpoints(self, request):
        """The webhook endpoints stdaemon receives on (one per provider)."""
        return {"webhooks": [await self._describe(p) for p in ps.PROVIDERS]}

    @route(app, "/api/webhooks/events", access=ADMIN)
    async def events(self, request):
        """The payloads the webhook endpoints accept."""
        return {"events": EVENTS}

    @route(app, "/api/webhooks/history", access=ADMIN, query=HistoryQuery)
    async def history(self, request, query: HistoryQuery):
        """Recorded webhook deliveries, newest first."""
        return {"deliveries": await self.ctx.db.run_read(_deliveries, None, query.limit)}

    @route(app, "/api/webhooks/<webhook_id>", access=ADMIN)
    async def get_endpoint(self, request, webhook_id):
        """One webhook endpoint (1 = replicate, or the provider's name)."""
        return await self._describe(self._provider(webhook_id))

    @route(app, "/api/webhooks/<webhook_id>/history", access=ADMIN, query=HistoryQuery)
    async def endpoint_history(self, request, webhook_id, query: HistoryQuery):
        """Recorded deliveries of one endpoint, newest first."""
        provider = self._provider(webhook_id)
        return {"deliveries": await self.ctx.db.run_read(_deliveries, provider, query.limit)}

    @route(app, "/api/webhooks", methods=("POST",), access=ADMIN)
    async def create(self, request):
        """Refused: stdaemon sends no webhooks."""
        raise ApiError(409, "not_supported", NOT_SUPPORTED)

    @route(app, "/api/webhooks/<webhook_id>", methods=("PATCH", "PUT", "DELETE"), access=ADMIN)
    async def change(self, request, webhook_id):
        """Refused: stdaemon sends no webhooks."""
        raise ApiError(409, "not_supported", NOT_SUPPORTED)

    @route(app, "/api/webhooks/<webhook_id>/test", methods=("POST",), access=ADMIN)
    async def test(self, request, webhook_id):
        """Refused: stdaemon sends no webhooks."""
        raise ApiError(409, "not_supported", NOT_SUPPORTED)
