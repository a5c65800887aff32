"""Timestamps in API answers (S18): ISO 8601, UTC, millisecond precision.

The database keeps POSIX seconds (REAL) so comparisons and arithmetic stay
cheap; every answer shows them as ``2026-01-01T12:00:00.000Z``, the shape
SimpleTuner's own clients slice and print.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Iterable, Optional


def iso(seconds: Any) -> Optional[str]:
    """POSIX seconds → ``YYYY-MM-DDTHH:MM:SS.mmmZ``; None (or a value that is
    not a finite number) → None; a string is assumed to be ISO already."""
    if seconds is None or isinstance(seconds, bool):
        return None
    if isinstance(seconds, str):
        return seconds
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value):
        return None
    try:
        moment = datetime.fromtimestamp(value, tz=timezone.utc)
    except (OverflowError, OSError, ValueError):
        return None
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def with_iso(record: dict, names: Iterable[str]) -> dict:
    """A copy of ``record`` with the named fields (when present) as ISO strings."""
    out = dict(record)
    for name in names:
        if name in out:
            out[name] = iso(out[name])
    return out
