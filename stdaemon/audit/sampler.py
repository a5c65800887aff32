"""Sampling of flood-prone audit events (pure: the caller passes ``now``).

Per ``(event_type, ip)`` at most ``limit`` entries are written per window and per event
type at most ``global_limit`` over all addresses; the others are only counted.  When a
window closes, one aggregate stands for its suppressed events (events over the global cap
are aggregated under ``ip = "*"``).

The rate limiter's ``SampledCounter`` (``stdaemon/ratelimit/sliding_window.py``) is a
different policy on purpose: one recorded entry per key and interval that carries the
count of what it stands for, and no aggregate entries.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

from stdaemon.audit.chain import MINUTE


class AuditSampler:
    """Per ``(event_type, ip)`` fixed windows: the first ``limit`` events of a
    window are recorded, the rest counted; at most ``global_limit`` recorded
    per event type per window.  :meth:`offer` says whether to record and
    returns aggregates of windows that closed; :meth:`flush` closes windows
    that ended by ``now``.  Memory is bounded by ``max_keys``."""

    def __init__(self, limit: int = 5, global_limit: int = 100, window: float = MINUTE,
                 max_keys: int = 10_000):
        self.limit = max(0, int(limit))
        self.global_limit = max(0, int(global_limit))
        self.window = float(window)
        self.max_keys = max_keys
        # key -> {"start", "recorded", "suppressed", "reasons", "sample"}
        self._keys: OrderedDict[tuple[str, str], dict] = OrderedDict()
        self._global: dict[str, list] = {}   # event_type -> [window start, recorded]
        self.suppressed_total = 0

    def __len__(self) -> int:
        return len(self._keys)

    def _aggregate(self, key: tuple[str, str], state: dict, now: float) -> Optional[dict]:
        if not state["suppressed"]:
            return None
        return {"event_type": key[0], "ip": key[1], "suppressed": state["suppressed"],
                "window_start": state["start"], "window_end": min(now, state["start"] + self.window),
                "reasons": dict(state["reasons"]), "sample": state["sample"]}

    def offer(self, event_type: str, ip: Optional[str], now: float,
              reason: Optional[str] = None, sample: Any = None) -> tuple[bool, list[dict]]:
        """``(record_it, closed_aggregates)`` for one event at ``now``."""
        closed: list[dict] = []
        key = (event_type, ip or "")
        state = self._keys.get(key)
        if state is not None and now - state["start"] >= self.window:
            agg = self._aggregate(key, state, now)
            if agg:
                closed.append(agg)
            del self._keys[key]
            state = None
        glob = self._global.get(event_type)
        if glob is None or now - glob[0] >= self.window:
            glob = self._global[event_type] = [now, 0]
        if state is None:
            state = {"start": now, "recorded": 0, "suppressed": 0, "reasons": {}, "sample": None}
            self._keys[key] = state
            while len(self._keys) > self.max_keys:
                old_key, old_state = self._keys.popitem(last=False)
                agg = self._aggregate(old_key, old_state, now)
                if agg:
                    closed.append(agg)
        else:
            self._keys.move_to_end(key)
        if state["recorded"] < self.limit and glob[1] < self.global_limit:
            state["recorded"] += 1
            glob[1] += 1
            return True, closed
        # Suppressed.  Over the global cap, count it under the "*" key so
        # the per-address table cannot be used to multiply aggregates.
        self.suppressed_total += 1
        if state["recorded"] < self.limit:
            if state["recorded"] == 0 and not state["suppressed"]:
                del self._keys[key]
            star = (event_type, "*")
            state = self._keys.get(star)
            if state is None:
                state = self._keys[star] = {"start": glob[0], "recorded": 0, "suppressed": 0,
                                            "reasons": {}, "sample": None}
        state["suppressed"] += 1
        if reason is not None and (reason in state["reasons"] or len(state["reasons"]) < 10):
            state["reasons"][reason] = state["reasons"].get(reason, 0) + 1
        if state["sample"] is None and sample is not None:
            state["sample"] = sample
        return False, closed

    def flush(self, now: float, force: bool = False) -> list[dict]:
        """Close every window that ended by ``now`` (all of them with ``force``)."""
        closed = []
        for key in list(self._keys):
            state = self._keys[key]
            if force or now - state["start"] >= self.window:
                agg = self._aggregate(key, state, now)
                if agg:
                    closed.append(agg)
                del self._keys[key]
        for event_type in list(self._global):
            if force or now - self._global[event_type][0] >= self.window:
                del self._global[event_type]
        return closed
