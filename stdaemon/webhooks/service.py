"""Provider webhooks (S6): :class:`WebhookService` (``app.webhooks``), what the webhook surface
(:mod:`stdaemon.webhooks.http`) calls once it has parsed a delivery.

- the provider's effective settings (``webhook_allowed_ips``, ``webhook_require_signature``,
  ``gpu_prices``) from the providers service;
- the signing secret: ``<PROVIDER>_WEBHOOK_SECRET`` from the secrets service or, for Replicate,
  fetched once from ``GET /v1/webhooks/default/secret`` and kept (fetched again, at most once a
  minute, when a signature does not match: the secret may have been rotated);
- rejections audited as ``webhook_rejected`` through ``audit.sampled`` (bounded under a flood);
- the apply path: one write transaction (grouped with deliveries arriving together) holding the
  replay check on ``webhook-id`` (table ``webhook_deliveries``, :mod:`stdaemon.webhooks.store`),
  the job change through the one job-update path shared with the poller
  (``JobService.write_update``) and the delivery row -- then ``JobService.committed``;
- committed delivery ids kept in memory (a replay is answered without the writer; the table stays
  the truth, and the memory is emptied after a restore);
- counters, and the hourly sweep of delivery rows older than 7 days.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from typing import TYPE_CHECKING, Any, Mapping, Optional

from twisted.internet import defer

from stdaemon.http.errors import ApiError
from stdaemon.http.surface import Response
from stdaemon.jobs import store as job_store
from stdaemon.jobs import updates as job_updates
from stdaemon.jobs.service import TOKEN_HASH_KEY, JobService
from stdaemon.logs import get_logger
from stdaemon.store.database import Database
from stdaemon.webhooks import signature as ws
from stdaemon.webhooks import store

if TYPE_CHECKING:  # types only: the services are handed over by stdaemon.service.build_app
    from stdaemon.audit.service import AuditLog
    from stdaemon.providers.service import ProviderManager
    from stdaemon.secrets.service import SecretsManager

log = get_logger("stdaemon.webhooks")

DELIVERY_RETENTION = 7 * 86400.0
SWEEP_INTERVAL = 3600.0      # the "webhook-deliveries-sweep" timer
RECENT_DELIVERIES = 10_000   # committed delivery ids answered from memory as duplicates
SECRET_REFETCH_INTERVAL = 60.0
# Defaults under the provider's effective settings.
DEFAULT_SETTINGS = {"webhook_allowed_ips": [], "webhook_require_signature": True, "gpu_prices": {}}


def secret_name(provider: str) -> str:
    return f"{provider.upper()}_WEBHOOK_SECRET"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


class WebhookService:
    """Webhook deliveries: settings, secrets, the apply path, replay memory and counters."""

    def __init__(self, db: Database, clock: Any, jobs: JobService, providers: "ProviderManager",
                 secrets: "SecretsManager", audit: "AuditLog"):
        self.db = db
        self.clock = clock
        self.jobs = jobs
        self.providers = providers
        self.secrets = secrets
        self.audit = audit
        self._fetched: dict[str, str] = {}
        self._fetched_at: dict[str, float] = {}
        self._fetching: dict[str, list] = {}
        self.counters = {"received": 0, "applied": 0, "duplicates": 0, "unknown_job": 0,
                         "ignored": 0, "rejected_ip": 0, "rejected_signature": 0, "invalid": 0}
        # (provider, webhook_id) → (received_at, job_id) of committed deliveries, newest last: a
        # replay of one of them is answered without the writer; the table stays the truth.
        self._recent: dict[tuple[str, str], tuple[float, Optional[str]]] = {}

    def now(self) -> float:
        return self.clock.seconds()

    # -- replay check, memory first ---------------------------------------------------------

    def _recent_duplicate(self, provider: str, webhook_id: Optional[str]) -> Optional[dict]:
        if webhook_id is None:
            return None
        seen = self._recent.get((provider, webhook_id))
        if seen is None or self.now() - seen[0] >= DELIVERY_RETENTION:
            return None
        return {"status": "duplicate", "job_id": seen[1]}

    def _remember(self, provider: str, webhook_id: Optional[str], outcome: dict) -> None:
        """After the commit: a delivery the table now holds (a row was written or found)."""
        if webhook_id is None or outcome.get("reason") == "unknown_job" or "job_id" not in outcome:
            return
        while len(self._recent) >= RECENT_DELIVERIES:
            del self._recent[next(iter(self._recent))]
        self._recent[(provider, webhook_id)] = (self.now(), outcome.get("job_id"))

    async def forget_recent(self) -> None:
        """After a restore the table is the only truth again."""
        self._recent.clear()

    # -- settings and secrets -----------------------------------------------------------

    def settings(self, provider: str) -> dict:
        """The settings a delivery reads (copies; the defaults where the provider has none): only
        these, not a copy of every provider setting per delivery."""
        values = {}
        for name, default in DEFAULT_SETTINGS.items():
            try:
                values[name] = self.providers.value(provider, name)
            except KeyError:
                values[name] = type(default)(default) if isinstance(default, (list, dict)) else default
        return values

    async def secret(self, provider: str, refetch: bool = False) -> tuple[Optional[str], str]:
        """``(secret, source)``; source is ``secrets``, ``provider`` or ``none``."""
        value = await defer.maybeDeferred(self.secrets.get, secret_name(provider))
        if value:
            return value, "secrets"
        if provider != "replicate":
            return None, "none"
        now = self.now()
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
        client = self.providers.replicate
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

    async def verify(self, provider: str, headers: Mapping[str, str],
                     body: bytes) -> Optional[ws.Verification]:
        """The Standard Webhooks check of a delivery; None when no secret can be obtained."""
        secret, source = await self.secret(provider)
        if not secret:
            # Header problems are the sender's fault whatever our secret state.
            probe = ws.verify("whsec_AAAA", headers, body, self.now())
            if probe.reason in (ws.REASON_MISSING_HEADERS, ws.REASON_MALFORMED_ID,
                                ws.REASON_MALFORMED_TIMESTAMP, ws.REASON_STALE,
                                ws.REASON_MALFORMED_SIGNATURE, ws.REASON_NO_V1):
                return probe
            log.warning("No webhook secret for {provider} ({name} unset and none fetched)",
                        provider=provider, name=secret_name(provider))
            return None
        verification = ws.verify(secret, headers, body, self.now())
        if not verification.valid and source == "provider" and \
                verification.reason in (ws.REASON_MISMATCH, ws.REASON_BAD_SECRET):
            fresh, _ = await self.secret(provider, refetch=True)
            if fresh and fresh != secret:
                verification = ws.verify(fresh, headers, body, self.now())
        return verification

    # -- rejections ----------------------------------------------------------------------

    async def reject(self, ip: Optional[str], provider: str, status: int, code: str, reason: str,
                     detail: str) -> None:
        """Audit (sampled) and log a refused delivery, then refuse it."""
        await self.audit.record_soon("webhook_rejected", sampled=True, actor="anonymous", ip=ip,
                                     target=f"provider:{provider}", action="reject",
                                     details={"provider": provider, "reason": reason, "status": status})
        log.info("Webhook for {provider} from {ip} rejected: {reason}", provider=provider, ip=ip,
                 reason=reason)
        raise ApiError(status, code, detail, reason=reason)

    # -- the apply path ---------------------------------------------------------------------

    async def deliver(self, provider: str, kind: str, payload: Mapping[str, Any],
                      webhook_id: Optional[str], client_ip: str, prices: Mapping[str, float],
                      presented_hash: Optional[str] = None) -> dict:
        """Apply one delivery (a replay of a committed one is answered from memory) and, after the
        commit, the job update's counters, metrics figures and live event. The outcome dict."""
        outcome = self._recent_duplicate(provider, webhook_id)
        if outcome is None:
            # group commit: deliveries arriving together share one transaction (one fsync)
            outcome = await self.db.run_write_grouped(self._apply, provider, kind, payload, webhook_id,
                                                      client_ip, prices, self.now(), presented_hash)
            self._remember(provider, webhook_id, outcome)
        if outcome.get("applied") is not None:
            # The same counters, metrics figures and live event as the poller's updates.
            await self.jobs.committed(outcome["applied"])
        return outcome

    def _apply(self, conn: sqlite3.Connection, provider: str, kind: str, payload: Mapping[str, Any],
               webhook_id: Optional[str], client_ip: str, prices: Mapping[str, float],
               now: float, presented_hash: Optional[str] = None) -> dict:
        if webhook_id is not None:
            seen = store.find_delivery(conn, provider, webhook_id)
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
        applied = self.jobs.write_update(
            conn, job, plan, now, source="webhook", actor=f"webhook:{provider}", ip=client_ip,
            details={"webhook_id": webhook_id, "kind": kind})
        outcome = "unknown_status" if plan.reason == "unknown" else plan.reason
        if webhook_id is not None:
            store.record_delivery(conn, provider, webhook_id, now, job_id, outcome)
        return {"status": "applied" if plan.accepted or (plan.reason == "progress" and plan.changes)
                else "ignored", "reason": outcome,
                "job_id": job_id, "job_status": (applied.result.job or job)["status"],
                "applied": applied}

    def respond(self, provider: str, outcome: dict) -> Any:
        """The answer to an applied delivery (and its counter)."""
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
        return await self.db.run_write(store.sweep, self.now() - DELIVERY_RETENTION)
