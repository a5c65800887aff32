"""Replicate models and versions per hardware profile (pure; S4, S18).

Each hardware profile runs on its own Replicate model, by default
``simpletuner/advanced-trainer-<profile>`` (the models SimpleTuner publishes),
configurable per profile with the provider setting ``models``.  The version a
submission runs is, in order: ``version_override`` (one version for every
profile, as SimpleTuner's own server and CLI call it), ``model_versions``
(per profile, key ``default`` for all), else the newest version Replicate
reports for the profile's model -- read through the provider client and kept
in a :class:`VersionCache` for ``model_version_ttl`` seconds of the injected
clock.

Versions are sent to Replicate as ``owner/name:version_id``, the form
SimpleTuner's server sends; an override is sent exactly as configured.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Optional

DEFAULT_OWNER = "simpletuner"
DEFAULT_MODEL_PREFIX = "advanced-trainer-"

# Replicate owner and model names: lowercase letters, digits, dashes,
# underscores and dots (we accept upper case and let Replicate decide).
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}"
MODEL_ID = re.compile(rf"^({_NAME})/({_NAME})$")
VERSION = re.compile(rf"^(?:{_NAME}/{_NAME}:)?[A-Za-z0-9._-]{{1,128}}$")


def default_model(profile: str) -> str:
    return f"{DEFAULT_OWNER}/{DEFAULT_MODEL_PREFIX}{profile}"


def model_for(profile: str, models: Optional[Mapping[str, str]] = None) -> str:
    """The Replicate model (``owner/name``) a hardware profile runs on."""
    chosen = (models or {}).get(profile)
    return chosen or default_model(profile)


def parse_model_id(value: Any) -> tuple[str, str]:
    """``"owner/name"`` → ``(owner, name)``; raises ValueError(reason)."""
    if not isinstance(value, str) or not MODEL_ID.match(value.strip()):
        raise ValueError("must be a Replicate model id owner/name")
    owner, name = value.strip().split("/", 1)
    return owner, name


def check_version(value: Any) -> str:
    """A version id or ``owner/name:version_id``; raises ValueError(reason)."""
    if not isinstance(value, str) or not VERSION.match(value.strip()):
        raise ValueError("must be a Replicate version id or owner/name:version_id")
    return value.strip()


def configured_version(profile: str, version_override: str = "",
                       model_versions: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The version set by configuration for ``profile`` (override first), or None."""
    if version_override:
        return version_override
    versions = model_versions or {}
    return versions.get(profile) or versions.get("default") or None


def full_version(model_id: str, version_id: str) -> str:
    return f"{model_id}:{version_id}"


def version_id(version: str) -> str:
    """The bare version id of ``owner/name:id`` (or of a bare id)."""
    return version.rsplit(":", 1)[-1]


def _created(value: Any) -> float:
    if not isinstance(value, str) or not value:
        return float("-inf")
    try:
        stamp = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return float("-inf")
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.timestamp()


@dataclass(frozen=True)
class ModelVersion:
    id: str
    created_at: Optional[str]
    model_id: str

    @property
    def full_version(self) -> str:
        return full_version(self.model_id, self.id)

    def public(self, current: Optional[str] = None) -> dict:
        return {"id": self.id, "created_at": self.created_at, "model_id": self.model_id,
                "full_version": self.full_version,
                "current": current is not None and current in (self.id, self.full_version)}


def parse_versions(model_id: str, results: Iterable[Any]) -> list[ModelVersion]:
    """Replicate's ``results`` of ``GET /v1/models/{o}/{n}/versions`` → newest first.

    Replicate documents the list as newest first; it is sorted again by
    ``created_at`` so a reordered page cannot pick an old version."""
    out = []
    for item in results or ():
        if not isinstance(item, Mapping):
            continue
        vid = item.get("id")
        if not isinstance(vid, str) or not vid:
            continue
        created = item.get("created_at")
        out.append(ModelVersion(vid, created if isinstance(created, str) else None, model_id))
    out.sort(key=lambda v: _created(v.created_at), reverse=True)  # stable: ties keep Replicate's order
    return out


def latest_from_model(model_id: str, model: Mapping[str, Any]) -> Optional[ModelVersion]:
    """The ``latest_version`` of a ``GET /v1/models/{o}/{n}`` answer, if any."""
    latest = model.get("latest_version") if isinstance(model, Mapping) else None
    if isinstance(latest, Mapping) and isinstance(latest.get("id"), str) and latest["id"]:
        created = latest.get("created_at")
        return ModelVersion(latest["id"], created if isinstance(created, str) else None, model_id)
    return None


class VersionCache:
    """Newest version per model, valid for ``ttl`` seconds (times passed in)."""

    def __init__(self, ttl: float):
        self.ttl = float(ttl)
        self._entries: dict[str, tuple[ModelVersion, float]] = {}

    def get(self, model_id: str, now: float) -> Optional[ModelVersion]:
        entry = self._entries.get(model_id)
        if entry is None or now - entry[1] >= self.ttl:
            return None
        return entry[0]

    def put(self, model_id: str, version: ModelVersion, now: float) -> None:
        self._entries[model_id] = (version, now)

    def clear(self) -> None:
        self._entries.clear()
