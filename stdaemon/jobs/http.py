"""Jobs (S4): the HTTP API over :class:`stdaemon.jobs.service.JobService` (``app.jobs``) and
:class:`stdaemon.jobs.dispatch.Submissions` (``app.submissions``): submission to Replicate, listing,
cancel, delete, logs -- also the paths SimpleTuner's CLI calls (it sends ``X-API-Key`` and reads
``detail`` from error bodies).
"""

from __future__ import annotations

from klein import Klein

from stdaemon.approvals import store as approvals_store
from stdaemon.http.errors import ApiError, conflict, not_found
from stdaemon.http.surface import OPERATOR, VIEWER, Surface, route
from stdaemon.http.validation import validate
from stdaemon.jobs import status as st
from stdaemon.jobs import store
from stdaemon.jobs.dispatch import Submissions
from stdaemon.jobs.models import ListJobs, LocalSubmit, SubmitJob, SubmitQuery
from stdaemon.jobs.service import JobService
from stdaemon.logs import get_logger
from stdaemon.providers import settings as ps

__all__ = ["JobsSurface", "ListJobs", "LocalSubmit", "SubmitJob", "SubmitQuery"]

log = get_logger("stdaemon.jobs")

MAX_SUBMIT_BODY = 8 * 1024 * 1024


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

    @property
    def submissions(self) -> Submissions:
        return self.ctx.submissions

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
        return await self.submissions.submit(provider, body, request.principal, getattr(request, "client_ip", None))

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
        public = await self.jobs.get_public(job_id)
        if public is None:
            raise not_found(f"Job {job_id} not found")
        public["upload_progress"] = self._upload_progress(job_id)
        return {"job": public, "upload_progress": public["upload_progress"], "progress": public["progress"]}

    def _upload_progress(self, job_id: str) -> dict:
        """S8 progress from the storage capability (``app.upload_progress``)."""
        try:
            return self.ctx.upload_progress.snapshot(job_id)
        except Exception:
            log.failure("upload_progress failed for {job_id}", job_id=job_id)
        return {"objects_completed": 0, "bytes_received": 0, "in_flight": []}

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
        answer = await self.submissions.submit(job["provider"], submission, request.principal,
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
