"""Jobs (S4): the job lifecycle, one :class:`JobService` per daemon (``app.jobs``).

Every provider update (poller, webhooks) and API status change goes through
one path: the pure mapping and guards of :mod:`stdaemon.jobs.updates`,
:meth:`JobService.write_update` inside the caller's transaction (row,
credential revocation, audit entry) and :meth:`JobService.committed` after the
commit (counters, metrics figures, live event).  Submission and dispatch to the
provider are :mod:`stdaemon.jobs.dispatch`; the HTTP API is :mod:`stdaemon.jobs.http`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

from stdaemon.jobs import status as st
from stdaemon.jobs import store
from stdaemon.jobs import updates as job_updates
from stdaemon.logs import get_logger
from stdaemon.metrics.service import Metrics
from stdaemon.outbound.breaker import OPEN, CircuitOpenError
from stdaemon.providers import settings as ps
from stdaemon.providers.errors import PROVIDER_ERRORS, provider_error
from stdaemon.providers.replicate import ProviderAPIError
from stdaemon.http.errors import conflict, not_found
from stdaemon.s3 import credentials as creds, store as s3_store
from stdaemon.store.database import Database
from stdaemon.timestamps import iso

if TYPE_CHECKING:  # types only: the services are handed over by stdaemon.service.build_app
    from stdaemon.audit.service import AuditLog
    from stdaemon.events.service import EventBus
    from stdaemon.providers.service import ProviderManager

log = get_logger("stdaemon.jobs")

# ``GET /api/cloud/jobs?sync_active=1`` refreshes active jobs from the provider at most this often
# (seconds on the injected clock), whoever asks; viewers cannot trigger it at all.
SYNC_MIN_INTERVAL = 15.0
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
    """Job lifecycle; one per daemon (``app.jobs``)."""

    def __init__(self, db: Database, clock: Any, providers: "ProviderManager", audit: "AuditLog",
                 metrics: Metrics, events: "EventBus", credentials: creds.UploadCredentials):
        self.db = db
        self.clock = clock
        self.providers = providers
        self.audit = audit
        self.metrics_hooks = metrics
        self.events = events
        self.credentials = credentials
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
        self.timer = None  # the "jobs.poll" SafeTimerService (set by build_app)
        self.stats = {"by_status": {status: 0 for status in st.STATUSES}, "cost_usd_total": 0.0,
                      "created_total": 0, "durations": 0, "duration_seconds_total": 0.0}
        self._rows: dict[str, list] = {}  # hot job rows (get_row): id → [epoch, row, public base or None]
        self._last_sync: Optional[float] = None

    async def sync_active(self) -> bool:
        """A provider refresh of the active jobs on request, at most once per
        :data:`SYNC_MIN_INTERVAL` (each refresh costs one provider call per active job)."""
        now = self.clock.seconds()
        if self._last_sync is not None and now - self._last_sync < SYNC_MIN_INTERVAL:
            return False
        self._last_sync = now
        await self.poll_once()
        return True

    # -- helpers ---------------------------------------------------------------
    def now(self) -> float:
        return self.clock.seconds()

    def public(self, job: dict) -> dict:
        """A job as the API shows it: times ISO 8601 (S18) and the fields
        SimpleTuner's CLI reads (``job_type``, ``is_terminal``, ``is_active``,
        ``finished_at`` = ``completed_at``, ``duration_seconds``)."""
        out = self._public_base(job)
        out["duration_seconds"] = self._duration(job)
        return out

    def _public_base(self, job: dict) -> dict:
        """Everything :meth:`public` shows but the duration (which moves with the clock while the
        job runs): computed once per kept row by :meth:`get_public`."""
        out = dict(job)
        for name in ("created_at", "started_at", "completed_at"):
            out[name] = iso(job.get(name))
        out["finished_at"] = out["completed_at"]
        out["job_type"] = "cloud"
        out["is_terminal"] = job["status"] in st.TERMINAL
        out["is_active"] = job["status"] in st.ACTIVE
        out["duration_seconds"] = None    # set per answer (keeps its place in the JSON)
        metadata = dict(job.get("metadata") or {})
        metadata.pop("request", None)  # a pending submission's payload is not echoed
        metadata.pop(TOKEN_HASH_KEY, None)  # the trainer's webhook token hash stays private
        out["metadata"] = metadata
        out["progress"] = metadata.get("progress")  # latest trainer progress (step, epoch, loss, lr, eta)
        out["hardware_profile"] = metadata.get("hardware_profile", job.get("hardware_type"))
        out.pop("idempotency_key", None)
        return out

    def _duration(self, job: dict) -> Optional[float]:
        end = job.get("completed_at") or (None if job["status"] in st.TERMINAL else self.now())
        return round(end - job["started_at"], 3) if job.get("started_at") and end else None

    async def get_public(self, job_id: str) -> Optional[dict]:
        """:meth:`public` of :meth:`get_row`, the ISO times and metadata worked out once per kept
        row. The answer is the caller's; nested values (``metadata``, ``progress``) are shared
        with later answers of the same row and must not be changed."""
        row = await self.get_row(job_id)
        if row is None:
            return None
        kept = self._rows.get(job_id)
        if kept is not None and kept[1] is row:
            if kept[2] is None:
                kept[2] = self._public_base(row)
            out = dict(kept[2])
        else:
            out = self._public_base(row)
        out["duration_seconds"] = self._duration(row)
        return out

    # -- hot job rows ---------------------------------------------------------------------------
    async def get_row(self, job_id: str) -> Optional[dict]:
        """The job row, from memory when nothing was written since it was read.

        A row read on a reader thread is kept while ``db.write_epoch`` stays what it was when
        the read started: any write of this process (each job change goes through the one writer,
        ``write_update`` included), a restore, or a job change by another process seen by the
        ``change-counters`` timer (triggers bump it) moves the epoch, and the next read goes to
        SQLite again. Bounded (``ROW_CACHE_SIZE`` ids, oldest dropped first). The row is shared:
        callers must not change it (``public`` copies). With a shared database (several instances)
        nothing is kept: a job acknowledged by one instance is seen at once by every other."""
        db = self.db
        if db.shared:
            # Another instance may have changed the row a moment ago (its webhook, its poller):
            # a row kept here would be seen for up to the counters' poll interval. Read it.
            return await db.run_read(store.get_job, job_id)
        epoch = db.write_epoch
        rows = self._rows
        kept = rows.get(job_id)
        if kept is not None and kept[0] == epoch:
            return kept[1]
        row = await db.run_read(store.get_job, job_id)
        if row is not None and db.write_epoch == epoch:
            rows.pop(job_id, None)
            while len(rows) >= ROW_CACHE_SIZE:
                del rows[next(iter(rows))]
            rows[job_id] = [epoch, row, None]
        return row

    # -- incrementally kept figures for metrics (no table scan per scrape) ------
    async def load(self) -> None:
        """Start-up: one pass over the jobs table for the running totals."""
        self.stats = await self.db.run_read(store.stats)

    def track(self, before: Optional[dict], after: Optional[dict]) -> None:
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
        provider spend stay exact.  Goes through ``metrics.job_changed``,
        which forwards to :meth:`track` once this service owns the figures."""
        if result is None:
            return
        before, after = result.before, result.job
        if before is None or after is None or after is before or dict(after) == dict(before):
            return
        metrics = self.metrics_hooks
        metrics.job_changed(before, after)
        if metrics._jobs_track == self.track:
            return
        self.track(before, after)

    async def transition(self, job_id: str, new_status: str, **fields) -> store.TransitionResult:
        result = await self.db.run_write(store.transition, job_id, new_status, self.now(), **fields)
        self.observe(result)
        return result

    def publish(self, job: Optional[dict], previous: Optional[str] = None) -> None:
        """Live event for SSE clients (``events``, stdaemon/events/service.py); never fails the caller."""
        if job is None:
            return
        try:
            data = dict(job)
            data["progress"] = (job.get("metadata") or {}).get("progress")
            if previous is not None:
                data["previous_status"] = previous
            self.events.publish(data)
        except Exception:
            log.failure("Publishing job {job_id} failed", job_id=job.get("job_id"))

    async def revoke_credentials(self, job_id: str) -> None:
        try:
            await self.credentials.revoke(job_id)
        except Exception:
            log.failure("Could not revoke upload credentials of job {job_id}", job_id=job_id)

    # -- provider updates (poller, webhooks, API) ---------------------------------
    def prices(self, provider: str) -> Mapping[str, float]:
        return self.providers.values(provider).get("gpu_prices") or {}

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
            try:
                self.audit.append(conn, "job.status_changed", **fields)
            except RuntimeError:  # audit key not loaded yet (start-up): record after the commit
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
            # Revoked in the transaction (``write_update``): only the kept copies are dropped here,
            # with no second write transaction (and fsync) per terminal update.
            self.credentials.forget_job(applied.job_id)
        if applied.pending_audit is not None:
            await self.audit.record_soon("job.status_changed", **applied.pending_audit)

    async def apply_status(self, job_id: str, new_status: str, *, actor: str = "system",
                           source: str = "poller", ip: Optional[str] = None, **fields) -> store.TransitionResult:
        """Apply a status (and column updates) through the guards; count what is ignored,
        revoke credentials on terminal status, audit real changes."""
        now = self.now()

        def work(conn):
            job = store.get_job(conn, job_id)
            if job is None:
                return None
            return self.write_update(conn, job, job_updates.guard(job, new_status, now, fields), now,
                                     source=source, actor=actor, ip=ip)

        applied = await self.db.run_write(work)
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
        now = self.now()

        def work(conn):
            job = store.find_by_external(conn, provider, external_id)
            if job is None:
                return None
            plan = job_updates.plan(job_updates.PREDICTION, prediction, job, prices, now)
            return self.write_update(conn, job, plan, now, source=source, actor=actor, ip=ip,
                                     details={"kind": job_updates.PREDICTION})

        applied = await self.db.run_write(work)
        if applied is None:
            return None
        await self.committed(applied)
        return applied.result

    async def poll_once(self) -> int:
        """Refresh active jobs from the provider (fallback for missed webhooks)."""
        self.counters["poll_runs"] += 1
        refreshed = 0
        for provider in ps.PROVIDERS:
            if self.providers.breaker(provider).state == OPEN:
                continue
            if not await self.providers.is_configured(provider):
                continue
            jobs = await self.db.run_read(store.active_jobs, provider, POLL_BATCH)
            for job in jobs:
                try:
                    prediction = await self.providers.replicate.get_prediction(job["external_id"])
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
        job = await self.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if job["status"] in st.TERMINAL:
            raise conflict(f"Job {job_id} is already {job['status']}", code="job_terminal")
        if job["external_id"]:
            try:
                await self.providers.replicate.cancel_prediction(job["external_id"])
            except PROVIDER_ERRORS as exc:
                raise provider_error(exc, "Replicate refused to cancel") from None
        result = await self.apply_status(job_id, st.CANCELLED, actor=_actor(principal), source="api", ip=ip)
        if not result.accepted:
            latest = result.job or job
            if latest["status"] != st.CANCELLED:
                raise conflict(f"Job {job_id} is already {latest['status']}", code="job_terminal")
        await self.audit.record_soon("job.cancelled", actor=_actor(principal), ip=ip, target=job_id,
                                     action="cancel", details={"provider": job["provider"], "external_id": job["external_id"]})
        return {"success": True, "job_id": job_id, "status": st.CANCELLED}

    async def delete(self, job_id: str, principal, ip: Optional[str]) -> dict:
        job = await self.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if job["status"] not in st.TERMINAL:
            raise conflict(f"Job {job_id} is {job['status']}; only completed, failed or cancelled "
                           "jobs can be deleted (cancel it first)", code="job_active")
        if await self.db.run_write(store.delete_job, job_id):
            self.track(job, None)  # leaves the status gauge; counters keep it
        await self.audit.record_soon("job.deleted", actor=_actor(principal), ip=ip, target=job_id,
                                     action="delete", details={"status": job["status"]})
        return {"success": True, "job_id": job_id}

    async def logs(self, job_id: str) -> dict:
        job = await self.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if not job["external_id"]:
            return {"job_id": job_id, "logs": "", "status": job["status"]}
        try:
            text = await self.providers.replicate.get_logs(job["external_id"])
        except PROVIDER_ERRORS as exc:
            raise provider_error(exc) from None
        return {"job_id": job_id, "logs": text, "status": job["status"]}

