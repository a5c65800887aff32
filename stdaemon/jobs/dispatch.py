"""Job submission (S4): checks, the job row, and dispatch to the provider.

Submission never leaves a half-created job: when the provider call fails the
job row says ``failed`` with the provider's reason and its upload credentials
are revoked before the error is answered (502; 503 with ``Retry-After`` when
the circuit breaker is open).  A submission held for approval is created as
``pending_approval`` with its payload in ``metadata["request"]``; approving it
calls :meth:`Submissions.dispatch`.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import uuid
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Mapping, Optional

from twisted.internet import defer

from stdaemon.configs.store import ConfigError
from stdaemon.http.errors import ApiError
from stdaemon.http.surface import Response
from stdaemon.invalid import InvalidValue
from stdaemon.jobs import costs
from stdaemon.jobs import status as st
from stdaemon.jobs import store
from stdaemon.jobs.models import SubmitJob
from stdaemon.jobs.service import TOKEN_HASH_KEY, TRAINER_WEBHOOK_PATH, S3_REGION, JobService, _actor
from stdaemon.logs import LogContext, get_logger
from stdaemon.outbound.breaker import OPEN
from stdaemon.providers import settings as ps
from stdaemon.providers.errors import PROVIDER_ERRORS, provider_error, retry_after_header
from stdaemon.providers.service import TOKEN_NAMES
from stdaemon.s3 import credentials as creds

if TYPE_CHECKING:  # types only: the services are handed over by stdaemon.service.build_app
    from stdaemon.configs.service import ConfigService
    from stdaemon.providers.service import ProviderManager

log = get_logger("stdaemon.jobs")

#: async fn(principal, provider, estimate_usd, body) -> {"block": str|None, "warnings": [str],
#: "pending_approval": bool, "approval_reasons": [str]} (quotas, approval rules)
SubmissionCheck = Callable[[Any, str, float, dict], Awaitable[dict]]
#: async fn(job, principal): a job was created as ``pending_approval`` (the approval request)
HoldHook = Callable[[dict, Any], Awaitable[Any]]


class Submissions:
    """Submitting jobs and dispatching them to the provider (``app.submissions``)."""

    def __init__(self, jobs: JobService, providers: "ProviderManager", configs: "ConfigService",
                 public_url: str):
        self.jobs = jobs
        self.db = jobs.db
        self.providers = providers
        self.configs = configs
        self.public_url = public_url
        # Registered by other capabilities in build_app (approvals): checked in order before a job
        # is created, and told about each job held for approval.
        self.submission_checks: list[SubmissionCheck] = []
        self.hold_hooks: list[HoldHook] = []

    def _public_urls(self, provider: str) -> tuple[str, str]:
        values = self.providers.values(provider)
        server_url = (self.public_url or "").rstrip("/")
        s3_url = (values.get("s3_public_url") or server_url).rstrip("/")
        return server_url or s3_url, s3_url

    # -- submission -------------------------------------------------------------
    async def submit(self, provider: str, submission: SubmitJob, principal, ip: Optional[str]) -> Response:
        """``submission`` has been validated (types, sizes, profile names) by the route's model."""
        manager = self.providers
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
        if resume_from is not None and await self.db.run_read(store.get_job, resume_from) is None:
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
        now = self.jobs.now()

        # An idempotent repeat answers with the existing job before any limit applies.
        if key:
            existing = await self.db.run_read(store.find_idempotent, user_id, key, now)
            if existing is not None:
                self.jobs.counters["idempotent_hits"] += 1
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
            headers = retry_after_header(breaker.retry_after())
            raise ApiError(503, "circuit_open",
                           f"{provider} is temporarily unavailable after repeated failures; "
                           f"retry in {headers['Retry-After']} s", headers=headers, success=False)

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
        job, created = await self.db.run_write(store.create_or_get, row, now)
        if created:
            self.jobs.track(None, job)
        if not created:
            self.jobs.counters["idempotent_hits"] += 1
            return self._submit_response(job, idempotent_hit=True)
        await self.jobs.audit.record_soon("job.submitted", actor=_actor(principal), ip=ip, target=job_id,
                                          action="submit", details={"provider": provider, "hardware_profile": profile,
                                                                    "config_name": config_name,
                                                                    "pending_approval": pending_approval})
        self.jobs.publish(job, None)
        if pending_approval:
            for hold in self.hold_hooks:
                await hold(job, principal)  # the approval request (stdaemon/approvals/service.py)
            return self._submit_response(job, cost_warning=limit.warning, quota_warnings=warnings)

        job = await self.dispatch(job, request_payload)
        return self._submit_response(job, cost_warning=limit.warning, quota_warnings=warnings)

    async def _stored_config(self, name: Any) -> dict:
        try:
            stored = await self.configs.get(name)
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
        manager = self.providers
        try:
            version, _source = await manager.resolve_version(provider, profile)
            return version
        except PROVIDER_ERRORS as exc:
            model = manager.model_id(provider, profile)
            raise provider_error(exc, f"Could not resolve the Replicate version of {model}",
                                 success=False) from None

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
            "job": self.jobs.public(job),
        }

    async def dispatch(self, job: dict, request: Mapping[str, Any]) -> dict:
        """Issue upload credentials and create the prediction; on failure the job
        is marked failed (reason kept), credentials revoked, and an ApiError raised."""
        provider = job["provider"]
        job_id = job["job_id"]
        manager = self.providers
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
                await self.jobs.transition(job_id, job["status"], metadata={
                    TOKEN_HASH_KEY: hashlib.sha256(webhook_token.encode()).hexdigest()})
                hooks = [{"webhook_type": "raw", "callback_url": f"{public_url}{TRAINER_WEBHOOK_PATH}",
                          "auth_token": webhook_token, "log_level": "info"}]
                if request.get("webhook_url"):
                    hooks.append({"webhook_type": "raw", "callback_url": request["webhook_url"],
                                  "log_level": "info"})
                inputs["webhook_config"] = json.dumps(hooks)
                if values["s3_endpoint_enabled"]:
                    access_key, secret = await self.jobs.credentials.issue(job_id)
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
            except PROVIDER_ERRORS as exc:
                raise await self._submission_failed(job, exc) from None
            except Exception as exc:
                log.failure("Submission of job {job_id} failed unexpectedly", job_id=job_id)
                raise await self._submission_failed(job, exc) from None

            status = st.from_replicate(prediction.get("status")) or st.QUEUED
            result = await self.jobs.transition(
                job_id, status,
                external_id=str(prediction.get("id") or "") or None,
                metadata={"prediction_urls": prediction.get("urls") or {}, "request": None,
                          "version": version})
            self.jobs.counters["submitted"] += 1
            self.jobs.publish(result.job, job["status"])
            log.info("Job {job_id} submitted to {provider} as {external_id}", job_id=job_id,
                     provider=provider, external_id=prediction.get("id"))
            return result.job

    async def _submission_failed(self, job: dict, exc: Exception) -> ApiError:
        job_id = job["job_id"]
        if isinstance(exc, PROVIDER_ERRORS):
            error = provider_error(exc, "Replicate rejected the job")
        else:
            error = ApiError(500, "internal_error", "internal error while submitting the job")
        reason = error.detail
        result = await self.jobs.transition(job_id, st.FAILED, error_message=reason[:2000])
        await self.jobs.revoke_credentials(job_id)
        self.jobs.publish(result.job, job["status"])
        self.jobs.counters["submit_failed"] += 1
        log.warning("Job {job_id} failed at submission: {reason}", job_id=job_id, reason=reason)
        error.extra.update({"success": False, "job_id": job_id,
                            "job_status": (result.job or job)["status"], "idempotent_hit": False,
                            "cost_limit_warning": None, "quota_warnings": []})
        return error

    # -- cost limits --------------------------------------------------------------
    async def cost_limit(self, provider: str, estimate: float = 0.0) -> costs.CostLimitCheck:
        values = self.providers.values(provider)
        period = values["cost_limit_period"]
        spent = 0.0
        if values["cost_limit_enabled"]:
            since = costs.period_start(self.jobs.now(), period)
            spent = await self.db.run_read(store.spent_since, provider, since)
        return costs.check_cost_limit(spent, enabled=values["cost_limit_enabled"],
                                      amount=values["cost_limit_amount"],
                                      action=values["cost_limit_action"], period=period,
                                      estimate=estimate)

