"""Upload progress per job, in memory (S8): what ``GET /api/cloud/jobs/{id}`` shows as
``upload_progress`` and what the S3 metrics count."""

from __future__ import annotations

from typing import Any

from stdaemon.timestamps import iso


class UploadProgress:
    """Per-job upload progress (``app.upload_progress``) for ``GET /api/cloud/jobs/{id}``.

    ``snapshot(job_id)`` → ``{objects_completed, bytes_received, in_flight: [{key, bytes_received,
    started_at}]}``. Also keeps totals for metrics (``uploads_total``, ``upload_bytes_total``).
    Only authenticated uploads are counted, against the job whose credential sent them (an
    operator's upload counts for the job whose prefix it writes to): the sink that reports here
    exists only once the request was admitted. A job whose only uploads failed is forgotten.
    """

    def __init__(self, clock: Any):
        self.clock = clock
        self._jobs: dict[str, dict] = {}
        self._next = 0
        self.uploads_total = 0
        self.upload_bytes_total = 0
        self.upload_failures_total = 0

    def _job(self, job_id: str) -> dict:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = {"objects_completed": 0, "bytes_received": 0, "in_flight": {}}
        return job

    def start(self, job_id: str, key: str) -> int:
        self._next += 1
        self._job(job_id)["in_flight"][self._next] = {"key": key, "bytes_received": 0,
                                                      "started_at": self.clock.seconds()}
        return self._next

    def add(self, job_id: str, token: int, count: int) -> None:
        entry = self._job(job_id)["in_flight"].get(token)
        if entry is not None:
            entry["bytes_received"] += count

    def finish(self, job_id: str, token: int, stored_bytes: int = 0, object_completed: bool = False,
               failed: bool = False) -> None:
        job = self._job(job_id)
        job["in_flight"].pop(token, None)
        if failed:
            self.upload_failures_total += 1
            if not job["in_flight"] and not job["objects_completed"] and not job["bytes_received"]:
                del self._jobs[job_id]  # a failed first upload leaves nothing behind
            return
        job["bytes_received"] += stored_bytes
        self.upload_bytes_total += stored_bytes
        if object_completed:
            job["objects_completed"] += 1
            self.uploads_total += 1

    def complete_object(self, job_id: str) -> None:
        self._job(job_id)["objects_completed"] += 1
        self.uploads_total += 1

    def __call__(self, job_id: str) -> dict:
        return self.snapshot(job_id)

    def tracked_jobs(self) -> int:
        """How many jobs have progress in memory (only jobs with authenticated uploads)."""
        return len(self._jobs)

    def snapshot(self, job_id: str) -> dict:
        job = self._jobs.get(job_id) or {"objects_completed": 0, "bytes_received": 0, "in_flight": {}}
        return {
            "objects_completed": job["objects_completed"],
            "bytes_received": job["bytes_received"] + sum(e["bytes_received"] for e in job["in_flight"].values()),
            "in_flight": [dict(e, started_at=iso(e["started_at"])) for e in job["in_flight"].values()],
        }
