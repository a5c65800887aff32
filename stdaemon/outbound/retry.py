"""Retry schedule for outbound provider calls (pure; S3).

Only idempotent requests (GET, HEAD) are retried, on connection errors,
timeouts, 429 and 5xx, at most ``max_attempts`` times in total.  Delays grow
exponentially with jitter; a ``Retry-After`` from the server is honoured (the
delay is never shorter than what the server asked for, and a server asking
for longer than ``max_retry_after`` is not retried at all).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Callable

IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class RetryPolicy:
    """At most ``max_attempts`` calls in all; the n-th retry waits ``base_delay`` ×
    ``multiplier``ⁿ⁻¹ (at most ``max_delay``, minus up to ``jitter`` of it), or longer when
    ``Retry-After`` asks for it; a ``Retry-After`` over ``max_retry_after`` is not retried."""

    max_attempts: int = 3
    base_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 10.0
    jitter: float = 0.5  # fraction of the delay that is randomised away
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be within [0, 1]")


def is_idempotent(method: str) -> bool:
    return method.upper() in IDEMPOTENT_METHODS


def is_retryable_status(status: int) -> bool:
    return status == 429 or status >= 500


def parse_retry_after(value: str | bytes | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` value (delta-seconds or HTTP-date).

    ``now`` is the current POSIX time (from the injected clock).  Returns None
    for a missing or unparsable value.
    """
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff_delay(attempt: int, policy: RetryPolicy, rand: Callable[[], float] = random.random) -> float:
    """Delay before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
    raw = policy.base_delay * policy.multiplier ** (attempt - 1)
    capped = min(raw, policy.max_delay)
    return capped * (1.0 - policy.jitter * rand())


def next_delay(
    method: str,
    attempt: int,
    policy: RetryPolicy,
    *,
    status: int | None = None,
    connection_error: bool = False,
    retry_after: float | None = None,
    rand: Callable[[], float] = random.random,
) -> float | None:
    """The delay before retrying, or None when the call must not be retried.

    ``attempt`` is the number of the attempt that just failed (1-based).
    Exactly one of ``status`` (an HTTP response arrived) or
    ``connection_error`` (connection failure or timeout) describes the outcome.
    """
    if not is_idempotent(method):
        return None
    if attempt >= policy.max_attempts:
        return None
    if status is not None:
        if not is_retryable_status(status):
            return None
    elif not connection_error:
        return None
    delay = backoff_delay(attempt, policy, rand)
    if retry_after is not None:
        if retry_after > policy.max_retry_after:
            return None
        delay = max(delay, retry_after)
    return delay
