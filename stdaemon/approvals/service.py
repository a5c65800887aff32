"""Approvals and quotas: what the job submission path calls (S4).

``app.approvals`` (:class:`ApprovalService`) and ``app.quotas`` (:class:`QuotaService`), built in
``stdaemon.service.build_app`` after the jobs service, which they hook into there:

- ``submissions.submission_checks`` gets :meth:`ApprovalService.submission_check` (quotas first:
  block or warn; then the approval rules: hold the job for approval);
- ``submissions.hold_hooks`` gets :meth:`ApprovalService.hold_job` (a job created as
  ``pending_approval`` gets its approval request).

Approving a request dispatches the held job with the payload kept in its metadata
(:meth:`stdaemon.jobs.dispatch.Submissions.dispatch`); rejection and expiry cancel it through the
one job-update path (:meth:`stdaemon.jobs.service.JobService.apply_status`).  Pending requests
expire after ``ttl`` seconds (``approval-expiry`` reactor timer).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, TypeVar

from stdaemon.approvals import rules as rules_core
from stdaemon.approvals import store
from stdaemon.approvals.rules import QuotaResult, Usage
from stdaemon.audit.service import request_actor
from stdaemon.http.errors import ApiError, invalid_field, not_found
from stdaemon.invalid import InvalidValue
from stdaemon.jobs import store as jobs_store
from stdaemon.jobs.dispatch import Submissions
from stdaemon.jobs.service import JobService
from stdaemon.logs import get_logger
from stdaemon.store.database import Database

if TYPE_CHECKING:  # types only: the services are handed over by stdaemon.service.build_app
    from stdaemon.audit.service import AuditLog
    from stdaemon.providers.service import ProviderManager

log = get_logger("stdaemon.approvals")

DEFAULT_TTL = 86400.0
EXPIRY_INTERVAL = 60.0
BODY = 16 * 1024  # the cap of the approvals and quotas request bodies

T = TypeVar("T")


def checked(validate: Callable[[Mapping[str, Any]], T], given: Mapping[str, Any]) -> T:
    """``validate(given)``; an invalid value is answered 400 ``invalid_field`` naming its field."""
    try:
        return validate(given)
    except InvalidValue as error:
        raise invalid_field(error.field, str(error)) from None


@dataclass(frozen=True)
class ApprovalDecision:
    required: bool
    estimate_usd: float
    hardware_profile: str
    rule_id: Optional[int] = None
    rule_name: Optional[str] = None
    reason: Optional[str] = None


class ApprovalService:
    def __init__(self, db: Database, clock: Any, audit: "AuditLog", quotas: "QuotaService",
                 jobs: JobService, submissions: Submissions, providers: "ProviderManager",
                 provider_files: Mapping[str, Any], ttl: float = DEFAULT_TTL):
        self.db = db
        self.clock = clock
        self.audit = audit
        self.quotas = quotas
        self.jobs = jobs
        self.submissions = submissions
        self.providers = providers
        self.provider_files = provider_files  # the config file's ``providers`` section
        self.ttl = ttl
        # Kept current on every transition (loaded at start): metrics read
        # these without touching the database.
        self.counts: dict[str, int] = {status: 0 for status in store.REQUEST_STATUSES}

    def now(self) -> float:
        return self.clock.seconds()

    async def load(self) -> None:
        self.counts = await self.db.run_read(store.counts_by_status)

    def metrics(self) -> dict:
        """For the ``approvals`` metrics family."""
        return {"pending": self.counts.get("pending", 0), "by_status": dict(self.counts)}

    # -- rules ------------------------------------------------------------------------

    async def add_rule(self, given: Mapping[str, Any], http_request: Any) -> dict:
        """A new approval rule (``given``: a validated ``CreateRule``), audited."""
        name, condition, value = checked(rules_core.validate_rule, given)
        actor = http_request.principal.actor
        rule = await self.db.run_write(store.add_rule, name, condition, value, self.now(), actor)
        await self.audit.record_soon("approval.rule_created", **request_actor(http_request, actor),
                                     target=f"approval_rule:{rule['id']}", action="create",
                                     details={"name": name, "condition": condition, "value": value})
        return rule

    async def delete_rule(self, number: int, raw_id: str, http_request: Any) -> None:
        if not await self.db.run_write(store.delete_rule, number):
            raise not_found(f"Approval rule {raw_id} not found")
        await self.audit.record_soon("approval.rule_deleted",
                                     **request_actor(http_request, http_request.principal.actor),
                                     target=f"approval_rule:{number}", action="delete", details={})

    # -- the submission path ---------------------------------------------------------

    async def evaluate(self, principal: Any, submission: dict, estimate_usd: Optional[float] = None,
                       provider: str = "replicate",
                       hardware_profile: Optional[str] = None) -> ApprovalDecision:
        """Does this submission need approval?  ``estimate_usd`` defaults to
        ``max_runtime_minutes`` × price × GPUs (S4)."""
        profile = hardware_profile or submission.get("hardware_profile") or "h100"
        provider_settings = self.provider_files.get(provider, {}) if self.provider_files else {}
        try:
            if estimate_usd is None:
                estimate_usd = rules_core.estimate_usd(
                    submission, profile, provider_settings.get("max_runtime_minutes"),
                    provider_settings.get("gpu_prices"))
            else:
                rules_core.estimate_usd({}, profile)  # validates the profile
        except InvalidValue as error:
            raise invalid_field(error.field, str(error)) from None
        rules = await self.db.run_read(store.rules)
        rule = rules_core.first_match(rules, profile, estimate_usd)
        if rule is None:
            return ApprovalDecision(False, estimate_usd, profile)
        return ApprovalDecision(True, estimate_usd, profile, rule.id, rule.name,
                                rule.reason(profile, estimate_usd))

    async def hold(self, job_id: str, principal: Any, decision: ApprovalDecision,
                   provider: str = "replicate", details: Optional[dict] = None) -> dict:
        """Record the approval request for a job created as ``pending_approval``."""
        now = self.now()
        request = await self.db.run_write(
            store.create_request, job_id, provider, getattr(principal, "user_id", None),
            getattr(principal, "username", None), decision.rule_id, decision.rule_name,
            decision.reason or "approval required", decision.estimate_usd, now, now + self.ttl,
            dict(details or {}, hardware_profile=decision.hardware_profile))
        self.counts["pending"] = self.counts.get("pending", 0) + 1
        await self.audit.record_soon("approval.requested",
                                     actor=getattr(principal, "actor", "system"),
                                     target=f"job:{job_id}", action="hold",
                                     details={"rule": decision.rule_name, "estimate_usd": decision.estimate_usd})
        return request

    async def hold_job(self, job: dict, principal: Any) -> dict:
        """``hold`` for a job the jobs service just created as
        ``pending_approval`` (profile and estimate from its metadata)."""
        metadata = job.get("metadata") or {}
        profile = metadata.get("hardware_profile") or job.get("hardware_type") or "h100"
        estimate = float(metadata.get("estimated_cost_usd") or 0.0)
        rules = await self.db.run_read(store.rules)
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
        """The jobs' submission hook (``submissions.submission_checks``):
        quotas first (block/warn), then approval rules."""
        verdict: dict = {"block": None, "warnings": [], "pending_approval": False}
        if principal is None:
            return verdict
        quota = await self.quotas.check(principal, estimate_usd)
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
        if not profile:
            profile = self.providers.values(provider).get("hardware_profile")
        decision = await self.evaluate(principal, body, estimate_usd, provider, profile)
        verdict["pending_approval"] = verdict["pending_approval"] or decision.required
        return verdict

    # -- decisions --------------------------------------------------------------------

    async def _decide(self, request_id: int, status: str, actor: str, reason: Optional[str]) -> dict:
        current = await self.db.run_read(store.get_request, request_id)
        if current is None:
            raise ApiError(404, "not_found", f"Approval request {request_id} not found")
        decided = await self.db.run_write(store.decide, request_id, status, actor, reason,
                                              self.now())
        if decided is None:
            latest = await self.db.run_read(store.get_request, request_id)
            raise ApiError(409, "already_decided",
                           f"Approval request {request_id} is already {latest['status']}")
        self.counts["pending"] = max(0, self.counts.get("pending", 0) - 1)
        self.counts[status] = self.counts.get(status, 0) + 1
        return decided

    async def approve(self, request_id: int, principal: Any, reason: Optional[str] = None,
                      http_request: Any = None) -> dict:
        current = await self.db.run_read(store.get_request, request_id)
        if current is not None and current["status"] == "pending":
            job = await self.db.run_read(jobs_store.get_job, current["job_id"])
            if job is None or job["status"] != "pending_approval":
                # Cancelled (or deleted) while waiting: nothing left to approve.
                status = job["status"] if job else "deleted"
                await self._decide(request_id, "rejected", "system",
                                   f"the job is no longer awaiting approval ({status})")
                raise ApiError(409, "job_not_pending",
                               f"Job {current['job_id']} is {status}; it can no longer be approved")
        decided = await self._decide(request_id, "approved", principal.actor, reason)
        await self.audit.record_soon("approval.approved",
                                     **request_actor(http_request, principal.actor),
                                     target=f"job:{decided['job_id']}", action="approve",
                                     details={"request_id": request_id, "reason": reason})
        job = await self._submit(decided)
        return dict(decided, job_status=job.get("status") if job else None)

    async def _submit(self, decided: dict) -> Optional[dict]:
        """Send an approved job to its provider: the jobs' ``dispatch`` with the payload kept in
        the job's metadata."""
        job_id = decided["job_id"]
        try:
            job = await self.db.run_read(jobs_store.get_job, job_id)
            if job is None or job["status"] != "pending_approval":
                return job
            payload = (job.get("metadata") or {}).get("request") or {}
            try:
                return await self.submissions.dispatch(job, payload)
            except ApiError:
                # The jobs service recorded the failure on the job.
                return await self.db.run_read(jobs_store.get_job, job_id)
        except Exception:
            log.failure("Submitting approved job {job_id} failed", job_id=job_id)
            return await self.db.run_read(jobs_store.get_job, job_id)

    async def reject(self, request_id: int, principal: Any, reason: Optional[str] = None,
                     http_request: Any = None) -> dict:
        decided = await self._decide(request_id, "rejected", principal.actor, reason)
        await self.audit.record_soon("approval.rejected",
                                     **request_actor(http_request, principal.actor),
                                     target=f"job:{decided['job_id']}", action="reject",
                                     details={"request_id": request_id, "reason": reason})
        await self._cancel(decided["job_id"], f"Approval rejected: {reason or 'no reason given'}")
        return decided

    async def expire_due(self) -> int:
        """Timer body: expire pending requests past their deadline; their jobs
        are cancelled."""
        due = await self.db.run_read(store.due_for_expiry, self.now())
        expired = 0
        for request_id in due:
            decided = await self.db.run_write(store.decide, request_id, "expired", "system",
                                                  "approval window elapsed", self.now())
            if decided is None:
                continue  # decided meanwhile
            expired += 1
            self.counts["pending"] = max(0, self.counts.get("pending", 0) - 1)
            self.counts["expired"] = self.counts.get("expired", 0) + 1
            await self.audit.record_soon("approval.expired", actor="system",
                                         target=f"job:{decided['job_id']}", action="expire",
                                         details={"request_id": request_id})
            await self._cancel(decided["job_id"], "Approval request expired")
        if expired:
            log.info("Expired {count} approval request(s)", count=expired)
        return expired

    async def _cancel(self, job_id: str, reason: str) -> None:
        try:
            await self.jobs.apply_status(job_id, "cancelled", source="approval", error_message=reason)
        except Exception:
            log.failure("Cancelling job {job_id} after its approval ended failed", job_id=job_id)


class QuotaService:
    def __init__(self, db: Database, clock: Any, audit: "AuditLog"):
        self.db = db
        self.clock = clock
        self.audit = audit

    async def add(self, given: Mapping[str, Any], http_request: Any) -> dict:
        """A new quota (``given``: a validated ``CreateQuota``), audited."""
        quota = checked(rules_core.validate_quota, given)
        actor = http_request.principal.actor
        try:
            row = await self.db.run_write(store.add_quota, quota, self.clock.seconds(), actor)
        except LookupError:
            raise invalid_field("user_id", "no such user") from None
        await self.audit.record_soon("quota.created", **request_actor(http_request, actor),
                                     target=f"quota:{row['id']}", action="create",
                                     details=dict(quota))
        return row

    async def delete(self, number: int, raw_id: str, http_request: Any) -> None:
        if not await self.db.run_write(store.delete_quota, number):
            raise not_found(f"Quota {raw_id} not found")
        await self.audit.record_soon("quota.deleted",
                                     **request_actor(http_request, http_request.principal.actor),
                                     target=f"quota:{number}", action="delete", details={})

    async def usage(self, user_id: int) -> Usage:
        raw = await self.db.run_read(jobs_store.user_usage, user_id, self.clock.seconds())
        return Usage(**raw)

    async def status(self, principal: Any) -> dict:
        """The caller's quotas with their current usage (``GET /api/quotas/me``
        and SimpleTuner's ``GET /api/quotas/status``): each quota that applies
        with ``current_usage`` and ``percent_used``, and the raw ``usage``."""
        rows = await self.db.run_read(store.list_quotas)
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
        quotas = await self.db.run_read(store.quotas)
        applicable = [q for q in quotas if q.applies_to(principal.user_id, principal.role)]
        if not applicable:
            return QuotaResult()
        usage = await self.usage(principal.user_id)
        return rules_core.evaluate_quotas(applicable, principal.user_id, principal.role, usage,
                                          estimate_usd)
