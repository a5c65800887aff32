"""One Redis connection kept open, on the injected clock.

txredisapi speaks the protocol (commands, scripts, pub/sub); this module owns
the connection's life, because the pool txredisapi brings reconnects on the
global reactor and queues calls while it is down.  Here:

- a lost or failed connection is retried after a backoff (``initial`` doubling
  to ``maximum``, with jitter) scheduled on the injected clock;
- a call while disconnected fails at once with :class:`RedisUnavailable`
  (nothing is queued, nothing waits for Redis to come back);
- every call and every connection attempt is bounded by ``timeout`` seconds of
  the injected clock; a call that times out aborts the connection (its reply
  would otherwise answer the next call), which then reconnects;
- ``ping_interval`` pings a connection that looks healthy, so a Redis that stops
  answering (a frozen host) is noticed even when nothing else is sent.

``on_ready`` hooks run on each (re)connection, ``on_lost`` hooks when it ends.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Optional
from urllib.parse import unquote, urlsplit

import txredisapi
from twisted.internet import defer, task
from twisted.internet.endpoints import HostnameEndpoint, UNIXClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.ssl import optionsForClientTLS

from stdaemon.cluster.messages import backoff_delay
from stdaemon.logs import get_logger

log = get_logger("stdaemon.cluster")


class RedisUnavailable(Exception):
    """Redis could not answer: not connected, the connection dropped, or the call timed out."""


def redis_settings(url: str) -> dict:
    """``redis://[[user]:password@]host[:port][/db]``, ``rediss://`` or ``unix:///path[?db=N]``
    (validated at config load)."""
    parts = urlsplit(url)
    db: Optional[int] = None
    path = None
    if parts.scheme == "unix":
        path = parts.path
        for item in (parts.query or "").split("&"):
            if item.startswith("db="):
                db = int(item[3:])
    elif parts.path.strip("/"):
        db = int(parts.path.strip("/"))
    return {"scheme": parts.scheme, "host": parts.hostname or "127.0.0.1", "port": parts.port or 6379,
            "path": path, "db": db,
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None}


class _Owner:
    """What txredisapi's protocol calls on its factory when AUTH or SELECT fails."""

    isLazy = True

    def __init__(self, connection: "RedisConnection"):
        self.connection = connection

    def stopTrying(self) -> None:  # the connection retries on its own schedule
        return None

    def connectionError(self, why: str) -> None:
        self.connection.last_error = why


class RedisConnection:
    def __init__(self, url: str, clock: Any, reactor: Any, *, name: str, timeout: float = 1.0,
                 protocol: type = txredisapi.RedisProtocol, initial_delay: float = 0.5,
                 max_delay: float = 10.0, ping_interval: float = 5.0,
                 jitter: Callable[[], float] = lambda: random.uniform(-1.0, 1.0)):
        self.url, self.settings = url, redis_settings(url)
        self.clock, self.reactor = clock, reactor
        self.name = name
        self.timeout = timeout
        self.protocol_class = protocol
        self.initial_delay, self.max_delay = initial_delay, max_delay
        self.ping_interval = ping_interval
        self.jitter = jitter
        self.protocol: Optional[Any] = None       # the live, usable connection
        self.on_ready: list[Callable[[Any], Any]] = []
        self.on_lost: list[Callable[[], None]] = []
        self.failures = 0                         # failed attempts in a row
        self.connections = 0                      # successful connections so far
        self.last_error: Optional[str] = None
        self.retry_at: Optional[float] = None
        self.in_flight = 0                        # calls sent and not yet answered (or failed)
        self._running = False
        self._attempt: Optional[defer.Deferred] = None
        self._retry: Optional[Any] = None
        self._watchdog: Optional[task.LoopingCall] = None

    @property
    def where(self) -> str:
        s = self.settings
        return s["path"] if s["scheme"] == "unix" else f"{s['host']}:{s['port']}"

    @property
    def connected(self) -> bool:
        return self.protocol is not None

    def describe(self) -> str:
        if self.connected:
            return f"connected to {self.where}"
        state = f"not connected to {self.where}"
        if self.last_error:
            state += f" ({self.last_error})"
        if self.retry_at is not None:
            state += f", retrying in {max(0.0, self.retry_at - self.clock.seconds()):.1f} s"
        return state

    # -- life ------------------------------------------------------------------------

    def start(self) -> None:
        if self._running:
            return
        self._running = True
        self._watchdog = task.LoopingCall(self._ping)
        self._watchdog.clock = self.clock
        self._watchdog.start(self.ping_interval, now=False)
        self._connect()

    def stop(self) -> defer.Deferred:
        """Stop retrying and close the connection; fires once it is closed (bounded)."""
        self._running = False
        if self._watchdog is not None and self._watchdog.running:
            self._watchdog.stop()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = self.retry_at = None
        if self._attempt is not None:
            self._attempt.cancel()
        protocol, self.protocol = self.protocol, None
        if protocol is None or protocol.transport is None:
            return defer.succeed(None)
        closed = protocol.whenDisconnected()
        protocol.transport.loseConnection()
        closed.addTimeout(self.timeout, self.clock)
        return closed.addErrback(lambda _: protocol.transport.abortConnection())

    def _endpoint(self) -> Any:
        s = self.settings
        timeout = max(1, int(round(self.timeout)))
        if s["scheme"] == "unix":
            return UNIXClientEndpoint(self.reactor, s["path"], timeout=timeout)
        endpoint = HostnameEndpoint(self.reactor, s["host"], s["port"], timeout=timeout)
        if s["scheme"] == "rediss":
            endpoint = wrapClientTLS(optionsForClientTLS(s["host"]), endpoint)
        return endpoint

    def _connect(self) -> None:
        self._retry = self.retry_at = None
        if not self._running:
            return
        s = self.settings
        protocol = self.protocol_class(charset="utf-8", password=s["password"], dbid=s["db"],
                                       convertNumbers=False, username=s["username"])
        protocol.factory = _Owner(self)

        def connected(p: Any) -> defer.Deferred:
            # a connection lost before it is usable fails the attempt; after, it is "lost"
            p.whenDisconnected().addCallback(lambda _: self._ended(p))
            return p.whenConnected()

        attempt = connectProtocol(self._endpoint(), protocol)
        attempt.addCallback(connected)
        attempt.addTimeout(self.timeout, self.clock)
        self._attempt = attempt
        attempt.addCallbacks(self._ready, self._failed, errbackArgs=(protocol,))

    def _ready(self, protocol: Any) -> None:
        self._attempt = None
        if not self._running:
            protocol.transport.loseConnection()
            return
        self.protocol = protocol
        self.failures = 0
        self.connections += 1
        self.last_error = None
        if self.connections > 1:
            log.info("Redis connection {name} to {where} is back", name=self.name, where=self.where)
        for hook in list(self.on_ready):
            try:
                d = defer.maybeDeferred(hook, protocol)
                d.addErrback(self._hook_failed, protocol)
            except Exception:  # pragma: no cover - maybeDeferred catches
                log.failure("Redis connection hook failed")

    def _hook_failed(self, failure: Any, protocol: Any) -> None:
        """A hook that cannot set the connection up (SUBSCRIBE refused, say): start again."""
        self.last_error = failure.getErrorMessage() or type(failure.value).__name__
        log.warning("Redis connection {name}: set-up failed ({error}); reconnecting",
                    name=self.name, error=self.last_error)
        if protocol.transport is not None:
            protocol.transport.abortConnection()

    def _failed(self, failure: Any, protocol: Any) -> None:
        self._attempt = None
        if failure.check(defer.CancelledError) and not self._running:
            return
        if protocol.transport is not None:
            protocol.transport.abortConnection()
        if failure.check(defer.TimeoutError, defer.CancelledError):
            error = f"no answer within {self.timeout:g} s"
        else:
            error = failure.getErrorMessage() or type(failure.value).__name__
        self.last_error = self.last_error if failure.check(defer.CancelledError) and self.last_error else error
        self.failures += 1
        if self.failures == 1:
            log.warning("Redis connection {name} to {where} failed: {error}; retrying",
                        name=self.name, where=self.where, error=self.last_error)
        self._schedule()

    def _ended(self, protocol: Any) -> None:
        if protocol is not self.protocol:
            # lost before it was ready: fail the attempt in progress (it waits for whenConnected)
            if self._attempt is not None and self.protocol is None:
                self.last_error = self.last_error or "connection closed during set-up"
                self._attempt.cancel()
            return
        self.protocol = None
        self.last_error = "connection lost"
        log.warning("Redis connection {name} to {where} lost; reconnecting", name=self.name, where=self.where)
        for hook in list(self.on_lost):
            try:
                hook()
            except Exception:
                log.failure("Redis connection hook failed")
        self.failures += 1
        self._schedule()

    def _schedule(self) -> None:
        if not self._running or self._retry is not None:
            return
        delay = backoff_delay(self.failures, self.initial_delay, self.max_delay, self.jitter())
        self.retry_at = self.clock.seconds() + delay
        self._retry = self.clock.callLater(delay, self._connect)

    def _ping(self) -> None:
        if self.protocol is not None:
            self.call("ping").addErrback(lambda _: None)  # a timeout aborts the connection

    # -- calls ---------------------------------------------------------------------

    def call(self, method: str, *args: Any, **kwargs: Any) -> defer.Deferred:
        """``protocol.<method>(*args)``, bounded; fails with :class:`RedisUnavailable` when Redis
        cannot answer (a Redis error reply stays a ``txredisapi.ResponseError``)."""
        protocol = self.protocol
        if protocol is None:
            return defer.fail(RedisUnavailable(f"not connected to redis at {self.where}"))
        try:
            d = getattr(protocol, method)(*args, **kwargs)
        except Exception as e:
            return defer.fail(RedisUnavailable(f"redis: {e}"))
        self.in_flight += 1
        d.addTimeout(self.timeout, self.clock)

        def answered(result: Any) -> Any:
            self.in_flight -= 1
            return result

        def failed(failure: Any) -> Any:
            if failure.check(txredisapi.ResponseError):
                return failure
            if failure.check(defer.TimeoutError, defer.CancelledError):
                # the late reply would answer the next call: drop this connection
                if protocol.transport is not None:
                    protocol.transport.abortConnection()
                raise RedisUnavailable(f"redis at {self.where} did not answer within {self.timeout:g} s")
            raise RedisUnavailable(f"redis: {failure.getErrorMessage()}")

        return d.addBoth(answered).addErrback(failed)
