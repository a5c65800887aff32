"""``GET /api/cloud/jobs/{id}/logs/stream``: a job's logs as Server-Sent Events.

What SimpleTuner's ``simpletuner jobs logs <id> --follow`` reads: every new
log line as a ``data:`` line, and when the job has ended ``event: done`` with
the final status as its data.  The logs come from the same place as
``GET /api/cloud/jobs/{id}/logs`` (``JobService.logs``: the provider's
prediction logs through the one client, breaker and retries), polled every
``poll_interval`` seconds on the injected clock while the job is active; a
provider error is sent as an SSE comment and the next poll tries again.

Viewer and up, not rate limited (a long-lived read), at most
``MAX_STREAMS`` at once (429); the stream ends when the job ends, the client
goes away or the daemon drains.  The handler stays suspended until then (Klein
finishes a request when its handler returns).
"""

from __future__ import annotations

from typing import Any, Optional

from klein import Klein
from twisted.internet import defer, task
from twisted.web.server import NOT_DONE_YET

from stdaemon.jobs import status as st
from stdaemon.http.errors import ApiError, not_found
from stdaemon.http.surface import VIEWER, Surface, route
from stdaemon.logs import get_logger
from stdaemon.jobs import store

log = get_logger("stdaemon.job_logs")

MAX_STREAMS = 20
POLL_INTERVAL = 2.0


def sse_data(text: str) -> bytes:
    """One SSE message whose data is ``text`` (one ``data:`` line per line)."""
    lines = text.split("\n")
    return ("".join(f"data: {line}\n" for line in lines) + "\n").encode("utf-8")


class LogFollower:
    """One open stream: polls, writes what is new, ends on a terminal status."""

    def __init__(self, surface: "JobLogsSurface", request: Any, job_id: str):
        self.surface = surface
        self.request = request
        self.job_id = job_id
        self.sent_chars = 0
        self.pending = ""          # a last line without its newline yet
        self.done: defer.Deferred = defer.Deferred()
        self.closed = False
        self._sleep: Optional[defer.Deferred] = None

    def write(self, data: bytes) -> None:
        if not self.closed:
            self.request.write(data)

    def close(self) -> None:
        """End the stream (job ended, client gone, daemon draining); once."""
        if self.closed:
            return
        self.closed = True   # first: cancelling the sleep below resumes run(), which closes too
        try:
            if not self.request.finished and not getattr(self.request, "_disconnected", False):
                self.request.finish()
        except Exception:
            pass
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()
        self.done.callback(None)

    def _push(self, text: str, final: bool) -> None:
        """Send complete new lines (and the unfinished last one when ``final``)."""
        if len(text) < self.sent_chars:  # the provider's logs restarted
            self.sent_chars, self.pending = 0, ""
        fresh = self.pending + text[self.sent_chars:]
        self.sent_chars = len(text)
        lines = fresh.split("\n")
        self.pending = "" if final else lines.pop()
        for line in lines:
            if line or not final:
                self.write(sse_data(line))

    async def run(self) -> None:
        ctx = self.surface.ctx
        try:
            while not self.closed:
                job = await ctx.db.run_read(store.get_job, self.job_id)
                if job is None:
                    self.write(b"event: done\ndata: deleted\n\n")
                    break
                terminal = job["status"] in st.TERMINAL
                try:
                    answer = await ctx.jobs.logs(self.job_id)
                    self._push(answer.get("logs") or "", final=terminal)
                except ApiError as error:
                    self.write(f": logs unavailable ({error.code}): {error.detail}\n\n".encode())
                if terminal:
                    self.write(f"event: done\ndata: {job['status']}\n\n".encode())
                    break
                self._sleep = task.deferLater(ctx.clock, self.surface.poll_interval, lambda: None)
                try:
                    await self._sleep
                except defer.CancelledError:
                    break
        except Exception:
            log.failure("Log stream of job {job_id} failed", job_id=self.job_id)
        finally:
            self.close()


class LogStreams:
    """The open log streams (``app.job_log_streams``): counted against ``MAX_STREAMS`` and all
    ended when the daemon drains (``close_all``, an ``app.drain_hooks`` entry)."""

    def __init__(self) -> None:
        self.followers: set[LogFollower] = set()

    def close_all(self) -> None:
        for follower in list(self.followers):
            follower.close()


class JobLogsSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/jobs",)

    def __init__(self, ctx: Any):
        super().__init__(ctx)
        self.poll_interval = POLL_INTERVAL

    @property
    def followers(self) -> set[LogFollower]:
        return self.ctx.job_log_streams.followers

    @route(app, "/api/cloud/jobs/<job_id>/logs/stream", access=VIEWER, rate_limited=False, stream=True)
    async def stream(self, request, job_id):
        job = await self.ctx.db.run_read(store.get_job, job_id)
        if job is None:
            raise not_found(f"Job {job_id} not found")
        if len(self.followers) >= MAX_STREAMS:
            raise ApiError(429, "too_many_streams", f"At most {MAX_STREAMS} log streams are open at once",
                           headers={"Retry-After": "5"})
        follower = LogFollower(self, request, job_id)
        self.followers.add(follower)
        request.setResponseCode(200)
        request.setHeader("Content-Type", "text/event-stream; charset=utf-8")
        request.setHeader("Cache-Control", "no-cache, no-store")
        request.setHeader("X-Accel-Buffering", "no")
        request.write(b": connected\n\n")
        request.notifyFinish().addBoth(lambda _: follower.close())
        try:
            await follower.run()
        finally:
            self.followers.discard(follower)
        return NOT_DONE_YET
