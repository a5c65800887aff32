"""Sliding-window rate limiting: pure logic, no I/O and no clock of its own.

The window is a *sliding log*: every admitted request leaves its timestamp,
and a request at time ``now`` is admitted only while fewer than ``limit``
timestamps lie in ``(now - period, now]``.  Unlike a fixed window (which
resets a counter at boundaries and so lets ``2 * limit`` requests through
around a boundary), no interval of length ``period`` ever contains more than
``limit`` admitted requests.  Denied requests leave no timestamp, so a client
that keeps hammering is admitted again as soon as its oldest admitted request
leaves the window.

Callers pass ``now`` (from an injected ``IReactorTime``); nothing here reads a
clock.  The same arithmetic backs every backend: the in-memory table below,
the SQLite backend (a JSON array of timestamps per key) and the Lua script of
the Redis backend (a sorted set per key).

Also here: :class:`SampledCounter`, the pure sampler that keeps a flood of
violations from flooding the audit log.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Iterable, MutableSequence, Sequence

__all__ = [
    "WindowState",
    "evaluate",
    "prune",
    "SlidingWindow",
    "SlidingWindowTable",
    "SampledCounter",
    "RecentKeys",
]


@dataclass(frozen=True, slots=True)
class WindowState:
    """The outcome of one decision (or of a read-only look at a window).

    ``count`` is the number of admitted requests inside the window *after*
    the decision.  ``reset_at`` is the absolute time at which the oldest
    counted request leaves the window (``now`` when the window is empty), and
    ``retry_at`` the earliest time at which a request would be admitted again.
    """

    allowed: bool
    limit: int
    period: float
    count: int
    now: float
    reset_at: float
    retry_at: float

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    @property
    def reset_in(self) -> float:
        return max(0.0, self.reset_at - self.now)

    @property
    def retry_after(self) -> float:
        """Seconds until a request would be admitted (0 when one would be now)."""
        return max(0.0, self.retry_at - self.now)

    @property
    def reset_epoch(self) -> int:
        """``reset_at`` as whole seconds, rounded up (for ``X-RateLimit-Reset``)."""
        return int(math.ceil(self.reset_at))

    @property
    def retry_after_seconds(self) -> int:
        """``retry_after`` rounded up to whole seconds, at least 1 (``Retry-After``)."""
        return max(1, int(math.ceil(self.retry_after)))

    def usage(self) -> dict:
        """The guide's ``get_usage`` shape."""
        return {
            "count": self.count,
            "limit": self.limit,
            "remaining": self.remaining,
            "reset_in_seconds": round(self.reset_in, 3),
        }


def prune(timestamps: MutableSequence[float], now: float, period: float) -> None:
    """Drop, from the left of a sorted sequence, timestamps outside ``(now - period, now]``."""
    horizon = now - period
    if isinstance(timestamps, deque):
        while timestamps and timestamps[0] <= horizon:
            timestamps.popleft()
    else:
        cut = bisect.bisect_right(timestamps, horizon)
        if cut:
            del timestamps[:cut]


def evaluate(timestamps: Sequence[float], now: float, limit: int, period: float,
             allowed: bool) -> WindowState:
    """Describe a pruned, sorted window (already including an admitted request)."""
    count = len(timestamps)
    reset_at = (timestamps[0] + period) if count else now
    if count < limit:
        retry_at = now
    elif limit <= 0:
        retry_at = math.inf
    else:
        # The (count - limit + 1)-th oldest must leave before there is room.
        retry_at = timestamps[count - limit] + period
        if retry_at <= now:
            # float rounding: it is still in the window, so it leaves after now
            retry_at = math.nextafter(now, math.inf)
    return WindowState(allowed=allowed, limit=limit, period=period, count=count, now=now,
                       reset_at=reset_at, retry_at=retry_at)


def _insert(timestamps: MutableSequence[float], now: float) -> None:
    # A clock that steps backwards must not break the sorted order.
    if not timestamps or timestamps[-1] <= now:
        timestamps.append(now)
    else:
        bisect.insort(timestamps, now)


def decide(timestamps: MutableSequence[float], now: float, limit: int,
           period: float) -> WindowState:
    """Prune, admit ``now`` if there is room (mutating ``timestamps``), describe."""
    prune(timestamps, now, period)
    allowed = len(timestamps) < limit
    if allowed:
        _insert(timestamps, now)
    return evaluate(timestamps, now, limit, period, allowed)


class SlidingWindow:
    """The log of one key.  Holds at most ``limit`` timestamps."""

    __slots__ = ("timestamps", "expires_at")

    def __init__(self) -> None:
        self.timestamps: deque[float] = deque()
        self.expires_at = -math.inf

    def hit(self, now: float, limit: int, period: float) -> WindowState:
        state = decide(self.timestamps, now, limit, period)
        if self.timestamps:
            self.expires_at = max(self.expires_at, self.timestamps[-1] + period)
        return state

    def peek(self, now: float, limit: int, period: float) -> WindowState:
        prune(self.timestamps, now, period)
        return evaluate(self.timestamps, now, limit, period, len(self.timestamps) < limit)


class SlidingWindowTable:
    """Windows per key with bounded memory.

    * ``sweep(now)`` drops keys whose newest request has left its window (the
      memory backend calls it from a timer on the injected clock);
    * at most ``max_keys`` keys are tracked: inserting one more evicts the
      least recently used key.  Evicting a live key forgets its history (the
      client gets a fresh window), which only an attacker controlling more
      than ``max_keys`` addresses can provoke — and such an attacker is not
      held back by per-address limits anyway.

    Each key holds at most ``limit`` timestamps, so memory is bounded by
    ``max_keys * max(limit)``.
    """

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.max_keys = max_keys
        self._windows: OrderedDict[str, SlidingWindow] = OrderedDict()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self._windows)

    def __contains__(self, key: str) -> bool:
        return key in self._windows

    def keys(self) -> Iterable[str]:
        return self._windows.keys()

    def hit(self, key: str, now: float, limit: int, period: float) -> WindowState:
        window = self._windows.get(key)
        if window is None:
            window = self._windows[key] = SlidingWindow()
            while len(self._windows) > self.max_keys:
                self._windows.popitem(last=False)
                self.evicted += 1
        else:
            self._windows.move_to_end(key)
        return window.hit(now, limit, period)

    def peek(self, key: str, now: float, limit: int, period: float) -> WindowState:
        window = self._windows.get(key)
        if window is None:
            return evaluate((), now, limit, period, limit > 0)
        return window.peek(now, limit, period)

    def sweep(self, now: float) -> int:
        """Forget keys with no request left in their window; returns how many."""
        stale = [k for k, w in self._windows.items() if w.expires_at <= now]
        for k in stale:
            del self._windows[k]
        return len(stale)

    def clear(self) -> None:
        self._windows.clear()


class SampledCounter:
    """Decide which events of a flood get recorded, and count the rest.

    An event for ``key`` is recorded when that key has had no recorded event
    in the last ``per_key_interval`` seconds *and* fewer than ``global_limit``
    events were recorded in the last ``global_period`` seconds.  Suppressed
    events are counted per key; ``record`` returns that count (since the
    key's previous recorded event) so the recorded entry can say how many it
    stands for.  Memory is bounded by ``max_keys`` (least recently used keys
    are forgotten, along with their suppressed count).
    """

    def __init__(self, per_key_interval: float = 60.0, global_limit: int = 60,
                 global_period: float = 60.0, max_keys: int = 10_000) -> None:
        self.per_key_interval = per_key_interval
        self.global_limit = global_limit
        self.global_period = global_period
        self.max_keys = max_keys
        self._global: deque[float] = deque()
        # key -> [last recorded time, suppressed since then, last seen]
        self._keys: OrderedDict[str, list] = OrderedDict()
        self.suppressed_total = 0

    def __len__(self) -> int:
        return len(self._keys)

    def record(self, key: str, now: float) -> tuple[bool, int]:
        """Return ``(record_it, suppressed_before)`` for an event at ``now``."""
        entry = self._keys.get(key)
        if entry is None:
            entry = self._keys[key] = [-math.inf, 0, now]
            while len(self._keys) > self.max_keys:
                self._keys.popitem(last=False)
        else:
            self._keys.move_to_end(key)
            entry[2] = now
        due = now - entry[0] >= self.per_key_interval
        if due:
            prune(self._global, now, self.global_period)
            if len(self._global) < self.global_limit:
                self._global.append(now)
                suppressed, entry[0], entry[1] = entry[1], now, 0
                return True, suppressed
        entry[1] += 1
        self.suppressed_total += 1
        return False, entry[1]

    def sweep(self, now: float) -> None:
        """Forget keys idle for longer than ``per_key_interval``.

        A key forgotten with suppressed events loses that count (the events
        are still in ``suppressed_total`` and in the violation metrics).
        """
        horizon = now - self.per_key_interval
        stale = [k for k, entry in self._keys.items() if entry[2] <= horizon]
        prune(self._global, now, self.global_period)
        for k in stale:
            del self._keys[k]


class RecentKeys:
    """Keys seen in the last ``horizon`` seconds (the tracked-clients gauge).

    Bounded by ``max_keys`` (least recently seen forgotten first); ``sweep``
    forgets keys not seen within the horizon.
    """

    def __init__(self, horizon: float, max_keys: int = 100_000) -> None:
        self.horizon = horizon
        self.max_keys = max_keys
        self._seen: OrderedDict[str, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def touch(self, key: str, now: float) -> None:
        if key in self._seen:
            self._seen.move_to_end(key)
        self._seen[key] = now
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)

    def sweep(self, now: float) -> int:
        """Forget keys not seen within the horizon; returns how many."""
        limit = now - self.horizon
        dropped = 0
        # least recently seen first: stop at the first key still inside
        while self._seen:
            key, seen = next(iter(self._seen.items()))
            if seen > limit:
                break
            del self._seen[key]
            dropped += 1
        return dropped
