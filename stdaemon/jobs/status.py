"""Job statuses, the mapping from provider statuses, and guarded transitions (S4).

A terminal job (completed, failed, cancelled) never changes status again.
Updates that would move a job backwards (a late ``starting`` webhook after
``processing`` was seen, say) are ignored and reported as out of order so the
caller can count them.
"""

from __future__ import annotations

from dataclasses import dataclass

PENDING = "pending"
PENDING_APPROVAL = "pending_approval"
UPLOADING = "uploading"
QUEUED = "queued"
RUNNING = "running"
COMPLETED = "completed"
FAILED = "failed"
CANCELLED = "cancelled"

STATUSES = (PENDING, PENDING_APPROVAL, UPLOADING, QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED)
TERMINAL = frozenset({COMPLETED, FAILED, CANCELLED})
ACTIVE = frozenset({PENDING, UPLOADING, QUEUED, RUNNING})

# Progress order; all terminal statuses share the highest rank.
_RANK = {
    PENDING_APPROVAL: 0,
    PENDING: 1,
    UPLOADING: 2,
    QUEUED: 3,
    RUNNING: 4,
    COMPLETED: 5,
    FAILED: 5,
    CANCELLED: 5,
}

# Replicate prediction statuses.
REPLICATE_STATUS = {
    "starting": QUEUED,
    "processing": RUNNING,
    "succeeded": COMPLETED,
    "failed": FAILED,
    "canceled": CANCELLED,
    "cancelled": CANCELLED,
}

# SimpleTuner trainer event statuses (``data.status`` of trainer webhooks).
TRAINER_STATUS = {
    "pending": PENDING,
    "queued": QUEUED,
    "starting": QUEUED,
    "uploading": UPLOADING,
    "running": RUNNING,
    "training": RUNNING,
    "processing": RUNNING,
    "completed": COMPLETED,
    "complete": COMPLETED,
    "succeeded": COMPLETED,
    "success": COMPLETED,
    "failed": FAILED,
    "error": FAILED,
    "cancelled": CANCELLED,
    "canceled": CANCELLED,
    # SimpleTuner's trainer (helpers/training/trainer.py): a top-level
    # ``status: training_failed`` when training cannot start or crashes.
    "training_failed": FAILED,
    "training_complete": COMPLETED,
    "training_completed": COMPLETED,
    "training_started": RUNNING,
    "started": RUNNING,
}


def is_terminal(status: str) -> bool:
    return status in TERMINAL


def from_replicate(status: str | None) -> str | None:
    """Job status for a Replicate prediction status (None if unknown)."""
    if not isinstance(status, str):
        return None
    return REPLICATE_STATUS.get(status.strip().lower())


def from_trainer(status: str | None) -> str | None:
    if not isinstance(status, str):
        return None
    return TRAINER_STATUS.get(status.strip().lower())


@dataclass(frozen=True)
class Transition:
    accepted: bool
    # "changed", "unchanged", "terminal" (job already finished),
    # "out_of_order" (would move backwards) or "unknown" (not a job status).
    reason: str


def check_transition(current: str, new: str) -> Transition:
    """May a job in ``current`` move to ``new``?"""
    if new not in _RANK:
        return Transition(False, "unknown")
    if current == new:
        return Transition(False, "unchanged")
    if current in TERMINAL:
        return Transition(False, "terminal")
    if _RANK[new] < _RANK.get(current, 0):
        return Transition(False, "out_of_order")
    return Transition(True, "changed")
