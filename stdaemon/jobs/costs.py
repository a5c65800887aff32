"""Hardware profiles, job cost and cost-limit arithmetic (pure; S4).

cost = predict_time_seconds × price_per_gpu_second(profile) × gpu_count.
Prices are per GPU-second and configurable per provider; the defaults are
Replicate's published per-second prices for one H100 and one L40S.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Mapping

DEFAULT_GPU_PRICES = {  # USD per GPU-second
    "h100": 0.001525,
    "l40s": 0.000975,
}


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    gpu: str
    gpu_count: int


HARDWARE_PROFILES: dict[str, HardwareProfile] = {}
for _gpu in ("h100", "l40s"):
    for _count in (1, 2, 4, 8):
        _name = _gpu if _count == 1 else f"{_gpu}-x{_count}"
        HARDWARE_PROFILES[_name] = HardwareProfile(_name, _gpu, _count)
DEFAULT_PROFILE = "h100"

PERIODS = ("daily", "weekly", "monthly")
ACTIONS = ("warn", "block", "require_approval")
WARN_FRACTION = 0.8


def profile(name: str) -> HardwareProfile:
    try:
        return HARDWARE_PROFILES[name]
    except KeyError:
        raise ValueError(
            f"unknown hardware profile {name!r}; choose one of {', '.join(HARDWARE_PROFILES)}"
        ) from None


def price_per_gpu_second(profile_name: str, prices: Mapping[str, float] | None = None) -> float:
    """Price for one GPU of the profile; ``prices`` may name a profile or a GPU type."""
    hw = profile(profile_name)
    prices = prices or {}
    if profile_name in prices:
        return float(prices[profile_name])
    return float(prices.get(hw.gpu, DEFAULT_GPU_PRICES[hw.gpu]))


def job_cost(predict_time_seconds: float | None, profile_name: str,
             prices: Mapping[str, float] | None = None) -> float:
    if not predict_time_seconds or predict_time_seconds < 0:
        return 0.0
    hw = profile(profile_name)
    return round(float(predict_time_seconds) * price_per_gpu_second(profile_name, prices) * hw.gpu_count, 6)


def estimate_cost(max_runtime_minutes: float, profile_name: str,
                  prices: Mapping[str, float] | None = None) -> float:
    return job_cost(max_runtime_minutes * 60.0, profile_name, prices)


def period_start(now: float, period: str) -> float:
    """POSIX time at which the current cost period began (UTC calendar)."""
    moment = datetime.fromtimestamp(now, tz=timezone.utc)
    day = moment.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "daily":
        start = day
    elif period == "weekly":
        start = day - timedelta(days=day.weekday())  # Monday 00:00 UTC
    elif period == "monthly":
        start = day.replace(day=1)
    else:
        raise ValueError(f"unknown cost period {period!r}; choose daily, weekly or monthly")
    return start.timestamp()


def period_end(now: float, period: str) -> float:
    start = datetime.fromtimestamp(period_start(now, period), tz=timezone.utc)
    if period == "daily":
        end = start + timedelta(days=1)
    elif period == "weekly":
        end = start + timedelta(days=7)
    else:
        end = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return end.timestamp()


@dataclass(frozen=True)
class CostLimitCheck:
    enabled: bool
    spent: float
    limit: float
    percent_used: float
    warning: str | None
    blocked: bool
    # Over the limit with action ``require_approval``: the submission is held.
    needs_approval: bool = False


def check_cost_limit(spent: float, *, enabled: bool, amount: float | None, action: str,
                     period: str, estimate: float = 0.0) -> CostLimitCheck:
    """Evaluate a provider's cost limit before a submission.

    ``spent`` is what jobs of the current period cost so far; ``estimate``
    the new job's expected cost (0 when unknown).  At ≥ 80 % a warning is
    given; when the limit is reached (or the estimate would exceed it) and the
    action is ``block``, the submission is blocked; with ``require_approval``
    it is held until an admin or operator approves it.
    """
    if not enabled or not amount or amount <= 0:
        return CostLimitCheck(False, spent, amount or 0.0, 0.0, None, False)
    percent = round(100.0 * spent / amount, 2)
    projected = spent + max(0.0, estimate)
    over = spent >= amount or (estimate > 0 and projected > amount)
    warning = None
    if over:
        warning = (f"{period} cost limit reached: ${spent:.2f} spent of ${amount:.2f}"
                   + (f" (this job is estimated at ${estimate:.2f})" if estimate > 0 else ""))
    elif spent >= WARN_FRACTION * amount or projected >= WARN_FRACTION * amount:
        warning = f"{period} cost limit at {percent:.0f}%: ${spent:.2f} spent of ${amount:.2f}"
    return CostLimitCheck(True, spent, amount, percent, warning, over and action == "block",
                          over and action == "require_approval")
