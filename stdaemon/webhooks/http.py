"""Provider webhooks (S6): ``POST /api/webhooks/{provider}``.

Order of checks for every delivery (body capped at 1 MiB by the root, 413):

1. unknown provider → 404;
2. allowlist: the provider's effective ``webhook_allowed_ips`` (unset or
   ``[]`` = everyone) against ``request.client_ip`` (derived once by the root
   from the peer and, behind ``server.trusted_proxies`` only, the forwarding
   headers) → 403 ``ip_not_allowed``;
3. signature (when ``webhook_require_signature``, the default): Standard
   Webhooks (``stdaemon/webhooks/signature.py``), secret
   ``<PROVIDER>_WEBHOOK_SECRET`` from ``app.secrets`` or, for Replicate,
   fetched once from ``GET /v1/webhooks/default/secret`` and cached (fetched
   again, at most once a minute, when a signature does not match: the secret
   may have been rotated) → 401 ``invalid_signature`` with the reason; 503
   when no secret can be obtained (the provider retries);
4. body not JSON / not an object → 400; neither payload shape → 400;
5. one write transaction: replay check on ``webhook-id`` (table
   ``webhook_deliveries``), the job change through the one job-update path
   shared with the poller (mapping and guards in
   ``stdaemon/jobs/updates.py``; ``app.jobs.write_update`` writes it,
   revokes the job's upload credentials on a terminal status and appends the
   ``job.status_changed`` audit entry), the delivery row -- then
   ``app.jobs.committed`` (counters, metrics figures, live event) and only
   then 200;
6. a job we do not know → 202 ``{"status": "ignored"}`` (not recorded, so a
   retry after the submission committed still applies; the poller catches
   up either way); a replayed ``webhook-id`` → 200 ``duplicate``, nothing
   reapplied.

SimpleTuner trainer events (its ``WebhookHandler`` raw events, sent by the
trainer running the job) are authenticated per job instead of by Replicate's
signature: at dispatch each job gets a random webhook token (only its SHA-256
is kept, in the job's private metadata) handed to the trainer in the
prediction input ``webhook_config`` as the raw webhook's ``auth_token``; the
trainer sends it as ``X-API-Key`` (or ``Authorization: Bearer``).  Such events
go to ``/api/webhooks/simpletuner``, or to the provider path without Standard
Webhooks headers; a Replicate delivery still needs its signature.  A wrong or
missing token is 401 (audited like other rejections); the job must be the
one the token was issued for.

Rejections (2, 3) are audited as ``webhook_rejected`` through
``app.audit.sampled`` (bounded under a flood) with ip, provider and reason.
Delivery rows older than 7 days are swept hourly (a replay that old fails
the ±300 s timestamp check anyway).

This module parses deliveries; settings, secrets, the apply transaction, the replay memory and
the counters are :class:`stdaemon.webhooks.service.WebhookService` (``app.webhooks``).
"""

from __future__ import annotations

import ipaddress
from typing import Any, Optional

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.http import validation
from stdaemon.http.client_ip import in_networks, parse_ip
from stdaemon.http.errors import ApiError, bad_request, not_found
from stdaemon.http.surface import PUBLIC, Surface, route
from stdaemon.jobs import updates as job_updates
from stdaemon.providers.settings import PROVIDERS
from stdaemon.webhooks import signature as ws
from stdaemon.webhooks.service import WebhookService, token_hash

MAX_WEBHOOK_BODY = 1024 * 1024
# The path SimpleTuner's trainer posts its own events to (token-authenticated).
TRAINER_PATH = "simpletuner"


def presented_token(request: Any) -> Optional[str]:
    """The per-job token from ``X-API-Key`` or ``Authorization: Bearer``."""
    value = request.getHeader("x-api-key")
    if not value:
        auth = request.getHeader("authorization") or ""
        scheme, _, rest = auth.partition(" ")
        value = rest.strip() if scheme.lower() == "bearer" else ""
    value = (value or "").strip()
    return value if value and len(value) <= 512 else None


def allowed(client_ip: str, allowlist: Any) -> bool:
    """Is ``client_ip`` inside the allowlist (empty/unset = everyone)?"""
    if not allowlist:
        return True
    networks = []
    for item in allowlist:
        try:
            networks.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError:
            continue  # validated on save; an unreadable entry admits nobody
    return in_networks(parse_ip(client_ip), networks)


# The mapping lives in stdaemon/jobs/updates.py (shared with the poller).
classify = job_updates.classify


# -- request models (stdaemon.http.validation) -----------------------------------------------

class WebhookPayload(validation.BodyModel):
    """A Replicate prediction (``id``, ``status``, ``metrics``, ``output``, ``error``, ``logs``) or a
    SimpleTuner trainer event (``job_id``, ``type``, ``data``). Validated after the signature; the
    meaning of each field is :mod:`stdaemon.jobs.updates`' (which tolerates odd values)."""

    model_config = ConfigDict(extra="allow", strict=False)

    id: Any = Field(None, description="Replicate prediction id")
    status: Any = None
    job_id: Any = Field(None, description="SimpleTuner job id (trainer events)")
    type: Any = None
    data: Any = None
    metrics: Any = None
    output: Any = None
    error: Any = None
    logs: Any = None


class WebhooksSurface(Surface):
    app = Klein()
    prefixes = ("/api/webhooks",)
    max_body = MAX_WEBHOOK_BODY

    @property
    def webhooks(self) -> WebhookService:
        return self.ctx.webhooks

    async def _reject(self, request: Any, provider: str, status: int, code: str, reason: str,
                      detail: str) -> None:
        await self.webhooks.reject(getattr(request, "client_ip", None), provider, status, code, reason,
                                   detail)

    # -- the endpoint ---------------------------------------------------------------------

    @route(app, "/api/webhooks/<provider>", methods=("POST",), access=PUBLIC,
           max_body=MAX_WEBHOOK_BODY, body=WebhookPayload, signed_body=True)
    async def receive(self, request: Any, provider: str) -> Any:
        """A provider's status webhook (IP allowlist, Standard Webhooks signature) or a trainer event."""
        trainer_path = provider == TRAINER_PATH
        if provider not in PROVIDERS and not trainer_path:
            raise not_found(f"No webhook endpoint for provider {provider[:64]!r}")
        self.webhooks.counters["received"] += 1
        if self.ctx.health.phase == "starting":
            # Settings, secrets and the audit key are still loading; the
            # provider retries non-2xx deliveries.
            raise ApiError(503, "not_ready", "stdaemon is starting; retry shortly",
                           headers={"Retry-After": "5"})
        headers = self._signature_headers(request)
        token = presented_token(request)
        if trainer_path or (token is not None and not headers and self._is_trainer_event(request)):
            return await self._receive_trainer(request, "replicate" if trainer_path else provider, token,
                                               provider)
        settings = self.webhooks.settings(provider)
        client_ip = getattr(request, "client_ip", None) or ""
        if not allowed(client_ip, settings.get("webhook_allowed_ips")):
            self.webhooks.counters["rejected_ip"] += 1
            await self._reject(request, provider, 403, "forbidden", "ip_not_allowed",
                               "This address may not deliver webhooks")
        request.content.seek(0)
        body = request.content.read()
        webhook_id = headers.get("webhook-id") or None
        if settings.get("webhook_require_signature", True):
            verification = await self.webhooks.verify(provider, headers, body)
            if verification is None:
                raise ApiError(503, "webhook_secret_unavailable",
                               "The webhook secret is not available yet; retry later",
                               headers={"Retry-After": "30"})
            if not verification.valid:
                self.webhooks.counters["rejected_signature"] += 1
                await self._reject(request, provider, 401, "invalid_signature", verification.reason,
                                   f"Webhook signature refused: {verification.reason}")
            webhook_id = verification.webhook_id
        try:
            payload = validation.validate_raw(body, WebhookPayload).given()
        except ApiError:
            self.webhooks.counters["invalid"] += 1
            raise
        kind = classify(payload)
        if kind is None:
            self.webhooks.counters["invalid"] += 1
            raise bad_request("Neither a Replicate prediction (id, status) nor a SimpleTuner "
                              "trainer event (job_id, type, data)", code="invalid_payload")
        if webhook_id is not None and len(webhook_id) > ws.MAX_ID:
            webhook_id = webhook_id[:ws.MAX_ID]
        outcome = await self.webhooks.deliver(provider, kind, payload, webhook_id, client_ip,
                                              settings.get("gpu_prices") or {})
        return self.webhooks.respond(provider, outcome)

    @staticmethod
    def _is_trainer_event(request: Any) -> bool:
        request.content.seek(0)
        try:
            payload = validation.parse_json(request.content.read())
        except ApiError:
            return False
        return isinstance(payload, dict) and classify(payload) == job_updates.TRAINER

    async def _receive_trainer(self, request: Any, provider: str, token: Optional[str],
                               path_provider: str) -> Any:
        """A SimpleTuner trainer event, authenticated by the job's webhook token."""
        if token is None:
            self.webhooks.counters["rejected_signature"] += 1
            await self._reject(request, path_provider, 401, "unauthorized", "missing_token",
                               "Trainer events need the job's webhook token (X-API-Key or "
                               "Authorization: Bearer)")
        request.content.seek(0)
        try:
            payload = validation.validate_raw(request.content.read(), WebhookPayload).given()
        except ApiError:
            self.webhooks.counters["invalid"] += 1
            raise
        if classify(payload) != job_updates.TRAINER:
            self.webhooks.counters["invalid"] += 1
            raise bad_request("Not a SimpleTuner trainer event (job_id with type or data)",
                              code="invalid_payload")
        settings = self.webhooks.settings(provider)
        client_ip = getattr(request, "client_ip", None) or ""
        outcome = await self.webhooks.deliver(provider, job_updates.TRAINER, payload, None, client_ip,
                                              settings.get("gpu_prices") or {}, token_hash(token))
        if outcome.get("status") == "unauthorized":
            self.webhooks.counters["rejected_signature"] += 1
            await self._reject(request, path_provider, 401, "unauthorized", "invalid_token",
                               "The webhook token is not valid for this job")
        return self.webhooks.respond(provider, outcome)

    def _signature_headers(self, request: Any) -> dict[str, str]:
        out = {}
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            values = request.requestHeaders.getRawHeaders(name.encode("ascii")) or []
            if values:
                out[name] = " ".join(v.decode("latin-1") for v in values)
        return out
