"""Jobs (S4): submission to Replicate, listing, cancel, delete, logs, polling.

:class:`JobService` holds the job lifecycle and is installed as ``ctx.jobs``.
Every provider update (poller, webhooks) and API status change goes through
one path: the pure mapping and guards of :mod:`stdaemon.jobs.updates`,
:meth:`JobService.write_update` inside the caller's transaction (row,
credential revocation, audit entry) and :meth:`JobService.committed` after the
commit (counters, metrics figures, live event).  :class:`JobsSurface` is the HTTP API
(also the paths SimpleTuner's CLI calls: it sends ``X-API-Key`` and reads
``detail`` from error bodies).

Submission never leaves a half-created job: when the provider call fails the
job row says ``failed`` with the provider's reason and its upload credentials
are revoked before the error is answered (502; 503 with ``Retry-After`` when
the circuit breaker is open).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field
from twisted.internet import defer

from stdaemon.providers.service import TOKEN_NAMES, audit
from stdaemon.providers.replicate import (
    CircuitOpenError, ProviderAPIError, ProviderNotConfigured, ProviderUnavailable,
)
from stdaemon.jobs import costs
from stdaemon.jobs import updates as job_updates
from stdaemon.providers import settings as ps
from stdaemon.jobs import status as st
from stdaemon.outbound.breaker import OPEN
from stdaemon.timestamps import iso
from stdaemon.http.errors import ApiError, conflict, not_found
from stdaemon.http.surface import OPERATOR, VIEWER, Response, Surface, route
from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel, QueryModel, validate
from stdaemon.logs import LogContext, get_logger
from stdaemon.s3 import credentials as creds, store as s3_store
from stdaemon.jobs import store
from stdaemon.invalid import InvalidValue

log = get_logger("stdaemon.jobs")

MAX_SUBMIT_BODY = 8 * 1024 * 1024
MAX_IDEMPOTENCY_KEY = 200
# ``GET /api/cloud/jobs?sync_active=1`` refreshes active jobs from the provider at most this often
# (seconds on the injected clock), whoever asks; viewers cannot trigger it at all.
SYNC_MIN_INTERVAL = 15.0


# -- request models (stdaemon.http.validation) -----------------------------------------------

HardwareProfileName = Literal[tuple(costs.HARDWARE_PROFILES)]
JobStatus = Literal[st.STATUSES]
ProviderName = Literal[ps.PROVIDERS]


class SubmitJob(BodyModel):
    """A submission (also what SimpleTuner's CLI sends); fields stdaemon does not use are kept."""

    model_config = ConfigDict(extra="allow")

    config: Optional[dict[str, Any]] = None
    dataloader_config: Union[list[Any], dict[str, Any]] = Field(default_factory=list)
    config_name: Optional[str] = Field(None, max_length=200)
    config_name_to_load: Optional[str] = Field(None, max_length=200)
    # "" = the provider's default profile (as before).
    hardware_profile: Optional[Union[HardwareProfileName, Literal[""]]] = None
    webhook_url: Optional[str] = Field(None, max_length=2048)
    idempotency_key: Optional[str] = Field(None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY,
                                           pattern=r"\S")
    max_runtime_minutes: Optional[Union[int, float]] = None
    # a job whose outputs this one resumes from: its upload credentials may read that job's prefix
    resume_from_job: Optional[str] = Field(None, min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


class SubmitQuery(QueryModel):
    provider: str = Field("replicate", max_length=64)


class LocalSubmit(BodyModel):
    """SimpleTuner's ``jobs submit`` body (the local queue, which stdaemon does not have)."""

    config_name: Optional[str] = Field(None, max_length=200)
    target: Optional[str] = Field(None, max_length=32)


class ListJobs(QueryModel):
    status: Optional[JobStatus] = None
    provider: Optional[ProviderName] = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=SQLITE_MAX_INT)
    sync_active: bool = False
POLL_BATCH = 50
ROW_CACHE_SIZE = 256        # hot job rows kept in memory (JobService.get_row)
S3_REGION = "us-east-1"
# Job metadata key of the SHA-256 of the trainer's per-job webhook token
# (stdaemon/webhooks/http.py checks it; never shown).
TOKEN_HASH_KEY = "webhook_token_sha256"
TRAINER_WEBHOOK_PATH = "/api/webhooks/simpletuner"


def _actor(principal) -> str:
    return principal.actor if principal is not None else "system"


@dataclass
class Applied:
    """One provider/API update committed to a job row (see :meth:`JobService.write_update`)."""

    job_id: str
    plan: job_updates.Plan
    result: store.TransitionResult
    revoked: int = 0                      # upload credentials revoked in the transaction
    pending_audit: Optional[dict] = None  # audit entry to write after the commit (no in-transaction writer)

    @property
    def changed(self) -> bool:
        """The row differs from what it was (status or columns)."""
        before, after = self.result.before, self.result.job
        return before is not None and after is not None and after is not before and dict(after) != dict(before)


class JobService:
    """Job lifecycle; one per daemon (``ctx.jobs``)."""

    def __init__(self, ctx: Any):
        self.ctx = ctx
        self.counters = {
            "submitted": 0,
            "submit_failed": 0,
            "idempotent_hits": 0,
            "status_changes": 0,
            "out_of_order_ignored": 0,
            "terminal_ignored": 0,
            "poll_runs": 0,
            "poll_errors": 0,
        }
        self.timer = None  # the "jobs.poll" SafeTimerService (set by install)
        self.stats = {"by_status": {status: 0 for status in st.STATUSES}, "cost_usd_total": 0.0,
                      "created_total": 0, "durations": 0, "duration_seconds_total": 0.0}
        # Submission checks (quotas, approval rules) registered by other
        # capabilities: async fn(principal, provider, estimate_usd, body) ->
        # {"block": str|None, "warnings": [str], "pending_approval": bool}.
        # A job held for approval is created as ``pending_approval`` with its
        # payload in ``metadata["request"]``; approval calls :meth:`dispatch`.
        self.submission_checks: list = []
        self._last_sync: Optional[float] = None

    async def sync_active(self) -> bool:
        """A provider refresh of the active jobs on request, at most once per
        :data:`SYNC_MIN_INTERVAL` (each refresh costs one provider call per active job)."""
        now = self.ctx.clock.seconds()
        if self._last_sync is not None and now - self._last_sync < SYNC_MIN_INTERVAL:
            return False
        self._last_sync = now
        await self.poll_once()
        return True

    # -- helpers ---------------------------------------------------------------
    def public(self, job: dict) -> dict:
        """A job as the API shows it: times ISO 8601 (S18) and the fields
        SimpleTuner's CLI reads (``job_type``, ``is_terminal``, ``is_active``,
        ``finished_at`` = ``completed_at``, ``duration_seconds``)."""
        out = dict(job)
        for name in ("created_at", "started_at", "completed_at"):
            out[name] = iso(job.get(name))
        out["finished_at"] = out["completed_at"]
        out["job_type"] = "cloud"
        out["is_terminal"] = job["status"] in st.TERMINAL
        out["is_active"] = job["status"] in st.ACTIVE
        end = job.get("completed_at") or (None if job["status"] in st.TERMINAL else self.ctx.now())
        out["duration_seconds"] = (round(end - job["started_at"], 3)
                                   if job.get("started_at") and end else None)
        metadata = dict(job.get("metadata") or {})
        metadata.pop("request", None)  # a pending submission's payload is not echoed
        metadata.pop(TOKEN_HASH_KEY, None)  # the trainer's webhook token hash stays private
        out["metadata"] = metadata
        out["progress"] = metadata.get("progress")  # latest trainer progress (step, epoch, loss, lr, eta)
        out["hardware_profile"] = metadata.get("hardware_profile", job.get("hardware_type"))
        out.pop("idempotency_key", None)
        return out

    # -- hot job rows ---------------------------------------------------------------------------
    async def get_row(self, job_id: str) -> Optional[dict]:
        """The job row, from memory when nothing was written since it was read.

        A row read on a reader thread is kept while ``ctx.db.write_epoch`` stays what it was when
        the read started: any write of this process (each job change goes through the one writer,
        ``write_update`` included), a restore, or a job change by another process seen by the
        ``change-counters`` timer (triggers bump it) moves the epoch, and the next read goes to
        SQLite again. Bounded (``ROW_CACHE_SIZE`` ids, oldest dropped first). The row is shared:
        callers must not change it (``public`` copies)."""
        db = self.ctx.db
        epoch = db.write_epoch
        rows = self.__dict__.setdefault("_rows", {})
        kept = rows.get(job_id)
        if kept is not None and kept[0] == epoch:
            return kept[1]
        row = await db.run_read(store.get_job, job_id)
        if row is not None and db.write_epoch == epoch:
            rows.pop(job_id, None)
            while len(rows) >= ROW_CACHE_SIZE:
                del rows[next(iter(rows))]
            rows[job_id] = (epoch, row)
        return row

    # -- incrementally kept figures for metrics (no table scan per scrape) ------
    async def load(self) -> None:
        """Start-up: one pass over the jobs table for the running totals."""
        self.stats = await self.ctx.db.run_read(store.stats)

    def _track(self, before: Optional[dict], after: Optional[dict]) -> None:
        """Apply one committed row change to the totals.  ``jobs_total`` and
        ``cost_usd_total`` are Prometheus counters: a deleted job leaves the
        status gauge and the duration average but never lowers them."""
        stats = self.stats
        by_status = stats["by_status"]
        if before is None and after is not None:
            stats["created_total"] += 1
        if before is not None:
            by_status[before["status"]] = by_status.get(before["status"], 0) - 1
            if before.get("completed_at") is not None and before.get("started_at") is not None:
                stats["durations"] -= 1
                stats["duration_seconds_total"] -= before["completed_at"] - before["started_at"]
        if after is not None:
            by_status[after["status"]] = by_status.get(after["status"], 0) + 1
            if after.get("completed_at") is not None and after.get("started_at") is not None:
                stats["durations"] += 1
                stats["duration_seconds_total"] += after["completed_at"] - after["started_at"]
            delta = float(after.get("cost_usd") or 0.0) - float((before or {}).get("cost_usd") or 0.0)
            stats["cost_usd_total"] += max(0.0, delta)

    def metrics(self) -> dict:
        """Figures for the ``jobs`` metrics family (S10), kept current in memory."""
        by_status = dict(self.stats["by_status"])
        durations = self.stats["durations"]
        return {
            "jobs_total": self.stats["created_total"],
            "by_status": by_status,
            "active": sum(by_status.get(s, 0) for s in st.ACTIVE),
            "cost_usd_total": round(self.stats["cost_usd_total"], 6),
            "job_duration_seconds_avg": (self.stats["duration_seconds_total"] / durations) if durations else 0.0,
            "counters": dict(self.counters),
        }

    def observe(self, result: Optional[store.TransitionResult]) -> None:
        """Account for one committed ``store.jobs`` change (any writer: poller,
        webhooks, API) so the running totals, the metrics figures and the
        provider spend stay exact.  Goes through ``ctx.metrics.job_changed``,
        which forwards to :meth:`_track` once this service owns the figures."""
        if result is None:
            return
        before, after = result.before, result.job
        if before is None or after is None or after is before or dict(after) == dict(before):
            return
        metrics = getattr(self.ctx, "metrics", None)
        hook = getattr(metrics, "job_changed", None)
        if callable(hook):
            hook(before, after)
            if getattr(metrics, "_jobs_track", None) == self._track:
                return
        self._track(before, after)

    async def _transition(self, job_id: str, new_status: str, **fields) -> store.TransitionResult:
        result = await self.ctx.db.run_write(store.transition, job_id, new_status, self.ctx.now(), **fields)
        self.observe(result)
        return result

    def publish(self, job: Optional[dict], previous: Optional[str] = None) -> None:
        """Live event for SSE clients (``ctx.events``, stdaemon/events/service.py); never fails the caller."""
        events = getattr(self.ctx, "events", None)
        if events is None or job is None:
            return
        try:
            data = dict(job)
            data["progress"] = (job.get("metadata") or {}).get("progress")
            if previous is not None:
                data["previous_status"] = previous
            events.publish(data)
        except Exception:
            log.failure("Publishing job {job_id} failed", job_id=job.get("job_id"))

    def upload_progress(self, job_id: str) -> dict:
        """S8 progress from the storage capability (``ctx.upload_progress.snapshot``)."""
        hook = getattr(self.ctx, "upload_progress", None)
        snapshot = getattr(hook, "snapshot", hook)
        if callable(snapshot):
            try:
                return snapshot(job_id)
            except Exception:
                log.failure("upload_progress failed for {job_id}", job_id=job_id)
        return {"objects_completed": 0, "bytes_received": 0, "in_flight": []}

    def _credentials(self):
        return self.ctx.upload_credentials

    async def _revoke(self, job_id: str) -> None:
        try:
            await self._credentials().revoke(job_id)
        except Exception:
            log.failure("Could not revoke upload credentials of job {job_id}", job_id=job_id)

    def _public_urls(self, provider: str) -> tuple[str, str]:
        values = self.ctx.providers.values(provider)
        server_url = (self.ctx.config.server.public_url or "").rstrip("/")
        s3_url = (values.get("s3_public_url") or server_url).rstrip("/")
        return server_url or s3_url, s3_url

    # -- submission -------------------------------------------------------------
    async def submit(self, provider: str, submission: SubmitJob, principal, ip: Optional[str]) -> Response:
        """``submission`` has been validated (types, sizes, profile names) by the route's model."""
        manager = self.ctx.providers
        values = manager.values(provider)
        body = submission.given()

        config = submission.config
        dataloader = submission.dataloader_config
        if config is None and submission.config_name_to_load is not None:
            # A named config saved with PUT /api/configs/{name} (what SimpleTuner's CLI sends).
            stored = await self._stored_config(submission.config_name_to_load)
            config = stored["config"]
            if "dataloader_config" not in body:
                dataloader = stored["dataloader_config"]
        if config is None:
            raise ApiError(400, "invalid_field",
                           "config: the training configuration (a JSON object) or config_name_to_load "
                           "(a config saved with PUT /api/configs/{name}) is required", field="config",
                           success=False)
        config_name = submission.config_name if "config_name" in body else submission.config_name_to_load
        profile = submission.hardware_profile or values["hardware_profile"]
        webhook_url = submission.webhook_url
        if webhook_url is not None:
            try:
                webhook_url = ps.validate_field("api_base_url", webhook_url)
            except InvalidValue:
                raise ApiError(400, "invalid_field", "webhook_url: must be an http(s) URL",
                               field="webhook_url", success=False) from None
        key = submission.idempotency_key
        runtime = body.get("max_runtime_minutes", values["max_runtime_minutes"])
        try:
            runtime = ps.validate_field("max_runtime_minutes", runtime)
        except InvalidValue as exc:
            raise ApiError(400, "invalid_field", f"max_runtime_minutes: {exc.reason}",
                           field="max_runtime_minutes", success=False) from None

        resume_from = submission.resume_from_job
        if resume_from is not None and await self.ctx.db.run_read(store.get_job, resume_from) is None:
            raise ApiError(404, "not_found", f"resume_from_job: job {resume_from} not found",
                           field="resume_from_job", success=False)

        # Configuration the submission cannot do without: say so before creating anything.
        # (No model version is needed: the profile's model runs its newest version.)
        public_url, s3_url = self._public_urls(provider)
        problems = []
        if not manager.token_known(provider):
            token = await defer.maybeDeferred(manager.token, provider)
            if not token:
                problems.append(f"{TOKEN_NAMES[provider]} is not set (environment or a secrets store)")
        if not public_url:
            problems.append("server.public_url (SIMPLETUNER_PUBLIC_URL) is not set: Replicate needs it "
                            "to deliver webhooks and the trainer to upload outputs")
        if problems:
            raise ApiError(400, "provider_not_configured",
                           f"Provider {provider} is not configured: " + "; ".join(problems), success=False)

        user_id = principal.user_id if principal is not None else None
        now = self.ctx.now()

        # An idempotent repeat answers with the existing job before any limit applies.
        if key:
            existing = await self.ctx.db.run_read(self._find_idempotent, user_id, key, now)
            if existing is not None:
                self.counters["idempotent_hits"] += 1
                return self._submit_response(existing, idempotent_hit=True)

        prices = values["gpu_prices"]
        estimate = costs.estimate_cost(runtime, profile, prices)
        limit = await self.cost_limit(provider, estimate=estimate)
        if limit.blocked:
            raise ApiError(403, "cost_limit_exceeded", limit.warning or "Cost limit reached",
                           success=False, cost_limit_warning=limit.warning)
        warnings: list[str] = []
        # ``cost_limit_action: require_approval`` holds an over-limit submission
        # for approval instead of refusing it (the approvals machinery decides).
        pending_approval = limit.needs_approval
        approval_reasons: list[str] = [limit.warning] if limit.needs_approval and limit.warning else []
        for check in self.submission_checks:
            verdict = await check(principal, provider, estimate, body)
            if verdict.get("block"):
                raise ApiError(403, "quota_exceeded", verdict["block"], success=False,
                               quota_warnings=warnings + list(verdict.get("warnings", [])))
            warnings.extend(verdict.get("warnings", []))
            approval_reasons.extend(verdict.get("approval_reasons", []))
            pending_approval = pending_approval or bool(verdict.get("pending_approval"))

        breaker = manager.breaker(provider)
        if breaker.state == OPEN and not pending_approval:
            retry = max(1, int(breaker.retry_after() + 0.999))
            raise ApiError(503, "circuit_open",
                           f"{provider} is temporarily unavailable after repeated failures; "
                           f"retry in {retry} s", headers={"Retry-After": str(retry)}, success=False)

        # The version is resolved before anything is created: a provider error
        # here leaves no job row and no credentials.  A held job resolves it
        # when it is approved (the newest version then).
        version = None
        if not pending_approval:
            version = await self.resolve_version(provider, profile)

        job_id = uuid.uuid4().hex
        request_payload = {"config": config, "dataloader_config": dataloader, "webhook_url": webhook_url}
        metadata = {
            "hardware_profile": profile,
            "model": manager.model_id(provider, profile),
            "version": version,
            "max_runtime_minutes": runtime,
            "estimated_cost_usd": round(estimate, 4),
            "submitted_by": _actor(principal),
        }
        if resume_from is not None:
            metadata["resume_from_job"] = resume_from  # read access to its outputs (S3)
        if pending_approval:
            metadata["request"] = request_payload
            if approval_reasons:
                metadata["approval_reasons"] = approval_reasons
        row = {
            "job_id": job_id,
            "provider": provider,
            "status": st.PENDING_APPROVAL if pending_approval else st.PENDING,
            "config_name": config_name,
            "created_at": now,
            "cost_usd": 0.0,
            "hardware_type": profile,
            "user_id": user_id,
            "metadata": metadata,
            "idempotency_key": key,
        }
        job, created = await self.ctx.db.run_write(store.create_or_get, row, now)
        if created:
            self._track(None, job)
        if not created:
            self.counters["idempotent_hits"] += 1
            return self._submit_response(job, idempotent_hit=True)
        await audit(self.ctx, "job.submitted", actor=_actor(principal), ip=ip, target=job_id,
                    action="submit", details={"provider": provider, "hardware_profile": profile,
                                              "config_name": config_name,
                                              "pending_approval": pending_approval})
        self.publish(job, None)
        if pending_approval:
            approvals = getattr(self.ctx, "approvals", None)
            if approvals is not None and hasattr(approvals, "hold_job"):
                await approvals.hold_job(job, principal)  # the approval request (stdaemon/approvals/service.py)
            return self._submit_response(job, cost_warning=limit.warning, quota_warnings=warnings)

        job = await self.dispatch(job, request_payload)
        return self._submit_response(job, cost_warning=limit.warning, quota_warnings=warnings)

    async def _stored_config(self, name: Any) -> dict:
        from stdaemon.configs.store import ConfigError

        configs = getattr(self.ctx, "configs", None)
        if configs is None:
            raise ApiError(400, "invalid_field", "config_name_to_load: named configs are not available",
                           field="config_name_to_load", success=False)
        try:
            stored = await configs.get(name)
        except ValueError as exc:
            raise ApiError(400, "invalid_field", f"config_name_to_load: {exc}",
                           field="config_name_to_load", success=False) from None
        except ConfigError as exc:
            raise ApiError(409, "config_unreadable", str(exc), success=False) from None
        if stored is None:
            raise ApiError(404, "config_not_found",
                           f"Config {name} not found (save it with PUT /api/configs/{name})",
                           field="config_name_to_load", success=False)
        if not isinstance(stored["config"], dict) or not isinstance(stored["dataloader_config"], (list, dict)):
            raise ApiError(409, "config_unreadable",
                           f"Config {name}: config.json must hold a JSON object and "
                           "multidatabackend.json a list or object", success=False)
        return stored

    async def resolve_version(self, provider: str, profile: str) -> str:
        """The Replicate version for a submission on ``profile``; provider errors
        become 502/503 answers (nothing has been created yet)."""
        manager = self.ctx.providers
        try:
            version, _source = await manager.resolve_version(provider, profile)
            return version
        except ProviderAPIError as exc:
            model = manager.model_id(provider, profile)
            raise ApiError(502, "provider_error",
                           f"Could not resolve the Replicate version of {model} ({exc.status}): "
                           f"{exc.message}", success=False) from None
        except ProviderUnavailable as exc:
            raise ApiError(502, "provider_unavailable", f"Replicate could not be reached: {exc}",
                           success=False) from None
        except CircuitOpenError as exc:
            retry = max(1, int(exc.retry_after + 0.999))
            raise ApiError(503, "circuit_open", str(exc), headers={"Retry-After": str(retry)},
                           success=False) from None
        except ProviderNotConfigured as exc:
            raise ApiError(400, "provider_not_configured", str(exc), success=False) from None

    @staticmethod
    def _find_idempotent(conn, user_id, key, now):
        job = store._one(conn, "SELECT * FROM jobs WHERE idempotency_key = ? AND user_id IS ?", (key, user_id))
        if job is not None and job["created_at"] >= now - store.IDEMPOTENCY_WINDOW:
            return job
        return None

    def _submit_response(self, job: dict, *, idempotent_hit: bool = False, cost_warning=None,
                         quota_warnings=()) -> dict:
        return {
            "success": job["status"] != st.FAILED,
            "job_id": job["job_id"],
            "status": job["status"],
            "error": job.get("error_message"),
            "idempotent_hit": idempotent_hit,
            "cost_limit_warning": cost_warning,
            "quota_warnings": list(quota_warnings),
            "job": self.public(job),
        }

    async def dispatch(self, job: dict, request: Mapping[str, Any]) -> dict:
        """Issue upload credentials and create the prediction; on failure the job
        is marked failed (reason kept), credentials revoked, and an ApiError raised."""
        provider = job["provider"]
        job_id = job["job_id"]
        manager = self.ctx.providers
        values = manager.values(provider)
        profile = job["metadata"].get("hardware_profile") or job["hardware_type"]
        version = job["metadata"].get("version")
        public_url, s3_url = self._public_urls(provider)
        webhook = values.get("webhook_url") or f"{public_url}/api/webhooks/{provider}"
        inputs: dict[str, Any] = {
            "config_json": json.dumps(request.get("config") or {}),
            "dataloader_json": json.dumps(request.get("dataloader_config") or []),
            "job_id": job_id,
            "webhook_url": request.get("webhook_url") or webhook,
        }
        with LogContext(job_id=job_id, provider=provider):
            try:
                if not version:  # approved after being held: resolve now
                    version, _source = await manager.resolve_version(provider, profile)
                # The trainer's own events (SimpleTuner's raw WebhookHandler) come back
                # with this per-job token as X-API-Key; only its hash is stored, and
                # before the prediction exists, so the first event already finds it.
                webhook_token = secrets.token_urlsafe(32)
                await self._transition(job_id, job["status"], metadata={
                    TOKEN_HASH_KEY: hashlib.sha256(webhook_token.encode()).hexdigest()})
                hooks = [{"webhook_type": "raw", "callback_url": f"{public_url}{TRAINER_WEBHOOK_PATH}",
                          "auth_token": webhook_token, "log_level": "info"}]
                if request.get("webhook_url"):
                    hooks.append({"webhook_type": "raw", "callback_url": request["webhook_url"],
                                  "log_level": "info"})
                inputs["webhook_config"] = json.dumps(hooks)
                if values["s3_endpoint_enabled"]:
                    access_key, secret = await self._credentials().issue(job_id)
                    endpoint = f"{s3_url}/api/cloud/storage"
                    inputs.update({
                        "s3_endpoint_url": endpoint,
                        "s3_bucket": creds.UPLOAD_BUCKET,
                        "s3_base_path": creds.upload_prefix(job_id),
                        "s3_region": S3_REGION,
                        "s3_access_key": access_key,
                        "s3_secret_key": secret,
                        "s3_public_base_url": f"{endpoint}/{creds.UPLOAD_BUCKET}",
                    })
                prediction = await manager.replicate.create_prediction(version, inputs, webhook=webhook)
            except (ProviderAPIError, ProviderUnavailable, ProviderNotConfigured, CircuitOpenError) as exc:
                raise await self._submission_failed(job, exc) from None
            except Exception as exc:
                log.failure("Submission of job {job_id} failed unexpectedly", job_id=job_id)
                raise await self._submission_failed(job, exc) from None

            status = st.from_replicate(prediction.get("status")) or st.QUEUED
            result = await self._transition(
                job_id, status,
                external_id=str(prediction.get("id") or "") or None,
                metadata={"prediction_urls": prediction.get("urls") or {}, "request": None,
                          "version": version})
            self.counters["submitted"] += 1
            self.publish(result.job, job["status"])
            log.info("Job {job_id} submitted to {provider} as {external_id}", job_id=job_id,
                     provider=provider, external_id=prediction.get("id"))
            return result.job

    async def _submission_failed(self, job: dict, exc: Exception) -> ApiError:
        job_id = job["job_id"]
        if isinstance(exc, ProviderAPIError):
            reason = f"Replicate rejected the job ({exc.status}): {exc.message}"
            error = ApiError(502, "provider_error", reason)
        elif isinstance(exc, CircuitOpenError):
            reason = str(exc)
            retry = max(1, int(exc.retry_after + 0.999))
            error = ApiError(503, "circuit_open", reason, headers={"Retry-After": str(retry)})
        elif isinstance(exc, ProviderUnavailable):
            reason = f"Replicate could not be reached: {exc}"
            error = ApiError(502, "provider_unavailable", reason)
        elif isinstance(exc, ProviderNotConfigured):
            reason = str(exc)
            error = ApiError(400, "provider_not_configured", reason)
        else:
            reason = "internal error while submitting the job"
            error = ApiError(500, "internal_error", reason)
        result = await self._transition(job_id, st.FAILED, error_message=reason[:2000])
        await self._revoke(job_id)
        self.publish(result.job, job["status"])
        self.counters["submit_failed"] += 1
        log.warning("Job {job_id} failed at submission: {reason}", job_id=job_id, reason=reason)
        error.extra.update({"success": False, "job_id": job_id,
                            "job_status": (result.job or job)["status"], "idempotent_hit": False,
                            "cost_limit_warning": None, "quota_warnings": []})
        return error

    # -- cost limits --------------------------------------------------------------
    async def cost_limit(self, provider: str, estimate: float = 0.0) -> costs.CostLimitCheck:
        values = self.ctx.providers.values(provider)
        period = values["cost_limit_period"]
        spent = 0.0
        if values["cost_limit_enabled"]:
            since = costs.period_start(self.ctx.now(), period)
            spent = await self.ctx.db.run_read(store.spent_since, provider, since)
        return costs.check_cost_limit(spent, enabled=values["cost_limit_enabled"],
                                      amount=values["cost_limit_amount"],
                                      action=values["cost_limit_action"], period=period,
                                      estimate=estimate)

    # -- provider updates (poller, webhooks, API) ---------------------------------
    def prices(self, provider: str) -> Mapping[str, float]:
        providers = getattr(self.ctx, "providers", None)
        if providers is None:
            return {}
        return providers.values(provider).get("gpu_prices") or {}

    def write_update(self, conn, job: dict, plan: job_updates.Plan, now: float, *, source: str,
                     actor: str = "system", ip: Optional[str] = None,
                     details: Optional[Mapping[str, Any]] = None) -> Applied:
        """Writer thread, inside the caller's transaction: write ``plan`` (made by
        :mod:`stdaemon.jobs.updates` for ``job`` as read in this transaction),
        revoke the job's upload credentials on a terminal status and append the
        ``job.status_changed`` audit entry, so all of it commits or none.
        Follow the commit with :meth:`committed`."""
        result = store.apply_plan(conn, job, plan)
        applied = Applied(job["job_id"], plan, result)
        if plan.accepted:
            if plan.terminal:
                applied.revoked = s3_store.revoke(conn, job["job_id"], now)
            entry = {"from": plan.previous, "to": plan.status, "source": source,
                     "cost_usd": (result.job or {}).get("cost_usd")}
            entry.update(details or {})
            fields = {"actor": actor, "ip": ip, "target": job["job_id"], "action": plan.status,
                      "details": entry}
            writer = getattr(self.ctx, "audit", None)
            if callable(getattr(writer, "append", None)):
                try:
                    writer.append(conn, "job.status_changed", **fields)
                except RuntimeError:  # audit key not loaded yet (start-up): record after the commit
                    applied.pending_audit = fields
            else:
                applied.pending_audit = fields
        return applied

    async def committed(self, applied: Applied) -> None:
        """Reactor thread, after the commit of :meth:`write_update`: the same
        counters, metrics figures and live event whoever wrote the change."""
        plan = applied.plan
        if plan.reason == "out_of_order":
            self.counters["out_of_order_ignored"] += 1
        elif plan.reason == "terminal":
            self.counters["terminal_ignored"] += 1
        elif plan.accepted:
            self.counters["status_changes"] += 1
        self.observe(applied.result)
        if applied.changed:
            self.publish(applied.result.job, plan.previous)
        if plan.terminal:
            # Revoked in the transaction; this also drops cached copies.
            await self._revoke(applied.job_id)
        if applied.pending_audit is not None:
            await audit(self.ctx, "job.status_changed", **applied.pending_audit)

    async def apply_status(self, job_id: str, new_status: str, *, actor: str = "system",
                           source: str = "poller", ip: Optional[str] = None, **fields) -> store.TransitionResult:
        """Apply a status (and column updates) through the guards; count what is ignored,
        revoke credentials on terminal status, audit real changes."""
        now = self.ctx.now()

        def work(conn):
            job = store.get_job(conn, job_id)
            if job is None:
                return None
            return self.write_update(conn, job, job_updates.guard(job, new_status, now, fields), now,
                                     source=source, actor=actor, ip=ip)

        applied = await self.ctx.db.run_write(work)
        if applied is None:
            return store.TransitionResult(None, False, "missing")
        await self.committed(applied)
        return applied.result

    async def apply_prediction(self, prediction: Mapping[str, Any], *, provider: str = "replicate",
                               source: str = "poller", actor: str = "system",
                               ip: Optional[str] = None) -> Optional[store.TransitionResult]:
        """Apply a Replicate prediction object (from a poll) through the one
        mapping (:func:`stdaemon.jobs.updates.plan`), as the webhook surface does.

        Returns None when no job has that prediction id."""
        external_id = prediction.get("id")
        if not isinstance(external_id, str) or not external_id:
            return None
        prices = self.prices(provider)
        now = self.ctx.now()

        def work(conn):
            job = store.find_by_external(conn, provider, external_id)
            if job is None:
                return None
            plan = job_updates.plan(job_updates.PREDICTION, prediction, job, prices, now)
            return self.write_update(conn, job, plan, now, source=source, actor=actor, ip=ip,
                                     details={"kind": job_updates.PREDICTION})

        applied = await self.ctx.db.run_write(work)
        if applied is None:
            return None
        await self.committed(applied)
        return applied.result

    async def poll_once(self) -> int:
        """Refresh active jobs from the provider (fallback for missed webhooks)."""
        self.counters["poll_runs"] += 1
        refreshed = 0
        for provider in ps.PROVIDERS:
            if self.ctx.providers.breaker(provider).state == OPEN:
                continue
            if not await self.ctx.providers.is_configured(provider):
                continue
            jobs = await self.ctx.db.run_read(store.active_jobs, provider, POLL_BATCH)
            for job in jobs:
                try:
                    prediction = await self.ctx.providers.replicate.get_prediction(job["external_id"])
                    await self.apply_prediction(prediction, provider=provider, source="poller")
                    refreshed += 1
                except CircuitOpenError:
                    break
                except ProviderAPIError as exc:
                    self.counters["poll_errors"] += 1
                    if exc.status == 404:
                        await self.apply_status(job["job_id"], st.FAILED, source="poller",
                                                error_message="prediction no longer exists at Replicate")
                except Exception:
                    self.counters["poll_errors"] += 1
                    log.failure("Polling job {job_id} failed", job_id=job["job_id"])
        return refreshed

    # -- cancel / delete / logs -----------------------------------------------
    async def cancel(self, job_id: str, principal, ip: Optional[str]) -> dict:
        job = await self.ctx.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if job["status"] in st.TERMINAL:
            raise conflict(f"Job {job_id} is already {job['status']}", code="job_terminal")
        if job["external_id"]:
            try:
                await self.ctx.providers.replicate.cancel_prediction(job["external_id"])
            except ProviderAPIError as exc:
                raise ApiError(502, "provider_error",
                               f"Replicate refused to cancel ({exc.status}): {exc.message}") from None
            except ProviderUnavailable as exc:
                raise ApiError(502, "provider_unavailable", f"Replicate could not be reached: {exc}") from None
            except CircuitOpenError as exc:
                retry = max(1, int(exc.retry_after + 0.999))
                raise ApiError(503, "circuit_open", str(exc), headers={"Retry-After": str(retry)}) from None
            except ProviderNotConfigured as exc:
                raise ApiError(400, "provider_not_configured", str(exc)) from None
        result = await self.apply_status(job_id, st.CANCELLED, actor=_actor(principal), source="api", ip=ip)
        if not result.accepted:
            latest = result.job or job
            if latest["status"] != st.CANCELLED:
                raise conflict(f"Job {job_id} is already {latest['status']}", code="job_terminal")
        await audit(self.ctx, "job.cancelled", actor=_actor(principal), ip=ip, target=job_id,
                    action="cancel", details={"provider": job["provider"], "external_id": job["external_id"]})
        return {"success": True, "job_id": job_id, "status": st.CANCELLED}

    async def delete(self, job_id: str, principal, ip: Optional[str]) -> dict:
        job = await self.ctx.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if job["status"] not in st.TERMINAL:
            raise conflict(f"Job {job_id} is {job['status']}; only completed, failed or cancelled "
                           "jobs can be deleted (cancel it first)", code="job_active")
        if await self.ctx.db.run_write(store.delete_job, job_id):
            self._track(job, None)  # leaves the status gauge; counters keep it
        await audit(self.ctx, "job.deleted", actor=_actor(principal), ip=ip, target=job_id,
                    action="delete", details={"status": job["status"]})
        return {"success": True, "job_id": job_id}

    async def logs(self, job_id: str) -> dict:
        job = await self.ctx.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if not job["external_id"]:
            return {"job_id": job_id, "logs": "", "status": job["status"]}
        try:
            text = await self.ctx.providers.replicate.get_logs(job["external_id"])
        except ProviderAPIError as exc:
            raise ApiError(502, "provider_error", f"Replicate error ({exc.status}): {exc.message}") from None
        except ProviderUnavailable as exc:
            raise ApiError(502, "provider_unavailable", f"Replicate could not be reached: {exc}") from None
        except CircuitOpenError as exc:
            retry = max(1, int(exc.retry_after + 0.999))
            raise ApiError(503, "circuit_open", str(exc), headers={"Retry-After": str(retry)}) from None
        except ProviderNotConfigured as exc:
            raise ApiError(400, "provider_not_configured", str(exc)) from None
        return {"job_id": job_id, "logs": text, "status": job["status"]}


def _known_provider(provider: str) -> str:
    if provider not in ps.PROVIDERS:
        raise not_found(f"Unknown provider {provider!r} (known: {', '.join(ps.PROVIDERS)})")
    return provider


def _submit_cap(config) -> int:
    """Body cap of submissions: ``jobs.max_submit_bytes`` (its own key, S4)."""
    return int(getattr(getattr(config, "jobs", None), "max_submit_bytes", MAX_SUBMIT_BODY))


class JobsSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/jobs", "/api/queue")

    @property
    def jobs(self) -> JobService:
        return self.ctx.jobs

    @route(app, "/api/cloud/jobs/submit", methods=("POST",), access=OPERATOR, max_body_from=_submit_cap,
           body=SubmitJob, query=SubmitQuery, error_extra={"success": False})
    async def submit(self, request, body: SubmitJob, query: SubmitQuery):
        """Submit a training job."""
        return await self._submit(request, body, query)

    @route(app, "/api/cloud/jobs", methods=("POST",), access=OPERATOR, max_body_from=_submit_cap,
           body=SubmitJob, query=SubmitQuery, error_extra={"success": False})
    async def submit_alias(self, request, body: SubmitJob, query: SubmitQuery):
        """Submit a training job (alias of /api/cloud/jobs/submit)."""
        return await self._submit(request, body, query)

    async def _submit(self, request, body: SubmitJob, query: SubmitQuery):
        provider = _known_provider(query.provider)
        return await self.jobs.submit(provider, body, request.principal, getattr(request, "client_ip", None))

    @route(app, "/api/cloud/jobs", access=VIEWER, query=ListJobs)
    async def list_jobs(self, request, query: ListJobs):
        """List jobs (newest first) with the real total."""
        if query.sync_active and request.principal.role in ("admin", "operator"):
            await self.jobs.sync_active()
        rows, total = await self.ctx.db.run_read(store.list_jobs, status=query.status, provider=query.provider,
                                                 limit=query.limit, offset=query.offset)
        return {"jobs": [self.jobs.public(r) for r in rows], "total": total, "limit": query.limit,
                "offset": query.offset}

    @route(app, "/api/cloud/jobs/<job_id>", access=VIEWER)
    async def get_job(self, request, job_id):
        job = await self.jobs.get_row(job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        public = self.jobs.public(job)
        public["upload_progress"] = self.jobs.upload_progress(job_id)
        return {"job": public, "upload_progress": public["upload_progress"], "progress": public["progress"]}

    @route(app, "/api/cloud/jobs/<job_id>/cancel", methods=("POST",), access=OPERATOR)
    async def cancel(self, request, job_id):
        return await self.jobs.cancel(job_id, request.principal, getattr(request, "client_ip", None))

    @route(app, "/api/cloud/jobs/<job_id>", methods=("DELETE",), access=OPERATOR)
    async def delete(self, request, job_id):
        return await self.jobs.delete(job_id, request.principal, getattr(request, "client_ip", None))

    @route(app, "/api/cloud/jobs/<job_id>/logs", access=VIEWER)
    async def logs(self, request, job_id):
        return await self.jobs.logs(job_id)

    @route(app, "/api/cloud/jobs/<job_id>/retry", methods=("POST",), access=OPERATOR,
           error_extra={"success": False})
    async def retry(self, request, job_id):
        """Resubmit a failed or cancelled job from its named config (SimpleTuner's ``jobs retry``).

        The new job is an ordinary submission of ``{"config_name_to_load": <the job's
        config_name>, "hardware_profile": <its profile>}``: the same checks, quotas and
        approvals; the config is read from ``/api/configs`` as it is now."""
        job = await self.ctx.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if job["status"] not in (st.FAILED, st.CANCELLED):
            raise conflict(f"Job {job_id} is {job['status']}; only failed or cancelled jobs can be retried",
                           code="job_not_retryable")
        if not job["config_name"]:
            raise conflict(f"Job {job_id} has no config name (it was submitted with an inline config); "
                           "submit it again with its config", code="no_config_name")
        profile = (job.get("metadata") or {}).get("hardware_profile") or job["hardware_type"]
        submission = validate(SubmitJob, {"config_name_to_load": job["config_name"],
                                          "hardware_profile": profile})
        answer = await self.jobs.submit(job["provider"], submission, request.principal,
                                        getattr(request, "client_ip", None))
        return dict(answer, retried_from=job_id)

    @route(app, "/api/queue/submit", methods=("POST",), access=OPERATOR, body=LocalSubmit,
           body_required=False)
    async def queue_submit(self, request, body: LocalSubmit):
        """SimpleTuner's ``jobs submit`` (local GPUs or workers): refused with the way to submit."""
        raise ApiError(409, "not_supported", "stdaemon runs training on cloud providers only (no local GPUs "
                       "or workers): save the config with PUT /api/configs/<name> and run "
                       "'simpletuner cloud jobs submit <name>'", success=False)

    @route(app, "/api/queue/stats", access=VIEWER)
    async def queue_stats(self, request):
        """SimpleTuner's ``jobs status``: the job figures the metrics use (kept in
        memory, no table scan) as its queue view.  stdaemon runs jobs on the
        provider, so there are no local GPUs or workers (``local``/``workers``
        are null) and no queue of its own: ``queue_depth`` counts the jobs
        waiting for the provider or for approval."""
        from stdaemon.approvals import store as approvals_store

        figures = self.jobs.metrics()
        by_status = {status: count for status, count in figures["by_status"].items()}
        waiting = sum(by_status.get(s, 0) for s in (st.PENDING, st.PENDING_APPROVAL, st.UPLOADING, st.QUEUED))
        # Concurrency limits are the concurrent_jobs quotas: everyone's, and the caller's.
        principal = request.principal
        quotas = [q for q in await self.ctx.db.run_read(approvals_store.quotas)
                  if q.quota_type == "concurrent_jobs"]
        everyone = [q.limit for q in quotas if q.user_id is None and q.role is None]
        mine = [q.limit for q in quotas if q.applies_to(principal.user_id, principal.role)]
        return {"queue_depth": waiting, "running": by_status.get(st.RUNNING, 0), "by_status": by_status,
                "active": figures["active"], "pending_approval": by_status.get(st.PENDING_APPROVAL, 0),
                "max_concurrent": int(min(everyone)) if everyone else None,
                "user_max_concurrent": int(min(mine)) if mine else None, "team_max_concurrent": None,
                "avg_wait_seconds": None, "enable_fair_share": False, "local": None, "workers": None}


def install(ctx: Any) -> JobService:
    """``ctx.jobs`` and the poller timer (``jobs.poll_interval``)."""
    service = JobService(ctx)
    ctx.jobs = service
    service.timer = ctx.add_timer("jobs.poll", ctx.config.jobs.poll_interval, service.poll_once)
    return service
