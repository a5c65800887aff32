"""Provider webhooks (S6): ``POST /api/webhooks/{provider}``.

Order of checks for every delivery (body capped at 1 MiB by the root, 413):

1. unknown provider → 404;
2. allowlist: the provider's effective ``webhook_allowed_ips`` (unset or
   ``[]`` = everyone) against ``request.client_ip`` (derived once by the root
   from the peer and, behind ``server.trusted_proxies`` only, the forwarding
   headers) → 403 ``ip_not_allowed``;
3. signature (when ``webhook_require_signature``, the default): Standard
   Webhooks (``stdaemon/webhooks/signature.py``), secret
   ``<PROVIDER>_WEBHOOK_SECRET`` from ``ctx.secrets`` or, for Replicate,
   fetched once from ``GET /v1/webhooks/default/secret`` and cached (fetched
   again, at most once a minute, when a signature does not match: the secret
   may have been rotated) → 401 ``invalid_signature`` with the reason; 503
   when no secret can be obtained (the provider retries);
4. body not JSON / not an object → 400; neither payload shape → 400;
5. one write transaction: replay check on ``webhook-id`` (table
   ``webhook_deliveries``), the job change through the one job-update path
   shared with the poller (mapping and guards in
   ``stdaemon/jobs/updates.py``; ``ctx.jobs.write_update`` writes it,
   revokes the job's upload credentials on a terminal status and appends the
   ``job.status_changed`` audit entry), the delivery row -- then
   ``ctx.jobs.committed`` (counters, metrics figures, live event) and only
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
``ctx.audit.sampled`` (bounded under a flood) with ip, provider and reason.
Delivery rows older than 7 days are swept hourly (a replay that old fails
the ±300 s timestamp check anyway).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import sqlite3
from typing import Any, Mapping, Optional

from klein import Klein
from pydantic import ConfigDict, Field
from twisted.internet import defer

from stdaemon.jobs import updates as job_updates
from stdaemon.webhooks import signature as ws
from stdaemon.http.client_ip import in_networks, parse_ip
from stdaemon.http.errors import ApiError, bad_request, not_found
from stdaemon.http import validation
from stdaemon.http.surface import PUBLIC, Response, Surface, route
from stdaemon.logs import get_logger
from stdaemon.jobs import store as job_store

log = get_logger("stdaemon.webhooks")

MAX_WEBHOOK_BODY = 1024 * 1024
DELIVERY_RETENTION = 7 * 86400.0
RECENT_DELIVERIES = 10_000   # committed delivery ids answered from memory as duplicates
SECRET_REFETCH_INTERVAL = 60.0
KNOWN_PROVIDERS = ("replicate",)
# The path SimpleTuner's trainer posts its own events to (token-authenticated).
TRAINER_PATH = "simpletuner"
# Job metadata key holding the SHA-256 of the job's webhook token (never public).
TOKEN_HASH_KEY = "webhook_token_sha256"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def presented_token(request: Any) -> Optional[str]:
    """The per-job token from ``X-API-Key`` or ``Authorization: Bearer``."""
    value = request.getHeader("x-api-key")
    if not value:
        auth = request.getHeader("authorization") or ""
        scheme, _, rest = auth.partition(" ")
        value = rest.strip() if scheme.lower() == "bearer" else ""
    value = (value or "").strip()
    return value if value and len(value) <= 512 else None

# Fallbacks used when the provider settings capability is not installed.
DEFAULT_SETTINGS = {"webhook_allowed_ips": [], "webhook_require_signature": True, "gpu_prices": {}}


def secret_name(provider: str) -> str:
    return f"{provider.upper()}_WEBHOOK_SECRET"


def _known_providers() -> tuple[str, ...]:
    try:
        from stdaemon.providers.settings import PROVIDERS

        return tuple(PROVIDERS)
    except ImportError:  # pragma: no cover - the providers module is part of the tree
        return KNOWN_PROVIDERS


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


def _settings_from_table(conn: sqlite3.Connection, provider: str) -> dict:
    """Read saved provider settings straight from the ``settings`` table
    (used only when ``ctx.providers`` is not installed)."""
    out = dict(DEFAULT_SETTINGS)
    for key, value in conn.execute(
            "SELECT key, value_json FROM settings WHERE namespace = ?", (f"provider:{provider}",)):
        try:
            out[key] = json.loads(value)
        except ValueError:
            continue
    return out


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

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self._fetched: dict[str, str] = {}
        self._fetched_at: dict[str, float] = {}
        self._fetching: dict[str, defer.Deferred] = {}
        self.counters = {"received": 0, "applied": 0, "duplicates": 0, "unknown_job": 0,
                         "ignored": 0, "rejected_ip": 0, "rejected_signature": 0, "invalid": 0}
        # (provider, webhook_id) → (received_at, job_id) of committed deliveries, newest last: a
        # replay of one of them is answered without the writer; the table stays the truth.
        self._recent: dict[tuple[str, str], tuple[float, Optional[str]]] = {}
        ctx.webhooks = self
        ctx.add_timer("webhook-deliveries-sweep", 3600.0, self.sweep)

    # -- replay check, memory first ---------------------------------------------------------

    def _recent_duplicate(self, provider: str, webhook_id: Optional[str]) -> Optional[dict]:
        if webhook_id is None:
            return None
        seen = self._recent.get((provider, webhook_id))
        if seen is None or self.ctx.now() - seen[0] >= DELIVERY_RETENTION:
            return None
        return {"status": "duplicate", "job_id": seen[1]}

    def _remember(self, provider: str, webhook_id: Optional[str], outcome: dict) -> None:
        """After the commit: a delivery the table now holds (a row was written or found)."""
        if webhook_id is None or outcome.get("reason") == "unknown_job" or "job_id" not in outcome:
            return
        while len(self._recent) >= RECENT_DELIVERIES:
            del self._recent[next(iter(self._recent))]
        self._recent[(provider, webhook_id)] = (self.ctx.now(), outcome.get("job_id"))

    async def forget_recent(self) -> None:
        """After a restore the table is the only truth again."""
        self._recent.clear()

    # -- settings and secrets -----------------------------------------------------------

    async def settings(self, provider: str) -> dict:
        providers = getattr(self.ctx, "providers", None)
        if providers is not None and hasattr(providers, "values"):
            values = dict(DEFAULT_SETTINGS)
            values.update(providers.values(provider))
            return values
        return await self.ctx.db.run_read(_settings_from_table, provider)

    async def secret(self, provider: str, refetch: bool = False) -> tuple[Optional[str], str]:
        """``(secret, source)``; source is ``secrets``, ``provider`` or ``none``."""
        secrets = getattr(self.ctx, "secrets", None)
        if secrets is not None:
            value = await defer.maybeDeferred(secrets.get, secret_name(provider))
            if value:
                return value, "secrets"
        if provider != "replicate":
            return None, "none"
        now = self.ctx.now()
        if provider in self._fetched and not (
                refetch and now - self._fetched_at.get(provider, 0.0) >= SECRET_REFETCH_INTERVAL):
            return self._fetched[provider], "provider"
        if provider not in self._fetched and \
                now - self._fetched_at.get(provider, float("-inf")) < SECRET_REFETCH_INTERVAL:
            return None, "none"  # a fetch failed moments ago: do not hammer the provider
        if provider in self._fetching:  # join the fetch under way
            waiter: defer.Deferred = defer.Deferred()
            self._fetching[provider].append(waiter)
            await waiter
            return self._fetched.get(provider), "provider" if provider in self._fetched else "none"
        client = getattr(getattr(self.ctx, "providers", None), "replicate", None)
        if client is None:
            return self._fetched.get(provider), "none"
        self._fetching[provider] = []
        try:
            value = await client.webhook_secret()
        except Exception as exc:
            log.warning("Could not fetch the Replicate webhook secret: {error}",
                        error=type(exc).__name__)
            value = None
        finally:
            waiting = self._fetching.pop(provider, [])
        self._fetched_at[provider] = now
        if value:
            self._fetched[provider] = value
        for waiter in waiting:
            waiter.callback(None)
        return self._fetched.get(provider), "provider" if provider in self._fetched else "none"

    def forget_secret(self, provider: str) -> None:
        """Drop the signing secret fetched from the provider (its API token changed)."""
        self._fetched.pop(provider, None)
        self._fetched_at.pop(provider, None)

    # -- rejections ----------------------------------------------------------------------

    async def _reject(self, request: Any, provider: str, status: int, code: str, reason: str,
                      detail: str) -> None:
        ip = getattr(request, "client_ip", None)
        audit = getattr(self.ctx, "audit", None)
        if audit is not None:
            try:
                await audit.sampled("webhook_rejected", actor="anonymous", ip=ip,
                                    target=f"provider:{provider}", action="reject",
                                    details={"provider": provider, "reason": reason, "status": status})
            except Exception:
                log.failure("Could not audit a rejected webhook")
        log.info("Webhook for {provider} from {ip} rejected: {reason}", provider=provider, ip=ip,
                 reason=reason)
        raise ApiError(status, code, detail, reason=reason)

    # -- the endpoint ---------------------------------------------------------------------

    @route(app, "/api/webhooks/<provider>", methods=("POST",), access=PUBLIC,
           max_body=MAX_WEBHOOK_BODY, body=WebhookPayload, signed_body=True)
    async def receive(self, request: Any, provider: str) -> Any:
        """A provider's status webhook (IP allowlist, Standard Webhooks signature) or a trainer event."""
        trainer_path = provider == TRAINER_PATH
        if provider not in _known_providers() and not trainer_path:
            raise not_found(f"No webhook endpoint for provider {provider[:64]!r}")
        self.counters["received"] += 1
        if getattr(self.ctx.health, "phase", "ready") == "starting":
            # Settings, secrets and the audit key are still loading; the
            # provider retries non-2xx deliveries.
            raise ApiError(503, "not_ready", "stdaemon is starting; retry shortly",
                           headers={"Retry-After": "5"})
        headers = self._signature_headers(request)
        token = presented_token(request)
        if trainer_path or (token is not None and not headers and self._is_trainer_event(request)):
            return await self._receive_trainer(request, "replicate" if trainer_path else provider, token,
                                               provider)
        settings = await self.settings(provider)
        client_ip = getattr(request, "client_ip", None) or ""
        if not allowed(client_ip, settings.get("webhook_allowed_ips")):
            self.counters["rejected_ip"] += 1
            await self._reject(request, provider, 403, "forbidden", "ip_not_allowed",
                               "This address may not deliver webhooks")
        request.content.seek(0)
        body = request.content.read()
        webhook_id = headers.get("webhook-id") or None
        if settings.get("webhook_require_signature", True):
            verification = await self._verify(provider, headers, body)
            if verification is None:
                raise ApiError(503, "webhook_secret_unavailable",
                               "The webhook secret is not available yet; retry later",
                               headers={"Retry-After": "30"})
            if not verification.valid:
                self.counters["rejected_signature"] += 1
                await self._reject(request, provider, 401, "invalid_signature", verification.reason,
                                   f"Webhook signature refused: {verification.reason}")
            webhook_id = verification.webhook_id
        try:
            payload = validation.validate_raw(body, WebhookPayload).given()
        except ApiError:
            self.counters["invalid"] += 1
            raise
        kind = classify(payload)
        if kind is None:
            self.counters["invalid"] += 1
            raise bad_request("Neither a Replicate prediction (id, status) nor a SimpleTuner "
                              "trainer event (job_id, type, data)", code="invalid_payload")
        if webhook_id is not None and len(webhook_id) > ws.MAX_ID:
            webhook_id = webhook_id[:ws.MAX_ID]
        prices = settings.get("gpu_prices") or {}
        outcome = self._recent_duplicate(provider, webhook_id)
        if outcome is None:
            # group commit: deliveries arriving together share one transaction (one fsync)
            outcome = await self.ctx.db.run_write_grouped(self._apply, provider, kind, payload, webhook_id,
                                                          client_ip, prices, self.ctx.now())
            self._remember(provider, webhook_id, outcome)
        if outcome.get("applied") is not None:
            # The same counters, metrics figures and live event as the poller's updates.
            await self.ctx.jobs.committed(outcome["applied"])
        return self._respond(provider, outcome)

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
            self.counters["rejected_signature"] += 1
            await self._reject(request, path_provider, 401, "unauthorized", "missing_token",
                               "Trainer events need the job's webhook token (X-API-Key or "
                               "Authorization: Bearer)")
        request.content.seek(0)
        try:
            payload = validation.validate_raw(request.content.read(), WebhookPayload).given()
        except ApiError:
            self.counters["invalid"] += 1
            raise
        if classify(payload) != job_updates.TRAINER:
            self.counters["invalid"] += 1
            raise bad_request("Not a SimpleTuner trainer event (job_id with type or data)",
                              code="invalid_payload")
        settings = await self.settings(provider)
        client_ip = getattr(request, "client_ip", None) or ""
        outcome = await self.ctx.db.run_write_grouped(
            self._apply, provider, job_updates.TRAINER, payload, None, client_ip,
            settings.get("gpu_prices") or {}, self.ctx.now(), token_hash(token))
        if outcome.get("status") == "unauthorized":
            self.counters["rejected_signature"] += 1
            await self._reject(request, path_provider, 401, "unauthorized", "invalid_token",
                               "The webhook token is not valid for this job")
        if outcome.get("applied") is not None:
            await self.ctx.jobs.committed(outcome["applied"])
        return self._respond(provider, outcome)

    def _signature_headers(self, request: Any) -> dict[str, str]:
        out = {}
        for name in ("webhook-id", "webhook-timestamp", "webhook-signature"):
            values = request.requestHeaders.getRawHeaders(name.encode("ascii")) or []
            if values:
                out[name] = " ".join(v.decode("latin-1") for v in values)
        return out

    async def _verify(self, provider: str, headers: Mapping[str, str],
                      body: bytes) -> Optional[ws.Verification]:
        secret, source = await self.secret(provider)
        if not secret:
            # Header problems are the sender's fault whatever our secret state.
            probe = ws.verify("whsec_AAAA", headers, body, self.ctx.now())
            if probe.reason in (ws.REASON_MISSING_HEADERS, ws.REASON_MALFORMED_ID,
                                ws.REASON_MALFORMED_TIMESTAMP, ws.REASON_STALE,
                                ws.REASON_MALFORMED_SIGNATURE, ws.REASON_NO_V1):
                return probe
            log.warning("No webhook secret for {provider} ({name} unset and none fetched)",
                        provider=provider, name=secret_name(provider))
            return None
        verification = ws.verify(secret, headers, body, self.ctx.now())
        if not verification.valid and source == "provider" and \
                verification.reason in (ws.REASON_MISMATCH, ws.REASON_BAD_SECRET):
            fresh, _ = await self.secret(provider, refetch=True)
            if fresh and fresh != secret:
                verification = ws.verify(fresh, headers, body, self.ctx.now())
        return verification

    # -- the transaction (writer thread) ----------------------------------------------------

    def _apply(self, conn: sqlite3.Connection, provider: str, kind: str, payload: Mapping[str, Any],
               webhook_id: Optional[str], client_ip: str, prices: Mapping[str, float],
               now: float, presented_hash: Optional[str] = None) -> dict:
        if webhook_id is not None:
            seen = conn.execute(
                "SELECT outcome, job_id FROM webhook_deliveries WHERE provider = ? AND webhook_id = ?",
                (provider, webhook_id)).fetchone()
            if seen is not None:
                return {"status": "duplicate", "job_id": seen[1], "previous_outcome": seen[0]}
        if kind == "prediction":
            job = job_store.find_by_external(conn, provider, payload["id"])
        else:
            job = job_store.get_job(conn, payload["job_id"])
            if job is None:
                job = job_store.find_by_external(conn, provider, payload["job_id"])
        if presented_hash is not None:
            # Token-authenticated trainer event: the token must be this job's.
            # (Unknown jobs are refused too, so a token cannot probe job ids.)
            expected = (job.get("metadata") or {}).get(TOKEN_HASH_KEY) if job else None
            if not isinstance(expected, str) or not hmac.compare_digest(expected, presented_hash):
                return {"status": "unauthorized"}
        if job is None:
            return {"status": "ignored", "reason": "unknown_job"}
        job_id = job["job_id"]
        plan = job_updates.plan(kind, payload, job, prices, now)
        applied = self.ctx.jobs.write_update(
            conn, job, plan, now, source="webhook", actor=f"webhook:{provider}", ip=client_ip,
            details={"webhook_id": webhook_id, "kind": kind})
        outcome = "unknown_status" if plan.reason == "unknown" else plan.reason
        if webhook_id is not None:
            conn.execute(
                "INSERT INTO webhook_deliveries (provider, webhook_id, received_at, job_id, outcome) "
                "VALUES (?, ?, ?, ?, ?)", (provider, webhook_id, now, job_id, outcome))
        return {"status": "applied" if plan.accepted or (plan.reason == "progress" and plan.changes)
                else "ignored", "reason": outcome,
                "job_id": job_id, "job_status": (applied.result.job or job)["status"],
                "applied": applied}

    def _respond(self, provider: str, outcome: dict) -> Any:
        status = outcome["status"]
        if status == "duplicate":
            self.counters["duplicates"] += 1
            return {"status": "duplicate", "job_id": outcome.get("job_id")}
        if outcome.get("reason") == "unknown_job":
            self.counters["unknown_job"] += 1
            log.info("Webhook for {provider} names no known job; ignored", provider=provider)
            return Response({"status": "ignored", "reason": "unknown_job"}, status=202)
        reason = outcome.get("reason")
        if status == "applied":
            self.counters["applied"] += 1
        else:
            self.counters["ignored"] += 1
        return {"status": status, "reason": reason, "job_id": outcome["job_id"],
                "job_status": outcome["job_status"]}

    # -- housekeeping -----------------------------------------------------------------------

    async def sweep(self) -> int:
        horizon = self.ctx.now() - DELIVERY_RETENTION

        def work(conn: sqlite3.Connection) -> int:
            return conn.execute("DELETE FROM webhook_deliveries WHERE received_at < ?",
                                (horizon,)).rowcount

        return await self.ctx.db.run_write(work)
