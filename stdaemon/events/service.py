"""The live event bus behind ``GET /api/events/stream`` (S4, SSE).

``app.events.publish(job_dict)`` is called by whoever changes a job's status
(submission, webhooks, the poller, cancel, approvals).  The bus

- gives each event an id ``<boot>-<n>`` (``boot`` is random per process, so a
  ``Last-Event-ID`` from before a restart replays the whole backlog rather
  than silently skipping events);
- keeps the last ``backlog`` events in memory for ``Last-Event-ID`` resume;
- delivers each event to the open streams whose caller may see the job
  (:func:`can_see_job`: every authenticated role sees every job, as in the
  jobs list);
- bounds open streams per user (``max_per_user``), sends a heartbeat comment
  every ``heartbeat`` seconds on the injected clock, and closes every stream
  when the daemon drains (``close_all``, an ``app.drain_hooks`` entry).

Only the public fields of a job are sent (never ``metadata``, which may hold
the training config).

Several instances (``cluster.redis_url``, :mod:`stdaemon.cluster.relay`): each
event published here is also handed to ``relay`` (set by the composition root),
and events other instances published arrive through :meth:`EventBus.receive`.
A relayed event gets an id of this bus and goes through the same backlog,
visibility rule, per-user bounds and heartbeats.  Order per job: a relayed event
that would move a job backwards in its lifecycle (an older status than one this
bus already showed for it, or any other status once it was shown finished) is
dropped and counted (``stale``), so a stream never shows a job going back.
"""

from __future__ import annotations

import json
import secrets
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Optional

from twisted.internet import defer, task

from stdaemon.jobs.status import check_transition
from stdaemon.timestamps import with_iso
from stdaemon.logs import get_logger

log = get_logger("stdaemon.events")

# Shown as ISO 8601 UTC with milliseconds (S18), whatever the publisher passed.
TIME_FIELDS = ("created_at", "started_at", "completed_at")
PUBLIC_JOB_FIELDS = ("job_id", "provider", "status", "config_name", "created_at", "started_at",
                     "completed_at", "cost_usd", "hardware_type", "error_message", "output_url",
                     "user_id", "external_id", "upload_progress", "previous_status", "progress")
#: jobs whose last shown status is remembered for ordering relayed events (least recent forgotten)
TRACKED_JOBS = 10_000


def can_see_job(principal: Any, user_id: Optional[int]) -> bool:
    """Who may see a job: every authenticated role (viewers read jobs, S12) —
    the same rule as ``GET /api/cloud/jobs``."""
    return principal is not None and principal.role in ("admin", "operator", "viewer")


@dataclass(frozen=True)
class Event:
    id: str
    seq: int
    type: str
    data: dict
    user_id: Optional[int]

    def encode(self) -> bytes:
        payload = json.dumps(self.data, separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.type}\ndata: {payload}\n\n".encode()


class TooManyStreams(Exception):
    pass


class Stream:
    """One open SSE response."""

    def __init__(self, bus: "EventBus", request: Any, principal: Any):
        self.bus = bus
        self.request = request
        self.principal = principal
        self.closed: defer.Deferred = defer.Deferred()
        self.sent = 0
        self._heartbeat: Optional[task.LoopingCall] = None

    def start(self, backlog: list[Event]) -> None:
        request = self.request
        request.setResponseCode(200)
        request.setHeader("Content-Type", "text/event-stream; charset=utf-8")
        request.setHeader("Cache-Control", "no-cache, no-store")
        request.setHeader("X-Accel-Buffering", "no")
        request.write(f"retry: {int(self.bus.retry_ms)}\n: connected\n\n".encode())
        for event in backlog:
            self.send(event)
        request.notifyFinish().addBoth(lambda _: self._finished())
        self._heartbeat = task.LoopingCall(self._beat)
        self._heartbeat.clock = self.bus.clock
        self._heartbeat.start(self.bus.heartbeat, now=False)

    def send(self, event: Event) -> None:
        if self.closed.called or not can_see_job(self.principal, event.user_id):
            return
        try:
            self.request.write(event.encode())
            self.sent += 1
        except Exception:
            self.close()

    def _beat(self) -> None:
        if self.closed.called:
            return
        try:
            self.request.write(b": heartbeat\n\n")
        except Exception:
            self.close()

    def close(self) -> None:
        """Server-side close (drain, errors)."""
        if self.closed.called:
            return
        try:
            if not self.request.finished and not getattr(self.request, "_disconnected", False):
                self.request.finish()
        except Exception:
            pass
        self._finished()

    def _finished(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self.bus._forget(self)
        if not self.closed.called:
            self.closed.callback(None)


class EventBus:
    def __init__(self, clock: Any, backlog: int = 1000, max_per_user: int = 5,
                 heartbeat: float = 15.0, retry_ms: int = 3000):
        self.clock = clock
        self.boot = secrets.token_hex(4)
        self.seq = 0
        self.backlog: deque[Event] = deque(maxlen=backlog)
        self.max_per_user = max_per_user
        self.heartbeat = heartbeat
        self.retry_ms = retry_ms
        self.streams: set[Stream] = set()
        self.published = 0
        self.received = 0     # events other instances published, shown here
        self.stale = 0        # relayed events dropped because they would move a job backwards
        #: called with ``(event_type, data, user_id)`` for every local event (the cluster relay)
        self.relay: Optional[Callable[[str, dict, Optional[int]], None]] = None
        self._last_status: OrderedDict[str, str] = OrderedDict()

    # -- producers ---------------------------------------------------------------

    def publish(self, job: dict, event_type: str = "job") -> str:
        """Record a job change and deliver it; returns the event id.  Never
        raises into the caller's path (a broken stream is closed)."""
        data = with_iso({k: job[k] for k in PUBLIC_JOB_FIELDS if k in job}, TIME_FIELDS)
        event = self._deliver(event_type, data, job.get("user_id"))
        self.published += 1
        if self.relay is not None:
            try:
                self.relay(event_type, data, event.user_id)
            except Exception:
                log.failure("Relaying job event {id} failed", id=event.id)
        return event.id

    def receive(self, event_type: str, data: dict, user_id: Optional[int]) -> Optional[str]:
        """An event another instance published (already reduced to the public fields): shown
        here unless it would move its job backwards.  Returns its id here, or None if dropped."""
        job_id, status = data.get("job_id"), data.get("status")
        if isinstance(job_id, str) and isinstance(status, str):
            last = self._last_status.get(job_id)
            if last is not None and last != status \
                    and check_transition(last, status).reason in ("out_of_order", "terminal"):
                self.stale += 1
                return None
        self.received += 1
        return self._deliver(event_type, data, user_id).id

    def _deliver(self, event_type: str, data: dict, user_id: Optional[int]) -> Event:
        self.seq += 1
        event = Event(f"{self.boot}-{self.seq}", self.seq, event_type, data, user_id)
        self.backlog.append(event)
        job_id, status = data.get("job_id"), data.get("status")
        if isinstance(job_id, str) and isinstance(status, str):
            self._last_status[job_id] = status
            self._last_status.move_to_end(job_id)
            if len(self._last_status) > TRACKED_JOBS:
                self._last_status.popitem(last=False)
        for stream in list(self.streams):
            stream.send(event)
        return event

    # -- consumers ---------------------------------------------------------------

    def since(self, last_event_id: Optional[str]) -> list[Event]:
        """Events after ``last_event_id`` still in the backlog (all of them if
        the id is from another process or unknown)."""
        if not last_event_id:
            return []
        boot, _, number = last_event_id.strip().partition("-")
        if boot != self.boot or not number.isdigit():
            return list(self.backlog)
        last = int(number)
        return [event for event in self.backlog if event.seq > last]

    def open_count(self, user_id: int) -> int:
        return sum(1 for s in self.streams if s.principal.user_id == user_id)

    def open(self, request: Any, principal: Any, last_event_id: Optional[str]) -> Stream:
        if self.open_count(principal.user_id) >= self.max_per_user:
            raise TooManyStreams()
        stream = Stream(self, request, principal)
        self.streams.add(stream)
        stream.start(self.since(last_event_id))
        return stream

    def _forget(self, stream: Stream) -> None:
        self.streams.discard(stream)

    def close_all(self) -> None:
        for stream in list(self.streams):
            stream.close()
