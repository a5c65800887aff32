"""The audit chain, pure: canonical JSON, entry and anchor hashes, a new row, and the
verification of a run of rows.  No I/O and no clock: callers pass rows and ``now``.

Each entry stores ``id, timestamp, event_type, actor, ip, target, action, details``
(canonical JSON text), ``previous_hash`` and ``entry_hash = HMAC-SHA256(key,
canonical(entry))`` where the canonical form is the compact, key-sorted JSON of *every*
stored column except ``entry_hash`` itself (so ``previous_hash`` and ``id`` are covered
too).  ``previous_hash`` is the previous entry's ``entry_hash``; the first entry links to
:data:`GENESIS`, or, after retention pruned the start of the log, to the anchor (the last
pruned entry's id and hash, itself HMAC-protected by :func:`anchor_hash`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any, Iterable, Mapping, Optional

GENESIS = "0" * 64
DAY = 86400.0
MINUTE = 60.0

# Event types emitted by stdaemon's features (S7).  Capabilities may add
# dotted names of their own; these are the ones the spec names.
EVENT_TYPES = (
    "webhook_rejected",
    "rate_limited",
    "provider.configured",
    "metrics.configured",
    "job.submitted",
    "job.cancelled",
    "job.status_changed",
    "upload.denied",
    "auth.login.success",
    "auth.login.failed",
    "api_key.created",
    "api_key.revoked",
    "backup.created",
    "backup.restored",
    "audit.pruned",
)

COLUMNS = ("id", "timestamp", "event_type", "actor", "ip", "target", "action", "details",
           "previous_hash", "entry_hash")

# Column limits: an audit entry never stores unbounded attacker input.
MAX_FIELD = 512
MAX_DETAILS = 16 * 1024


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON; floats as Python's round-tripping repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str, allow_nan=False)


def clip(value: Any) -> Optional[str]:
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= MAX_FIELD else text[:MAX_FIELD - 1] + "…"


def details_text(details: Any) -> str:
    if details is None:
        return "null"
    try:
        text = canonical_json(details)
    except (TypeError, ValueError):
        text = canonical_json({"repr": repr(details)[:MAX_DETAILS]})
    if len(text) > MAX_DETAILS:
        text = canonical_json({"truncated": True, "prefix": text[:MAX_DETAILS - 100]})
    return text


def entry_hash(key: bytes, row: Mapping[str, Any]) -> str:
    """HMAC-SHA256 over every stored column of ``row`` except ``entry_hash``."""
    payload = {name: row[name] for name in COLUMNS if name != "entry_hash"}
    payload["timestamp"] = float(payload["timestamp"])
    payload["id"] = int(payload["id"])
    message = canonical_json(payload).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def anchor_hash(key: bytes, last_id: int, last_hash: str, pruned_total: int) -> str:
    message = canonical_json({"anchor": True, "last_id": int(last_id), "last_hash": last_hash,
                              "pruned_total": int(pruned_total)}).encode("utf-8")
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def new_row(key: bytes, next_id: int, previous: str, now: float, event_type: str,
            actor: Any = "system", ip: Any = None, target: Any = None, action: Any = None,
            details: Any = None) -> dict:
    """The stored row of one new entry (with its ``entry_hash``), linked to ``previous``."""
    if not event_type or not isinstance(event_type, str):
        raise ValueError("audit event_type must be a non-empty string")
    row = {
        "id": next_id,
        "timestamp": float(now),
        "event_type": clip(event_type),
        "actor": clip(actor if actor not in (None, "") else "system"),
        "ip": clip(ip) if ip else None,
        "target": clip(target),
        "action": clip(action),
        "details": details_text(details),
        "previous_hash": previous,
    }
    row["entry_hash"] = entry_hash(key, row)
    return row


def row_to_dict(row: Mapping[str, Any]) -> dict:
    """The API shape of one entry (details decoded)."""
    out = {name: row[name] for name in COLUMNS}
    try:
        out["details"] = json.loads(row["details"]) if row["details"] is not None else None
    except ValueError:
        out["details"] = row["details"]
    return out


def anchor_ok(key: bytes, last_id: int, last_hash: str, pruned_total: int, stored: str) -> bool:
    """Whether the stored retention anchor matches its HMAC."""
    return hmac.compare_digest(anchor_hash(key, last_id, last_hash, pruned_total), stored)


def entry_ok(key: bytes, row: Mapping[str, Any]) -> bool:
    """Whether ``row``'s ``entry_hash`` matches its content."""
    return hmac.compare_digest(entry_hash(key, row), row["entry_hash"])


def check_rows(key: bytes, rows: Iterable[Mapping[str, Any]], after_id: int,
               previous_hash: str) -> dict:
    """Walk consecutive rows (by id) that follow ``after_id``/``previous_hash``.

    Returns ``{"checked", "last_id", "previous_hash", "broken"}`` where ``broken`` is
    ``None`` or ``{"id", "reason"}`` for the first bad entry."""
    checked = 0
    last_id = after_id
    for row in rows:
        checked += 1
        rid = int(row["id"])
        if not hmac.compare_digest(str(row["previous_hash"]), previous_hash):
            return {"checked": checked, "last_id": rid, "previous_hash": previous_hash,
                    "broken": {"id": rid, "reason": "previous_hash does not match the entry before "
                                                    "(an entry was removed, inserted or reordered)"}}
        try:
            expected = entry_hash(key, row)
        except (TypeError, ValueError):
            expected = ""
        if not hmac.compare_digest(expected, str(row["entry_hash"])):
            return {"checked": checked, "last_id": rid, "previous_hash": previous_hash,
                    "broken": {"id": rid, "reason": "entry_hash does not match the entry's content"}}
        previous_hash = row["entry_hash"]
        last_id = rid
    return {"checked": checked, "last_id": last_id, "previous_hash": previous_hash, "broken": None}
