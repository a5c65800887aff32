"""Approvals and quotas: what the job submission path calls (S4).

``install(ctx)`` sets ``ctx.approvals`` (:class:`ApprovalService`) and
``ctx.quotas`` (:class:`QuotaService`).  The submission handler does::

    quota = await ctx.quotas.check(principal, estimate_usd)
    if not quota.allowed:
        → refuse (403 "quota_exceeded", quota.detail); else add quota.warnings to
          the response's ``quota_warnings``
    decision = await ctx.approvals.evaluate(principal, submission, estimate_usd)
    if decision.required:
        create the job with status ``pending_approval`` (no provider call yet)
        await ctx.approvals.hold(job_id, principal, decision, provider=...)
    ctx.events.publish(job_dict)

and registers what approval and rejection do to its jobs::

    ctx.approvals.set_handlers(submit=async fn(job_id, request_dict),
                               cancel=async fn(job_id, reason))

Without handlers, approval moves the job ``pending_approval → pending`` and
rejection/expiry moves it to ``cancelled`` directly in the ``jobs`` table
(guarded) and publishes the change.  Pending requests expire after ``ttl``
seconds (``approval-expiry`` reactor timer) → the job is cancelled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Awaitable, Callable, Optional

from stdaemon.approvals import rules as rules_core
from stdaemon.approvals.rules import QuotaResult, Usage
from stdaemon.http.errors import ApiError, invalid_field
from stdaemon.logs import get_logger
from stdaemon.users.sessions import record_audit
from stdaemon.approvals import store
from stdaemon.invalid import InvalidValue

log = get_logger("stdaemon.approvals")

DEFAULT_TTL = 86400.0
EXPIRY_INTERVAL = 60.0


@dataclass(frozen=True)
class ApprovalDecision:
    required: bool
    estimate_usd: float
    hardware_profile: str
    rule_id: Optional[int] = None
    rule_name: Optional[str] = None
    reason: Optional[str] = None


SubmitHandler = Callable[[str, dict], Awaitable[Any]]
CancelHandler = Callable[[str, str], Awaitable[Any]]


class ApprovalService:
    def __init__(self, ctx: Any, ttl: float = DEFAULT_TTL):
        self.ctx = ctx
        self.ttl = ttl
        self.submit_handler: Optional[SubmitHandler] = None
        self.cancel_handler: Optional[CancelHandler] = None
        # Kept current on every transition (loaded at start): metrics read
        # these without touching the database.
        self.counts: dict[str, int] = {status: 0 for status in store.REQUEST_STATUSES}

    def set_handlers(self, submit: Optional[SubmitHandler] = None,
                     cancel: Optional[CancelHandler] = None) -> None:
        if submit is not None:
            self.submit_handler = submit
        if cancel is not None:
            self.cancel_handler = cancel

    async def load(self) -> None:
        self.counts = await self.ctx.db.run_read(store.counts_by_status)

    def metrics(self) -> dict:
        """For the ``approvals`` metrics family."""
        return {"pending": self.counts.get("pending", 0), "by_status": dict(self.counts)}

    # -- the submission path ---------------------------------------------------------

    async def evaluate(self, principal: Any, submission: dict, estimate_usd: Optional[float] = None,
                       provider: str = "replicate",
                       hardware_profile: Optional[str] = None) -> ApprovalDecision:
        """Does this submission need approval?  ``estimate_usd`` defaults to
        ``max_runtime_minutes`` × price × GPUs (S4)."""
        profile = hardware_profile or submission.get("hardware_profile") or "h100"
        provider_settings = self.ctx.config.providers.get(provider, {}) if self.ctx.config.providers else {}
        try:
            if estimate_usd is None:
                estimate_usd = rules_core.estimate_usd(
                    submission, profile, provider_settings.get("max_runtime_minutes"),
                    provider_settings.get("gpu_prices"))
            else:
                rules_core.estimate_usd({}, profile)  # validates the profile
        except InvalidValue as error:
            raise invalid_field(error.field, str(error)) from None
        rules = await self.ctx.db.run_read(store.rules)
        rule = rules_core.first_match(rules, profile, estimate_usd)
        if rule is None:
            return ApprovalDecision(False, estimate_usd, profile)
        return ApprovalDecision(True, estimate_usd, profile, rule.id, rule.name,
                                rule.reason(profile, estimate_usd))

    async def hold(self, job_id: str, principal: Any, decision: ApprovalDecision,
                   provider: str = "replicate", details: Optional[dict] = None) -> dict:
        """Record the approval request for a job created as ``pending_approval``."""
        now = self.ctx.now()
        request = await self.ctx.db.run_write(
            store.create_request, job_id, provider, getattr(principal, "user_id", None),
            getattr(principal, "username", None), decision.rule_id, decision.rule_name,
            decision.reason or "approval required", decision.estimate_usd, now, now + self.ttl,
            dict(details or {}, hardware_profile=decision.hardware_profile))
        self.counts["pending"] = self.counts.get("pending", 0) + 1
        await record_audit(self.ctx, "approval.requested", actor=getattr(principal, "actor", "system"),
                           target=f"job:{job_id}", action="hold",
                           details={"rule": decision.rule_name, "estimate_usd": decision.estimate_usd})
        return request

    async def hold_job(self, job: dict, principal: Any) -> dict:
        """``hold`` for a job the jobs service just created as
        ``pending_approval`` (profile and estimate from its metadata)."""
        metadata = job.get("metadata") or {}
        profile = metadata.get("hardware_profile") or job.get("hardware_type") or "h100"
        estimate = float(metadata.get("estimated_cost_usd") or 0.0)
        rules = await self.ctx.db.run_read(store.rules)
        rule = rules_core.first_match(rules, profile, estimate)
        # Why it is held: the matching rule and/or what the submission path
        # recorded (a ``require_approval`` quota or cost limit).
        reasons = [rule.reason(profile, estimate)] if rule else []
        reasons += [r for r in metadata.get("approval_reasons") or [] if isinstance(r, str)]
        decision = ApprovalDecision(
            True, estimate, profile, rule.id if rule else None, rule.name if rule else None,
            "; ".join(reasons) or "approval required")
        return await self.hold(job["job_id"], principal, decision, provider=job.get("provider", "replicate"),
                               details={"config_name": job.get("config_name")})

    async def submission_check(self, principal: Any, provider: str, estimate_usd: float,
                               body: dict) -> dict:
        """The jobs service's submission hook (``ctx.jobs.submission_checks``):
        quotas first (block/warn), then approval rules."""
        verdict: dict = {"block": None, "warnings": [], "pending_approval": False}
        if principal is None:
            return verdict
        quota = await self.ctx.quotas.check(principal, estimate_usd)
        verdict["warnings"] = list(quota.warnings)
        if not quota.allowed:
            verdict["block"] = "Quota exceeded: " + "; ".join(quota.blocked)
            return verdict
        if quota.approval:
            # A ``require_approval`` quota holds the submission (the job
            # service keeps the reasons for :meth:`hold_job`).
            verdict["pending_approval"] = True
            verdict["approval_reasons"] = list(quota.approval)
        profile = body.get("hardware_profile")
        providers = getattr(self.ctx, "providers", None)
        if not profile and providers is not None and hasattr(providers, "values"):
            profile = providers.values(provider).get("hardware_profile")
        decision = await self.evaluate(principal, body, estimate_usd, provider, profile)
        verdict["pending_approval"] = verdict["pending_approval"] or decision.required
        return verdict

    # -- decisions --------------------------------------------------------------------

    async def _decide(self, request_id: int, status: str, actor: str, reason: Optional[str]) -> dict:
        current = await self.ctx.db.run_read(store.get_request, request_id)
        if current is None:
            raise ApiError(404, "not_found", f"Approval request {request_id} not found")
        decided = await self.ctx.db.run_write(store.decide, request_id, status, actor, reason,
                                              self.ctx.now())
        if decided is None:
            latest = await self.ctx.db.run_read(store.get_request, request_id)
            raise ApiError(409, "already_decided",
                           f"Approval request {request_id} is already {latest['status']}")
        self.counts["pending"] = max(0, self.counts.get("pending", 0) - 1)
        self.counts[status] = self.counts.get(status, 0) + 1
        return decided

    async def approve(self, request_id: int, principal: Any, reason: Optional[str] = None,
                      http_request: Any = None) -> dict:
        current = await self.ctx.db.run_read(store.get_request, request_id)
        if current is not None and current["status"] == "pending":
            job = await self.ctx.db.run_read(store.job_row, current["job_id"])
            if job is None or job["status"] != "pending_approval":
                # Cancelled (or deleted) while waiting: nothing left to approve.
                status = job["status"] if job else "deleted"
                await self._decide(request_id, "rejected", "system",
                                   f"the job is no longer awaiting approval ({status})")
                raise ApiError(409, "job_not_pending",
                               f"Job {current['job_id']} is {status}; it can no longer be approved")
        decided = await self._decide(request_id, "approved", principal.actor, reason)
        await record_audit(self.ctx, "approval.approved", http_request, actor=principal.actor,
                           target=f"job:{decided['job_id']}", action="approve",
                           details={"request_id": request_id, "reason": reason})
        job = await self._submit(decided)
        return dict(decided, job_status=job.get("status") if job else None)

    async def _submit(self, decided: dict) -> Optional[dict]:
        """Send an approved job to its provider: the registered handler, else
        the jobs service's ``dispatch`` with the payload kept in the job's
        metadata, else (no jobs module) ``pending_approval → pending``."""
        job_id = decided["job_id"]
        try:
            if self.submit_handler is not None:
                await self.submit_handler(job_id, decided)
                return await self.ctx.db.run_read(store.job_row, job_id)
            jobs = getattr(self.ctx, "jobs", None)
            if jobs is not None and hasattr(jobs, "dispatch"):
                from stdaemon.jobs import store as jobs_store

                job = await self.ctx.db.run_read(jobs_store.get_job, job_id)
                if job is None or job["status"] != "pending_approval":
                    return job
                payload = (job.get("metadata") or {}).get("request") or {}
                try:
                    return await jobs.dispatch(job, payload)
                except ApiError:
                    # The jobs service recorded the failure on the job.
                    return await self.ctx.db.run_read(store.job_row, job_id)
        except Exception:
            log.failure("Submitting approved job {job_id} failed", job_id=job_id)
            return await self.ctx.db.run_read(store.job_row, job_id)
        job = await self.ctx.db.run_write(store.move_job, job_id, "pending", self.ctx.now())
        self._publish(job, "pending_approval")
        return job

    async def reject(self, request_id: int, principal: Any, reason: Optional[str] = None,
                     http_request: Any = None) -> dict:
        decided = await self._decide(request_id, "rejected", principal.actor, reason)
        await record_audit(self.ctx, "approval.rejected", http_request, actor=principal.actor,
                           target=f"job:{decided['job_id']}", action="reject",
                           details={"request_id": request_id, "reason": reason})
        await self._cancel(decided["job_id"], f"Approval rejected: {reason or 'no reason given'}")
        return decided

    async def expire_due(self) -> int:
        """Timer body: expire pending requests past their deadline; their jobs
        are cancelled."""
        due = await self.ctx.db.run_read(store.due_for_expiry, self.ctx.now())
        expired = 0
        for request_id in due:
            decided = await self.ctx.db.run_write(store.decide, request_id, "expired", "system",
                                                  "approval window elapsed", self.ctx.now())
            if decided is None:
                continue  # decided meanwhile
            expired += 1
            self.counts["pending"] = max(0, self.counts.get("pending", 0) - 1)
            self.counts["expired"] = self.counts.get("expired", 0) + 1
            await record_audit(self.ctx, "approval.expired", actor="system",
                               target=f"job:{decided['job_id']}", action="expire",
                               details={"request_id": request_id})
            await self._cancel(decided["job_id"], "Approval request expired")
        if expired:
            log.info("Expired {count} approval request(s)", count=expired)
        return expired

    async def _cancel(self, job_id: str, reason: str) -> None:
        jobs = getattr(self.ctx, "jobs", None)
        handler = self.cancel_handler
        if handler is None and jobs is not None and hasattr(jobs, "apply_status"):
            async def handler(job_id: str, reason: str) -> None:
                await jobs.apply_status(job_id, "cancelled", source="approval",
                                        error_message=reason)
        if handler is not None:
            try:
                await handler(job_id, reason)
            except Exception:
                log.failure("Cancelling job {job_id} after its approval ended failed", job_id=job_id)
            return
        job = await self.ctx.db.run_write(store.move_job, job_id, "cancelled", self.ctx.now(), reason)
        self._publish(job, "pending_approval")

    def _publish(self, job: Optional[dict], previous: str) -> None:
        events = getattr(self.ctx, "events", None)
        if job is not None and events is not None:
            events.publish(dict(job, previous_status=previous))


class QuotaService:
    def __init__(self, ctx: Any):
        self.ctx = ctx

    async def usage(self, user_id: int) -> Usage:
        raw = await self.ctx.db.run_read(store.usage, user_id, self.ctx.now())
        return Usage(**raw)

    async def status(self, principal: Any) -> dict:
        """The caller's quotas with their current usage (``GET /api/quotas/me``
        and SimpleTuner's ``GET /api/quotas/status``): each quota that applies
        with ``current_usage`` and ``percent_used``, and the raw ``usage``."""
        rows = await self.ctx.db.run_read(store.list_quotas)
        usage = await self.usage(principal.user_id)
        applicable = []
        for row in rows:
            quota = rules_core.Quota(row["id"], row["quota_type"], row["limit"], row["action"],
                                     row["user_id"], row["role"])
            if not quota.applies_to(principal.user_id, principal.role):
                continue
            current = rules_core.usage_of(quota.quota_type, usage)
            percent = (current / quota.limit * 100.0) if quota.limit > 0 else 0.0
            applicable.append(dict(row, current_usage=current, percent_used=round(percent, 2),
                                   is_exceeded=current >= quota.limit if quota.limit > 0 else current > 0,
                                   is_warning=percent >= rules_core.WARN_FRACTION * 100.0))
        return {"user_id": principal.user_id, "quotas": applicable, "usage": asdict(usage)}

    async def check(self, principal: Any, estimate_usd: float = 0.0) -> QuotaResult:
        """May ``principal`` start one more job costing about ``estimate_usd``?
        ``allowed`` False when a blocking quota would be exceeded; ``warnings``
        go into the submission response's ``quota_warnings``."""
        quotas = await self.ctx.db.run_read(store.quotas)
        applicable = [q for q in quotas if q.applies_to(principal.user_id, principal.role)]
        if not applicable:
            return QuotaResult()
        usage = await self.usage(principal.user_id)
        return rules_core.evaluate_quotas(applicable, principal.user_id, principal.role, usage,
                                          estimate_usd)


def install(ctx: Any) -> ApprovalService:
    service = ApprovalService(ctx)
    ctx.approvals = service
    ctx.quotas = QuotaService(ctx)
    ctx.add_timer("approval-expiry", EXPIRY_INTERVAL, service.expire_due)
    jobs = getattr(ctx, "jobs", None)
    if jobs is not None and hasattr(jobs, "submission_checks"):
        jobs.submission_checks.append(service.submission_check)
    return service
