"""Metrics settings (S10), pure: the categories, the guide's templates, and the
validation of what the API may change (``prometheus_enabled``, ``prometheus_categories``).

Layering (config ``metrics.*`` under values saved through the API) is kept by
:class:`stdaemon.metrics.service.Metrics`; saving is :mod:`stdaemon.metrics.store`.
"""

from __future__ import annotations

from typing import Any, Mapping

from stdaemon.config.loader import METRIC_CATEGORIES
from stdaemon.invalid import InvalidValue

CATEGORIES: tuple[str, ...] = tuple(METRIC_CATEGORIES)

# The guide's configuration templates.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "minimal": ("jobs",),
    "standard": ("jobs", "http", "health"),
    "security": ("jobs", "http", "rate_limits", "audit", "approvals"),
    "full": CATEGORIES,
}

SETTING_KEYS = ("prometheus_enabled", "prometheus_categories")


def normalise_categories(value: Any, field: str = "prometheus_categories") -> tuple[str, ...]:
    """A list of known categories (duplicates dropped, order kept) or InvalidValue."""
    if isinstance(value, str):
        value = [part.strip() for part in value.split(",") if part.strip()]
    if not isinstance(value, (list, tuple)):
        raise InvalidValue(field, "must be a list of category names")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in CATEGORIES:
            raise InvalidValue(field, f"unknown category {item!r} (known: {', '.join(CATEGORIES)})")
        if item not in out:
            out.append(item)
    return tuple(out)


def validate_update(body: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a PUT body; ``None`` for a key means back to the config value."""
    changes: dict[str, Any] = {}
    for key, value in body.items():
        if key not in SETTING_KEYS:
            raise InvalidValue(key, f"unknown setting (known: {', '.join(SETTING_KEYS)})")
        if value is None:
            changes[key] = None
        elif key == "prometheus_enabled":
            if not isinstance(value, bool):
                raise InvalidValue(key, "must be true or false")
            changes[key] = value
        else:
            changes[key] = list(normalise_categories(value, key))
    return changes
