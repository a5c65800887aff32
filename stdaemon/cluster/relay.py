"""Job events between instances over Redis pub/sub.

Every instance publishes the job events its own bus emits (``send``) on one
channel, ``<namespace>:events``, and subscribes to it; what other instances
published is handed to the local bus (``on_event`` hooks), which shows it to its
SSE clients like a change made here.

Why pub/sub and not a stream: an event is a live notification, the jobs
themselves are in the shared database (``GET /api/cloud/jobs`` is the truth
after any gap).  Pub/sub costs one PUBLISH per event and delivers it to each
subscribed instance once, in the order Redis received them, with no per-reader
cursor and no trimming.  A shared stream would only add value for a
``Last-Event-ID`` that crosses instances; each instance's bus keeps every event
it showed (its own and relayed ones) in its own backlog, so a client resuming on
the same instance (sticky load balancing, the recommended set-up) misses nothing,
and one that lands on another instance gets that instance's whole backlog
(``EventBus.since``: an unknown id replays everything rather than skipping).

Delivery:
- A message published by this process is not handed to the bus again (its
  ``origin`` is this process's), so a local event is shown once locally.
- Each origin numbers its events; a receiver drops a number it has already
  seen, so a publish retried after a lost reply is not shown twice.
- Order per job: one origin's events arrive in the order it published them;
  across instances the bus drops a relayed event that would move a job
  backwards (``stdaemon.events.service.EventBus.receive``).
- Redis unreachable: local events still flow at once (the bus never waits for
  Redis).  Events to relay wait in a bounded queue (``pending_max``; the oldest
  are dropped and counted beyond it) and are published, in order, when the
  connection is back.  Events other instances published while this one's
  subscription was down are not replayed (pub/sub keeps nothing).  Both
  connections reconnect with backoff on the injected clock; the health
  component ``cluster_events`` is degraded meanwhile.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Callable, Iterable, Optional

import txredisapi
from twisted.internet import defer

from stdaemon.cluster.connection import RedisConnection
from stdaemon.cluster.messages import BadMessage, decode_event, encode_event, events_channel
from stdaemon.logs import get_logger

log = get_logger("stdaemon.cluster")

#: at most this many origins remembered for duplicate detection (oldest forgotten first)
MAX_ORIGINS = 1024


class Subscriber(txredisapi.SubscriberProtocol):
    """txredisapi's subscriber protocol, handing each message to ``on_message``."""

    on_message: Optional[Callable[[Any, Any], None]] = None

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        if self.on_message is not None:
            self.on_message(channel, message)


class EventRelay:
    def __init__(self, commands: RedisConnection, subscriber: RedisConnection, *, namespace: str,
                 origin: str, fields: Iterable[str], pending_max: int = 1000):
        """``commands``: a connection for PUBLISH (shared with the leases); ``subscriber``: one made
        with ``protocol=Subscriber``, for this relay alone."""
        self.channel = events_channel(namespace)
        self.origin = origin
        self.fields = tuple(fields)
        self.pending_max = pending_max
        self.publisher = commands
        self.subscriber = subscriber
        self.publisher.on_ready.append(lambda _: self._flush())
        self.subscriber.on_ready.append(self._subscribe)
        self.subscriber.on_lost.append(self._unsubscribed)
        #: hooks ``(event_type, data, user_id)`` for every event another instance published
        self.on_event: list[Callable[[str, dict, Optional[int]], None]] = []
        self.subscribed = False
        self.subscriptions = 0       # successful SUBSCRIBEs (the first and each one after a reconnect)
        self.relayed = 0             # events this instance published on Redis
        self.received = 0            # events from other instances handed to the bus
        self.dropped = 0             # events never published (queue full while Redis was away)
        self.duplicates = 0          # messages already seen (same origin and number)
        self.malformed = 0           # messages on the channel that are not events
        self._number = 0
        self._pending: deque[str] = deque()
        self._sending = False
        self._seen: dict[str, int] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def healthy(self) -> bool:
        return self.subscribed and self.publisher.connected

    # -- out -------------------------------------------------------------------------

    def send(self, event_type: str, data: dict, user_id: Optional[int]) -> None:
        """Publish an event of the local bus (never raises, never waits)."""
        self._number += 1
        self._pending.append(encode_event(self.origin, self._number, event_type, user_id, data))
        while len(self._pending) > self.pending_max:
            self._pending.popleft()
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("Redis is unreachable: {n} job event(s) could not be relayed to the other "
                            "instances", n=self.dropped)
        self._flush()

    def _flush(self) -> None:
        if self._sending or not self._pending or not self.publisher.connected:
            return
        self._sending = True
        defer.Deferred.fromCoroutine(self._publish_pending())

    async def _publish_pending(self) -> None:
        """Publish queued events one by one, in order; stop at the first failure (the rest wait
        for the next connection)."""
        try:
            while self._pending and self.publisher.connected:
                message = self._pending[0]
                try:
                    await self.publisher.call("publish", self.channel, message)
                except Exception as e:
                    log.debug("Relaying a job event failed: {error}", error=str(e))
                    return
                if self._pending and self._pending[0] is message:
                    self._pending.popleft()
                self.relayed += 1
        finally:
            self._sending = False

    # -- in --------------------------------------------------------------------------

    def _subscribe(self, protocol: Any) -> defer.Deferred:
        protocol.on_message = self._message

        def done(_: Any) -> None:
            if protocol is self.subscriber.protocol:
                self.subscribed = True
                self.subscriptions += 1
                if self.subscriptions > 1:
                    log.info("Job events from other instances flow again (subscription {n})",
                             n=self.subscriptions)

        return self.subscriber.call("subscribe", self.channel).addCallback(done)

    def _unsubscribed(self) -> None:
        self.subscribed = False

    def _message(self, channel: Any, message: Any) -> None:
        try:
            event = decode_event(message, self.fields)
        except BadMessage as e:
            self.malformed += 1
            if self.malformed == 1 or self.malformed % 1000 == 0:
                log.warning("Ignored a message on {channel} that is not a job event ({reason})",
                            channel=self.channel, reason=str(e))
            return
        if event.origin == self.origin:
            return  # ours: the local bus has shown it already
        last = self._seen.pop(event.origin, 0)
        self._seen[event.origin] = max(last, event.number)  # re-inserted: most recent origin last
        if len(self._seen) > MAX_ORIGINS:
            self._seen.pop(next(iter(self._seen)))
        if event.number <= last:
            self.duplicates += 1
            return
        self.received += 1
        for hook in list(self.on_event):
            try:
                hook(event.type, event.data, event.user_id)
            except Exception:
                log.failure("Delivering a relayed job event failed")
