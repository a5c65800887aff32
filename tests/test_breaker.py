"""Circuit breaker state machine and retry schedule, driven by task.Clock."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from stdaemon.outbound.breaker import (
    CLOSED, HALF_OPEN, OPEN, BreakerRegistry, BreakerSettings, CircuitBreaker, CircuitOpenError,
    is_failure_status,
)
from stdaemon.outbound.retry import RetryPolicy, backoff_delay, next_delay, parse_retry_after


def make(**settings):
    clock = Clock()
    changes = []
    breaker = CircuitBreaker("replicate", clock, BreakerSettings(**settings),
                             on_change=lambda b, old, new: changes.append((old, new)))
    return clock, breaker, changes


def fail(breaker, n=1):
    for _ in range(n):
        breaker.before_call()
        breaker.record_failure("HTTP 500")


def test_opens_after_five_consecutive_failures_and_rejects_at_once():
    clock, breaker, changes = make()
    fail(breaker, 4)
    assert breaker.state == CLOSED
    fail(breaker)
    assert breaker.state == OPEN
    assert changes == [(CLOSED, OPEN)]
    with pytest.raises(CircuitOpenError) as caught:
        breaker.before_call()
    assert caught.value.retry_after == 60
    assert "open" in str(caught.value)
    clock.advance(45)
    with pytest.raises(CircuitOpenError) as caught:
        breaker.before_call()
    assert caught.value.retry_after == 15
    assert breaker.rejected_total == 2
    assert breaker.failures_total == 5


def test_a_success_resets_the_consecutive_count():
    _clock, breaker, _ = make()
    fail(breaker, 4)
    breaker.before_call()
    breaker.record_success()
    fail(breaker, 4)
    assert breaker.state == CLOSED


def test_timer_half_opens_after_cool_down():
    clock, breaker, changes = make()
    fail(breaker, 5)
    clock.advance(59.9)
    assert breaker.state == OPEN
    clock.advance(0.1)
    assert breaker.state == HALF_OPEN
    assert changes == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]
    assert not clock.getDelayedCalls()


def test_half_open_admits_three_trials_and_two_successes_close():
    clock, breaker, changes = make()
    fail(breaker, 5)
    clock.advance(60)
    for _ in range(3):
        breaker.before_call()
    with pytest.raises(CircuitOpenError):
        breaker.before_call()  # a fourth concurrent trial is refused
    breaker.record_success()
    assert breaker.state == HALF_OPEN
    breaker.record_success()
    assert breaker.state == CLOSED
    assert changes[-1] == (HALF_OPEN, CLOSED)
    breaker.before_call()  # closed again: calls pass
    assert breaker.consecutive_failures == 0


def test_one_failure_in_half_open_reopens_with_a_new_cool_down():
    clock, breaker, changes = make()
    fail(breaker, 5)
    clock.advance(60)
    breaker.before_call()
    breaker.record_success()
    breaker.before_call()
    breaker.record_failure("timeout")
    assert breaker.state == OPEN
    assert changes[-1] == (HALF_OPEN, OPEN)
    clock.advance(59)
    assert breaker.state == OPEN
    clock.advance(1)
    assert breaker.state == HALF_OPEN


def test_neutral_outcome_returns_the_trial_slot():
    clock, breaker, _ = make()
    fail(breaker, 5)
    clock.advance(60)
    for _ in range(3):
        breaker.before_call()
        breaker.record_neutral()
    breaker.before_call()  # still admitted: no slot was used up
    assert breaker.state == HALF_OPEN


def test_thresholds_are_configurable():
    clock, breaker, _ = make(failure_threshold=2, recovery_timeout=5, half_open_max_calls=1,
                             success_threshold=1)
    fail(breaker, 2)
    assert breaker.state == OPEN
    clock.advance(5)
    breaker.before_call()
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    breaker.record_success()
    assert breaker.state == CLOSED
    with pytest.raises(ValueError):
        BreakerSettings(success_threshold=4, half_open_max_calls=3)
    with pytest.raises(ValueError):
        BreakerSettings(recovery_timeout=0)


def test_stop_cancels_the_timer_and_registry_shares_settings():
    clock = Clock()
    registry = BreakerRegistry(clock, BreakerSettings(failure_threshold=1))
    breaker = registry.get("replicate")
    assert registry.get("replicate") is breaker
    fail(breaker)
    assert clock.getDelayedCalls()
    registry.stop()
    assert not clock.getDelayedCalls()
    snap = breaker.snapshot()
    assert snap["state"] == OPEN and snap["state_value"] == 2 and snap["failures_total"] == 1


def test_failure_statuses():
    assert is_failure_status(500) and is_failure_status(503) and is_failure_status(429)
    assert not is_failure_status(404) and not is_failure_status(422) and not is_failure_status(200)


# -- retry schedule ------------------------------------------------------

def test_only_idempotent_requests_are_retried():
    policy = RetryPolicy()
    assert next_delay("POST", 1, policy, status=503) is None
    assert next_delay("POST", 1, policy, connection_error=True) is None
    assert next_delay("GET", 1, policy, status=503) is not None
    assert next_delay("GET", 1, policy, connection_error=True) is not None
    assert next_delay("GET", 1, policy, status=404) is None
    assert next_delay("GET", 1, policy, status=400) is None


def test_at_most_three_attempts():
    policy = RetryPolicy()
    assert next_delay("GET", 2, policy, status=500) is not None
    assert next_delay("GET", 3, policy, status=500) is None


def test_exponential_backoff_with_jitter():
    policy = RetryPolicy(base_delay=1.0, multiplier=2.0, max_delay=3.0, jitter=0.5)
    assert backoff_delay(1, policy, rand=lambda: 0.0) == 1.0
    assert backoff_delay(2, policy, rand=lambda: 0.0) == 2.0
    assert backoff_delay(3, policy, rand=lambda: 0.0) == 3.0  # capped
    assert backoff_delay(2, policy, rand=lambda: 1.0) == 1.0  # jitter removes up to half
    delays = {backoff_delay(2, policy) for _ in range(20)}
    assert all(1.0 <= d <= 2.0 for d in delays) and len(delays) > 1


def test_retry_after_is_honoured():
    policy = RetryPolicy(base_delay=0.5, max_retry_after=30)
    assert next_delay("GET", 1, policy, status=429, retry_after=7, rand=lambda: 0.0) == 7
    # Retry-After shorter than the backoff: the backoff wins.
    assert next_delay("GET", 1, policy, status=429, retry_after=0, rand=lambda: 0.0) == 0.5
    # A server asking for longer than we are willing to wait: give up now.
    assert next_delay("GET", 1, policy, status=429, retry_after=120) is None


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert parse_retry_after("5", now) == 5.0
    assert parse_retry_after(b"12", now) == 12.0
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:40 GMT", now) == pytest.approx(20.0)
    assert parse_retry_after("Tue, 14 Nov 2023 22:13:00 GMT", now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None
    assert parse_retry_after("", now) is None
