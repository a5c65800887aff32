"""Provider update → job row change (pure; S4, S6).

ONE mapping for every path that learns about a job from its provider: the
webhook surface (a Replicate prediction or a SimpleTuner trainer event
delivered to ``/api/webhooks/<provider>``) and the poller (a prediction read
back from ``GET /v1/predictions/<id>``).  Given the payload and the job row as
it is now, :func:`plan` says whether the status may move (the guards of
:mod:`stdaemon.jobs.status`) and exactly which columns to write:

- ``status``; ``started_at`` when the job first runs (or completes without
  ever being seen running); ``completed_at`` on a terminal status;
- ``cost_usd`` = ``metrics.predict_time`` × the price per GPU-second of the
  job's hardware profile × its GPU count (:func:`stdaemon.jobs.costs.job_cost`);
- ``output_url`` (the first URL-looking value of ``output``);
- ``error_message`` on a failure.

Nothing changes on a terminal job or an out-of-order update; a repeated
status on a running job still takes its new columns (a second
``processing`` carrying metrics).  No I/O here: the caller runs the plan in
its own transaction (``stdaemon.jobs.store.apply_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from stdaemon.jobs import costs
from stdaemon.jobs import status as st

PREDICTION = "prediction"   # a Replicate prediction object
TRAINER = "trainer"         # a SimpleTuner trainer event {job_id, type, data}

MAX_URL = 4096
MAX_ERROR = 2000
MAX_PREDICT_TIME = 10 ** 9


def classify(payload: Mapping[str, Any]) -> Optional[str]:
    """:data:`PREDICTION`, :data:`TRAINER` or None (neither shape)."""
    if isinstance(payload.get("job_id"), str) and ("type" in payload or "data" in payload):
        return TRAINER
    if isinstance(payload.get("id"), str) and "status" in payload:
        return PREDICTION
    return None


def output_url(value: Any) -> Optional[str]:
    """The first URL-looking string in a prediction's ``output`` (string, list or object)."""
    if isinstance(value, str):
        return value if value.startswith(("http://", "https://", "s3://")) and len(value) <= MAX_URL else None
    if isinstance(value, list):
        for item in value:
            url = output_url(item)
            if url:
                return url
    if isinstance(value, dict):
        for key in ("url", "output_url", "uri"):
            url = output_url(value.get(key))
            if url:
                return url
    return None


def predict_time(payload: Mapping[str, Any]) -> Optional[float]:
    """``metrics.predict_time`` in seconds when it is a plausible number, else None."""
    metrics = payload.get("metrics")
    value = metrics.get("predict_time") if isinstance(metrics, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if not 0 <= value < MAX_PREDICT_TIME:  # also refuses NaN
        return None
    return float(value)


# ``lifecycle.stage`` keys that mean the whole run finished (the trainer sends
# ``training_complete`` after the final save and validation).
STAGES_COMPLETE = ("training_complete", "completed")
# Event types whose ``progress`` is the training loop's (cache building and
# other stages report their own progress, which is not the job's).
PROGRESS_TYPES = ("training.status", "training.progress", "progress", "training_progress")


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                return None
        else:
            return None
    if value != value or value in (float("inf"), float("-inf")) or abs(value) > 1e15:
        return None
    return int(value) if float(value).is_integer() and abs(value) < 2 ** 53 else float(value)


def trainer_progress(payload: Mapping[str, Any]) -> Optional[dict]:
    """The training progress a SimpleTuner trainer event carries, or None.

    Shapes (``simpletuner/helpers/webhooks/events.py``): ``training.status``
    events have ``progress: {current, total, percent, eta_seconds, metrics:
    {loss, learning_rate, epoch}}`` and ``data`` with the trainer state
    (``global_step``, ``current_epoch``, ``total_num_steps``); the final
    ``lifecycle.stage`` ``training_complete`` has ``stage.progress``."""
    kind = payload.get("type")
    stage = payload.get("stage") if isinstance(payload.get("stage"), dict) else {}
    if kind in PROGRESS_TYPES:
        progress = payload.get("progress")
    elif kind == "lifecycle.stage" and stage.get("key") in STAGES_COMPLETE:
        progress = stage.get("progress")
    else:
        return None
    progress = progress if isinstance(progress, dict) else {}
    data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
    metrics = progress.get("metrics") if isinstance(progress.get("metrics"), dict) else {}

    def first(*candidates: Any) -> Optional[float]:
        for value in candidates:
            number = _number(value)
            if number is not None:
                return number
        return None

    out = {
        "step": first(data.get("global_step"), data.get("step"), progress.get("current")),
        "total_steps": first(data.get("total_num_steps"), data.get("max_train_steps"), progress.get("total")),
        "percent": first(progress.get("percent"), data.get("percent")),
        "epoch": first(metrics.get("epoch"), data.get("current_epoch"), data.get("epoch")),
        "loss": first(metrics.get("loss"), data.get("loss"), data.get("train_loss")),
        "lr": first(metrics.get("learning_rate"), metrics.get("lr"), data.get("learning_rate"), data.get("lr")),
        "eta_seconds": first(progress.get("eta_seconds"), data.get("eta_seconds"), data.get("eta")),
    }
    out = {k: v for k, v in out.items() if v is not None}
    if not out:
        return None
    if isinstance(payload.get("timestamp"), str) and len(payload["timestamp"]) <= 64:
        out["timestamp"] = payload["timestamp"]
    return out


def job_profile(job: Mapping[str, Any]) -> str:
    profile = job.get("hardware_type")
    return profile if profile in costs.HARDWARE_PROFILES else costs.DEFAULT_PROFILE


def map_update(kind: str, payload: Mapping[str, Any], job: Mapping[str, Any],
               prices: Optional[Mapping[str, float]] = None) -> tuple[Optional[str], dict]:
    """(job status the payload means or None when unknown, column updates it carries)."""
    fields: dict[str, Any] = {}
    if kind == PREDICTION:
        new_status = st.from_replicate(payload.get("status"))
        seconds = predict_time(payload)
        if seconds is not None:
            fields["cost_usd"] = costs.job_cost(seconds, job_profile(job), prices or {})
        url = output_url(payload.get("output"))
        error = payload.get("error")
    else:
        data = payload.get("data") if isinstance(payload.get("data"), dict) else {}
        new_status = st.from_trainer(data.get("status") if "status" in data else payload.get("status"))
        stage = payload.get("stage") if isinstance(payload.get("stage"), dict) else {}
        if payload.get("type") == "lifecycle.stage" and stage.get("key") in STAGES_COMPLETE \
                and str(stage.get("status") or "completed").lower() in ("completed", "complete", "success"):
            new_status = st.COMPLETED
        url = output_url(data.get("output_url") or data.get("output"))
        error = None
        if new_status == st.FAILED:
            for source, key in ((data, "error"), (payload, "error"), (data, "message"), (payload, "message")):
                if isinstance(source.get(key), str) and source[key].strip():
                    error = source[key]
                    break
        progress = trainer_progress(payload)
        if progress:
            fields["metadata"] = {"progress": progress}
    if url:
        fields["output_url"] = url
    if error and new_status == st.FAILED:
        fields["error_message"] = str(error)[:MAX_ERROR]
    return new_status, fields


@dataclass(frozen=True)
class Plan:
    """What one update does to one job row."""

    status: Optional[str]           # the status the update means (None: unknown)
    accepted: bool                  # the status moves
    reason: str                     # changed | unchanged | terminal | out_of_order | unknown
    previous: Optional[str]         # the job's status before
    changes: Mapping[str, Any] = field(default_factory=dict)  # columns to write; empty = none

    @property
    def terminal(self) -> bool:
        """The job just reached a terminal status (credentials are revoked)."""
        return self.accepted and self.status in st.TERMINAL


def guard(job: Mapping[str, Any], new_status: Optional[str], now: float,
          fields: Optional[Mapping[str, Any]] = None) -> Plan:
    """The guarded transition of ``job`` to ``new_status`` with extra column ``fields``.

    ``None`` values in ``fields`` are dropped; ``metadata`` is merged into the
    job's (a ``None`` value there removes a key)."""
    current = job["status"]
    if new_status is None:
        return Plan(None, False, "unknown", current)
    decision = st.check_transition(current, new_status)
    changes = dict(fields or {})
    if decision.accepted:
        changes["status"] = new_status
        if new_status == st.RUNNING and job.get("started_at") is None:
            changes.setdefault("started_at", now)
        if new_status in st.TERMINAL:
            changes.setdefault("completed_at", now)
            if job.get("started_at") is None and new_status == st.COMPLETED:
                changes.setdefault("started_at", now)
    elif not (decision.reason == "unchanged" and current not in st.TERMINAL):
        return Plan(new_status, False, decision.reason, current)
    changes = {k: v for k, v in changes.items() if v is not None}
    if "metadata" in changes:
        merged = dict(job.get("metadata") or {})
        merged.update(changes["metadata"])
        changes["metadata"] = {k: v for k, v in merged.items() if v is not None}
    return Plan(new_status, decision.accepted, decision.reason, current, changes)


def plan(kind: str, payload: Mapping[str, Any], job: Mapping[str, Any],
         prices: Optional[Mapping[str, float]], now: float) -> Plan:
    """The whole mapping: provider payload + current job row → guarded change."""
    new_status, fields = map_update(kind, payload, job, prices)
    if new_status is not None and new_status == job["status"]:
        # A repeat of the current status is answered "ignored" and changes no column: it may be a
        # late delivery whose figures (cost, output, error) are older than the row's. Only a
        # trainer event's progress is kept (answered "applied", as a progress-only event is).
        progress = {"metadata": fields["metadata"]} if "metadata" in fields else {}
        if progress and job["status"] not in st.TERMINAL:
            kept = guard(job, job["status"], now, progress)
            return Plan(None, False, "progress", job["status"], kept.changes)
        return guard(job, new_status, now, {})
    if new_status is None and fields and job["status"] not in st.TERMINAL:
        # A trainer event with progress but no status: keep the progress.
        plan = guard(job, job["status"], now, fields)
        return Plan(None, False, "progress", job["status"], plan.changes)
    return guard(job, new_status, now, fields)
