"""Circuit breaker: a pure state machine with one injected reactor timer.

States and moves (S3):

* ``closed``: calls pass.  ``failure_threshold`` consecutive failures
  (connection error, timeout, 5xx, 429) open the circuit.
* ``open``: calls are rejected at once with :class:`CircuitOpenError`.  A
  timer on the injected ``IReactorTime`` moves the circuit to ``half_open``
  after ``recovery_timeout`` seconds.
* ``half_open``: at most ``half_open_max_calls`` trial calls are let through;
  ``success_threshold`` successes close the circuit, a single failure
  reopens it (and restarts the cool-down).

The breaker performs no I/O.  A caller asks :meth:`CircuitBreaker.before_call`
for permission, then reports the outcome with :meth:`record_success` or
:meth:`record_failure`.  :func:`is_failure_status` says which HTTP statuses
count as failures.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

# Values of the ``simpletuner_circuit_breaker_state`` gauge (S10).
STATE_VALUES = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2}


@dataclass(frozen=True)
class BreakerSettings:
    """``failure_threshold`` consecutive failures open the circuit; it half-opens after
    ``recovery_timeout`` seconds, admits ``half_open_max_calls`` trial calls, and closes
    after ``success_threshold`` of them succeed (the provider's ``breaker_*`` settings)."""

    failure_threshold: int = 5
    recovery_timeout: float = 60.0
    half_open_max_calls: int = 3
    success_threshold: int = 2

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("failure_threshold must be >= 1")
        if self.recovery_timeout <= 0:
            raise ValueError("recovery_timeout must be > 0")
        if self.half_open_max_calls < 1:
            raise ValueError("half_open_max_calls must be >= 1")
        if not 1 <= self.success_threshold <= self.half_open_max_calls:
            raise ValueError("success_threshold must be between 1 and half_open_max_calls")


class CircuitOpenError(Exception):
    """The circuit is open (or its half-open trial budget is used up)."""

    def __init__(self, name: str, retry_after: float):
        self.name = name
        self.retry_after = max(0.0, retry_after)
        super().__init__(
            f"circuit breaker for {name!r} is open after repeated provider failures; "
            f"retry in {self.retry_after:.0f} s"
        )


def is_failure_status(status: int) -> bool:
    """HTTP statuses that count as a provider failure for the breaker."""
    return status == 429 or status >= 500


class CircuitBreaker:
    """One provider's breaker.

    ``clock`` is an ``IReactorTime`` (the reactor, or ``task.Clock`` in tests);
    only ``seconds()`` and ``callLater()`` are used.  ``on_change(breaker,
    old_state, new_state)`` is called after every state change (metrics, logs).
    """

    def __init__(
        self,
        name: str,
        clock,
        settings: BreakerSettings | None = None,
        on_change: Callable[["CircuitBreaker", str, str], None] | None = None,
    ):
        self.name = name
        self._clock = clock
        self.settings = settings or BreakerSettings()
        self._on_change = on_change
        self.state = CLOSED
        self.consecutive_failures = 0
        self.failures_total = 0
        self.rejected_total = 0
        self.opened_at: float | None = None
        self.last_failure: str = ""
        self._half_open_admitted = 0
        self._half_open_successes = 0
        self._timer = None

    # -- queries ---------------------------------------------------------
    @property
    def state_value(self) -> int:
        return STATE_VALUES[self.state]

    def retry_after(self) -> float:
        """Seconds until the circuit half-opens (0 unless open)."""
        if self.state != OPEN or self.opened_at is None:
            return 0.0
        remaining = self.opened_at + self.settings.recovery_timeout - self._clock.seconds()
        return max(0.0, remaining)

    def snapshot(self) -> dict:
        return {
            "name": self.name,
            "state": self.state,
            "state_value": self.state_value,
            "consecutive_failures": self.consecutive_failures,
            "failures_total": self.failures_total,
            "rejected_total": self.rejected_total,
            "retry_after": round(self.retry_after(), 3),
            "last_failure": self.last_failure,
        }

    # -- protocol for callers --------------------------------------------
    def before_call(self) -> None:
        """Admit a call or raise :class:`CircuitOpenError`."""
        if self.state == OPEN:
            self.rejected_total += 1
            raise CircuitOpenError(self.name, self.retry_after())
        if self.state == HALF_OPEN:
            if self._half_open_admitted >= self.settings.half_open_max_calls:
                self.rejected_total += 1
                # The trial budget is in flight; their outcome decides soon.
                raise CircuitOpenError(self.name, 1.0)
            self._half_open_admitted += 1

    def record_success(self) -> None:
        if self.state == HALF_OPEN:
            self._half_open_successes += 1
            if self._half_open_successes >= self.settings.success_threshold:
                self._move(CLOSED)
        elif self.state == CLOSED:
            self.consecutive_failures = 0
        # A success reported while open (a call admitted before the circuit
        # opened) changes nothing: the cool-down still runs.

    def record_failure(self, reason: str = "") -> None:
        self.failures_total += 1
        self.last_failure = reason
        if self.state == HALF_OPEN:
            self._move(OPEN)
        elif self.state == CLOSED:
            self.consecutive_failures += 1
            if self.consecutive_failures >= self.settings.failure_threshold:
                self._move(OPEN)

    def record_neutral(self) -> None:
        """An admitted call ended with an outcome that says nothing about the
        provider's health (e.g. a local TLS configuration error): give its
        half-open trial slot back."""
        if self.state == HALF_OPEN and self._half_open_admitted > 0:
            self._half_open_admitted -= 1

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Apply new thresholds; the current state is kept."""
        self.settings = settings

    def stop(self) -> None:
        """Cancel the pending half-open timer (service stop, tests)."""
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    # -- internals --------------------------------------------------------
    def _move(self, new_state: str) -> None:
        old = self.state
        self.state = new_state
        self._half_open_admitted = 0
        self._half_open_successes = 0
        if new_state == OPEN:
            self.opened_at = self._clock.seconds()
            self.stop()
            self._timer = self._clock.callLater(self.settings.recovery_timeout, self._half_open)
        else:
            if new_state == CLOSED:
                self.consecutive_failures = 0
                self.opened_at = None
                self.stop()
        if self._on_change is not None and old != new_state:
            try:
                self._on_change(self, old, new_state)
            except Exception:  # a broken observer must not break the breaker
                pass

    def _half_open(self) -> None:
        self._timer = None
        if self.state == OPEN:
            self._move(HALF_OPEN)


class BreakerRegistry:
    """One breaker per provider, created on first use with shared settings."""

    def __init__(self, clock, settings: BreakerSettings | None = None, on_change=None):
        self._clock = clock
        self._settings = settings or BreakerSettings()
        self._on_change = on_change
        self._breakers: dict[str, CircuitBreaker] = {}

    def get(self, name: str) -> CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            breaker = CircuitBreaker(name, self._clock, self._settings, self._on_change)
            self._breakers[name] = breaker
        return breaker

    def all(self) -> dict[str, CircuitBreaker]:
        return dict(self._breakers)

    def stop(self) -> None:
        for breaker in self._breakers.values():
            breaker.stop()
