"""Approval rules and quotas: validation and evaluation (pure; S4).

- A submission's cost estimate is ``max_runtime_minutes`` (submission field,
  else the provider's setting, else 120) × price per GPU-second × 60 × GPUs.
- Approval rules: ``cost_exceeds`` (value: USD; holds when estimate > value)
  and ``hardware_profile`` (value: a profile name or a list of them).  The
  first matching rule (lowest id) holds the submission.
- Quotas: ``concurrent_jobs`` (active jobs, the new one included),
  ``daily_cost_usd`` / ``monthly_cost_usd`` (cost of the user's jobs created
  in the current UTC day/month plus the estimate).  A quota applies to one
  user (``user_id``), to a role (``role``) or, with neither, to everyone.
  Over the limit: ``block`` refuses, ``warn`` warns, ``require_approval``
  holds the submission for an admin's approval; a blocking quota also warns
  from 80 % of its limit.  SimpleTuner's names are accepted too
  (``cost_daily``, ``cost_monthly``; ``limit_value`` for ``limit``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

from stdaemon.jobs import costs
from stdaemon.invalid import InvalidValue

CONDITIONS = ("cost_exceeds", "hardware_profile")
QUOTA_TYPES = ("concurrent_jobs", "daily_cost_usd", "monthly_cost_usd")
# SimpleTuner's names for the same quota types.
QUOTA_TYPE_ALIASES = {"cost_daily": "daily_cost_usd", "cost_monthly": "monthly_cost_usd"}
QUOTA_ACTIONS = ("block", "warn", "require_approval")
QUOTA_TYPE_INFO = {
    "concurrent_jobs": ("Jobs not yet completed, failed or cancelled, the new one included", "jobs"),
    "daily_cost_usd": ("Cost of jobs created in the current UTC day plus the estimate", "USD"),
    "monthly_cost_usd": ("Cost of jobs created in the current UTC month plus the estimate", "USD"),
}
QUOTA_ACTION_INFO = {
    "block": "Refuse the submission",
    "warn": "Accept it with a warning in quota_warnings",
    "require_approval": "Hold it as pending_approval until an admin or operator approves it",
}
ROLES = ("admin", "operator", "viewer")
DEFAULT_MAX_RUNTIME_MINUTES = 120.0
MAX_RUNTIME_MINUTES = 60.0 * 24 * 30
WARN_FRACTION = 0.8


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# -- estimate -------------------------------------------------------------------

def max_runtime_minutes(submission: Mapping[str, Any], provider_default: Any = None) -> float:
    for candidate, field_name in ((submission.get("max_runtime_minutes"), "max_runtime_minutes"),
                                  (provider_default, None)):
        if candidate is None:
            continue
        if not _number(candidate) or not (0 < candidate <= MAX_RUNTIME_MINUTES):
            if field_name:
                raise InvalidValue(field_name, f"must be a number of minutes between 0 and "
                                             f"{int(MAX_RUNTIME_MINUTES)}", show_path=False)
            continue
        return float(candidate)
    return DEFAULT_MAX_RUNTIME_MINUTES


def estimate_usd(submission: Mapping[str, Any], hardware_profile: Optional[str] = None,
                 provider_default_minutes: Any = None,
                 prices: Optional[Mapping[str, float]] = None) -> float:
    profile_name = hardware_profile or submission.get("hardware_profile") or costs.DEFAULT_PROFILE
    try:
        costs.profile(profile_name)
    except ValueError as error:
        raise InvalidValue("hardware_profile", str(error), show_path=False) from None
    minutes = max_runtime_minutes(submission, provider_default_minutes)
    return costs.estimate_cost(minutes, profile_name, prices)


# -- rules ----------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    id: int
    name: str
    condition: str
    value: Any

    def matches(self, hardware_profile: str, estimate: float) -> bool:
        if self.condition == "cost_exceeds":
            return estimate > float(self.value)
        if self.condition == "hardware_profile":
            names = self.value if isinstance(self.value, list) else [self.value]
            return hardware_profile in names
        return False

    def reason(self, hardware_profile: str, estimate: float) -> str:
        if self.condition == "cost_exceeds":
            return f"estimated cost ${estimate:.2f} exceeds ${float(self.value):.2f} (rule {self.name!r})"
        return f"hardware profile {hardware_profile} needs approval (rule {self.name!r})"


def validate_rule(body: Mapping[str, Any]) -> tuple[str, str, Any]:
    unknown = set(body) - {"name", "condition", "value"}
    if unknown:
        raise InvalidValue(sorted(unknown)[0], "unknown field", show_path=False)
    name = body.get("name")
    if not isinstance(name, str) or not name.strip() or len(name) > 100:
        raise InvalidValue("name", "a name of 1-100 characters is required", show_path=False)
    condition = body.get("condition")
    if condition not in CONDITIONS:
        raise InvalidValue("condition", f"must be one of {', '.join(CONDITIONS)}", show_path=False)
    value = body.get("value")
    if condition == "cost_exceeds":
        if not _number(value) or value < 0:
            raise InvalidValue("value", "must be a non-negative amount in USD", show_path=False)
        value = float(value)
    else:
        names = value if isinstance(value, list) else [value]
        if not names or not all(isinstance(n, str) and n in costs.HARDWARE_PROFILES for n in names):
            raise InvalidValue("value", "must be a hardware profile (or a list of them): "
                                      + ", ".join(costs.HARDWARE_PROFILES), show_path=False)
        value = names if isinstance(value, list) else value
    return name.strip(), condition, value


def first_match(rules: Iterable[Rule], hardware_profile: str, estimate: float) -> Optional[Rule]:
    for rule in sorted(rules, key=lambda r: r.id):
        if rule.matches(hardware_profile, estimate):
            return rule
    return None


# -- quotas ---------------------------------------------------------------------

@dataclass(frozen=True)
class Quota:
    id: int
    quota_type: str
    limit: float
    action: str
    user_id: Optional[int] = None
    role: Optional[str] = None

    def applies_to(self, user_id: int, role: str) -> bool:
        if self.user_id is not None:
            return self.user_id == user_id
        if self.role is not None:
            return self.role == role
        return True

    def scope(self) -> str:
        if self.user_id is not None:
            return f"user {self.user_id}"
        if self.role is not None:
            return f"role {self.role}"
        return "everyone"


def validate_quota(body: Mapping[str, Any]) -> dict:
    """A quota from a validated ``CreateQuota`` body (``stdaemon/approvals/http_quotas.py``: the
    model already holds the field names, types, ranges, type names, actions and roles): what is
    left are the rules across fields."""
    for scope in ("team_id", "org_id", "level_id"):
        if body.get(scope) is not None:
            raise InvalidValue(scope, "stdaemon has no teams, organisations or levels: give user_id or role", show_path=False)
    quota_type = QUOTA_TYPE_ALIASES.get(body["quota_type"], body["quota_type"])
    limit_field = "limit" if "limit" in body or "limit_value" not in body else "limit_value"
    if "limit" in body and "limit_value" in body and body["limit"] != body["limit_value"]:
        raise InvalidValue("limit_value", "contradicts limit", show_path=False)
    limit = body.get(limit_field)
    if not _number(limit) or limit < 0 or (quota_type == "concurrent_jobs" and limit != int(limit)):
        raise InvalidValue(limit_field, "must be a non-negative number (a whole number for concurrent_jobs)", show_path=False)
    action = body.get("action", "block")
    user_id = body.get("user_id")
    role = body.get("role")
    if user_id is not None and role is not None:
        raise InvalidValue("role", "give user_id or role, not both", show_path=False)
    return {"quota_type": quota_type, "limit": float(limit), "action": action,
            "user_id": user_id, "role": role}


def usage_of(quota_type: str, usage: "Usage") -> float:
    """The figure a quota of ``quota_type`` is measured against."""
    return float(getattr(usage, quota_type))


@dataclass
class Usage:
    concurrent_jobs: int = 0
    daily_cost_usd: float = 0.0
    monthly_cost_usd: float = 0.0


@dataclass
class QuotaResult:
    allowed: bool = True
    warnings: list[str] = field(default_factory=list)
    blocked: list[str] = field(default_factory=list)
    # Exceeded quotas whose action is ``require_approval``: the submission is held.
    approval: list[str] = field(default_factory=list)

    @property
    def detail(self) -> str:
        return "; ".join(self.blocked) or "; ".join(self.warnings)


def evaluate_quotas(quotas: Iterable[Quota], user_id: int, role: str, usage: Usage,
                    estimate: float = 0.0) -> QuotaResult:
    result = QuotaResult()
    for quota in sorted(quotas, key=lambda q: q.id):
        if not quota.applies_to(user_id, role):
            continue
        if quota.quota_type == "concurrent_jobs":
            projected = usage.concurrent_jobs + 1
            what = f"{projected} active jobs"
        elif quota.quota_type == "daily_cost_usd":
            projected = usage.daily_cost_usd + estimate
            what = f"${projected:.2f} today"
        else:
            projected = usage.monthly_cost_usd + estimate
            what = f"${projected:.2f} this month"
        label = f"{quota.quota_type} quota {quota.limit:g} ({quota.scope()})"
        if projected > quota.limit:
            if quota.action == "block":
                result.allowed = False
                result.blocked.append(f"{label} would be exceeded: {what}")
            elif quota.action == "require_approval":
                result.approval.append(f"{label} would be exceeded: {what}")
            else:
                result.warnings.append(f"{label} exceeded: {what}")
        elif quota.action == "block" and quota.limit > 0 and projected >= WARN_FRACTION * quota.limit:
            result.warnings.append(f"{label} nearly reached: {what}")
    return result
