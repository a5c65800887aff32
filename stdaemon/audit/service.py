"""The audit log (S7): one append-only writer, an HMAC hash chain, sampling.

Every capability writes through ``ctx.audit`` (an :class:`AuditLog`)::

    entry_id = await ctx.audit.record("job.cancelled", actor="alice", ip=request.client_ip,
                                      target=job_id, action="cancel", details={"reason": "..."})

``record`` commits through ``ctx.db.run_write`` and fires with the new
entry's id after the commit.  Inside a transaction of your own (so the entry
commits or rolls back with your change) call ``ctx.audit.append(conn, ...)``
from the ``run_write`` function instead.

The chain
---------
Each row of ``audit_log`` stores ``id, timestamp, event_type, actor, ip,
target, action, details`` (canonical JSON text), ``previous_hash`` and
``entry_hash = HMAC-SHA256(key, canonical(entry))`` where the canonical form
is the compact, key-sorted JSON of *every* stored column except
``entry_hash`` itself (so ``previous_hash`` and ``id`` are covered too).
``previous_hash`` is the previous entry's ``entry_hash``; the first entry
links to :data:`GENESIS`, or, after retention pruned the start of the log,
to the anchor kept in ``audit_anchor`` (the last pruned entry's id and hash,
itself HMAC-protected).  :func:`verify_batch` walks the chain.

The key comes from secrets (``AUDIT_HMAC_KEY``) when the secrets manager has
it, otherwise from a 0600 key file (``audit.key_file``, default
``<state>/config/cloud/audit.key``) created with ``O_EXCL`` on first start.
Changing the key makes every older entry fail verification.

Sampling (flood-prone events)
-----------------------------
``await ctx.audit.sampled(event_type, ip=..., ...)`` is for events an
attacker can trigger at will (``webhook_rejected``, ``rate_limited``): per
``(event_type, ip)`` at most ``sample_limit`` (default 5) entries are written
per 60-second window, and per event type at most ``sample_global_limit``
(default 100) per window over all addresses; the others are only counted.
When a window closes (the next event for the key, or the ``audit-sampler``
timer), one aggregate entry with ``action="aggregate"`` and ``details =
{"suppressed": n, "window_start", "window_end", "reasons": {...}}`` stands
for the suppressed events of that key (events over the global cap are
aggregated under ``ip = "*"``).  So a flood adds at most ``global + global /
per-key + 1`` entries per event type per minute, whatever its size.  The
window clock is the injected reactor clock.

Counting (metrics)
------------------
``ctx.audit.total`` is the number of entries in the table and
``ctx.audit.count_last_24h()`` the entries of the last 24 h, kept in memory
from per-minute buckets (loaded at start, bumped on every write, reloaded by
the ``audit-counts`` timer every hour), so a scrape never scans the table.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import secrets as _secrets
import sqlite3
from collections import OrderedDict
from typing import Any, Iterable, Mapping, Optional, Sequence

from twisted.application.service import Service
from twisted.internet import defer, threads

from stdaemon.config import state_path
from stdaemon.logs import get_logger
from stdaemon.backup import store as _backup
from stdaemon.store.database import connect

log = get_logger("stdaemon.audit")

# A restore must not roll back the audit history (see backup.py).
_backup.preserve_across_restore("audit_log", "audit_anchor")

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


# -- pure helpers (any thread) -------------------------------------------------------


def canonical_json(value: Any) -> str:
    """Compact, key-sorted JSON; floats as Python's round-tripping repr."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=str, allow_nan=False)


def _clip(value: Any) -> Optional[str]:
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


def chain_head(conn: sqlite3.Connection) -> tuple[int, str]:
    """``(last id, last hash)`` the next entry links to."""
    row = conn.execute("SELECT id, entry_hash FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    if row is not None:
        return int(row[0]), row[1]
    anchor = conn.execute("SELECT last_id, last_hash FROM audit_anchor WHERE id = 1").fetchone()
    if anchor is not None:
        return int(anchor[0]), anchor[1]
    return 0, GENESIS


def append_entry(conn: sqlite3.Connection, key: bytes, now: float, event_type: str,
                 actor: Any = "system", ip: Any = None, target: Any = None, action: Any = None,
                 details: Any = None) -> dict:
    """Append one entry inside the caller's write transaction; returns the row.

    Must run on the writer (inside ``BEGIN IMMEDIATE``) so that reading the
    chain head and inserting are one step."""
    if not event_type or not isinstance(event_type, str):
        raise ValueError("audit event_type must be a non-empty string")
    last_id, previous = chain_head(conn)
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
    next_id = max(last_id, int(seq[0]) if seq else 0) + 1
    row = {
        "id": next_id,
        "timestamp": float(now),
        "event_type": _clip(event_type),
        "actor": _clip(actor if actor not in (None, "") else "system"),
        "ip": _clip(ip) if ip else None,
        "target": _clip(target),
        "action": _clip(action),
        "details": details_text(details),
        "previous_hash": previous,
    }
    row["entry_hash"] = entry_hash(key, row)
    conn.execute(
        f"INSERT INTO audit_log ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        tuple(row[c] for c in COLUMNS),
    )
    return row


def _newest_entry(conn: sqlite3.Connection) -> Optional[dict]:
    row = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    return dict(row) if row is not None else None


def row_to_dict(row: Mapping[str, Any]) -> dict:
    """The API shape of one entry (details decoded)."""
    out = {name: row[name] for name in COLUMNS}
    try:
        out["details"] = json.loads(row["details"]) if row["details"] is not None else None
    except ValueError:
        out["details"] = row["details"]
    return out


def query_entries(conn: sqlite3.Connection, *, event_type: Optional[str] = None,
                  actor: Optional[str] = None, since: Optional[float] = None,
                  until: Optional[float] = None, limit: int = 100, offset: int = 0,
                  target: Optional[str] = None, event_types: Optional[Sequence[str]] = None,
                  actor_or_target: Optional[tuple[str, str]] = None) -> dict:
    """Newest first, with the real number of matching entries.  ``target``
    matches exactly; ``event_types`` is a set of types (any of them);
    ``actor_or_target`` = (actor, target) matches entries by that actor or
    about that target (a user's own trail)."""
    where, args = [], []
    if event_type:
        where.append("event_type = ?")
        args.append(event_type)
    if event_types is not None:
        where.append(f"event_type IN ({', '.join('?' for _ in event_types) or 'NULL'})")
        args.extend(event_types)
    if actor:
        where.append("actor = ?")
        args.append(actor)
    if target:
        where.append("target = ?")
        args.append(target)
    if actor_or_target is not None:
        where.append("(actor = ? OR target = ?)")
        args.extend(actor_or_target)
    if since is not None:
        where.append("timestamp >= ?")
        args.append(float(since))
    if until is not None:
        where.append("timestamp <= ?")
        args.append(float(until))
    clause = (" WHERE " + " AND ".join(where)) if where else ""
    total = conn.execute(f"SELECT count(*) FROM audit_log{clause}", args).fetchone()[0]
    rows = conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM audit_log{clause} ORDER BY id DESC LIMIT ? OFFSET ?",
        [*args, int(limit), int(offset)],
    ).fetchall()
    return {"entries": [row_to_dict(r) for r in rows], "total": int(total),
            "limit": int(limit), "offset": int(offset)}


def summary(conn: sqlite3.Connection) -> dict:
    """Counts by event type and the first/last entry (for ``/api/audit/stats``)."""
    by_type = {row[0]: row[1] for row in conn.execute(
        "SELECT event_type, count(*) FROM audit_log GROUP BY event_type")}
    first, last, low, high = conn.execute(
        "SELECT min(timestamp), max(timestamp), min(id), max(id) FROM audit_log").fetchone()
    return {"by_type": by_type, "first_timestamp": first, "last_timestamp": last,
            "first_id": low, "last_id": high}


def seen_event_types(conn: sqlite3.Connection) -> list[str]:
    return [row[0] for row in conn.execute("SELECT DISTINCT event_type FROM audit_log")]


def verify_start(conn: sqlite3.Connection, key: bytes) -> dict:
    """Where the chain starts: the anchor (checked) or genesis, and the head."""
    anchor = conn.execute(
        "SELECT last_id, last_hash, pruned_total, anchor_hash FROM audit_anchor WHERE id = 1"
    ).fetchone()
    head = conn.execute("SELECT max(id), count(*) FROM audit_log").fetchone()
    seq = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'audit_log'").fetchone()
    state = {"after_id": 0, "previous_hash": GENESIS, "anchor_ok": True, "anchor": None,
             "max_id": int(head[0] or 0), "count": int(head[1]), "sequence": int(seq[0]) if seq else 0}
    if anchor is not None:
        expected = anchor_hash(key, anchor[0], anchor[1], anchor[2])
        state.update(after_id=int(anchor[0]), previous_hash=anchor[1],
                     anchor={"last_id": int(anchor[0]), "pruned_total": int(anchor[2])},
                     anchor_ok=hmac.compare_digest(expected, anchor[3]))
    return state


def verify_batch(conn: sqlite3.Connection, key: bytes, after_id: int, previous_hash: str,
                 upto_id: int, batch: int = 1000) -> dict:
    """Check the entries with ``after_id < id <= upto_id`` (at most ``batch``).

    Returns ``{"checked", "last_id", "previous_hash", "broken"}`` where
    ``broken`` is ``None`` or ``{"id", "reason"}`` for the first bad entry."""
    rows = conn.execute(
        f"SELECT {', '.join(COLUMNS)} FROM audit_log WHERE id > ? AND id <= ? ORDER BY id LIMIT ?",
        (after_id, upto_id, batch),
    ).fetchall()
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
    return {"checked": checked, "last_id": last_id, "previous_hash": previous_hash,
            "broken": None, "done": len(rows) < batch}


def prune_before(conn: sqlite3.Connection, key: bytes, cutoff: float, now: float) -> int:
    """Delete the oldest entries up to the last one older than ``cutoff`` and
    move the anchor to the last deleted entry; returns how many were deleted.

    Deletes a prefix of the chain (by id), so the remaining entries still link
    to the anchor.  Runs inside the caller's write transaction."""
    row = conn.execute(
        "SELECT id, entry_hash FROM audit_log WHERE id = "
        "(SELECT max(id) FROM audit_log WHERE timestamp < ?)", (cutoff,)
    ).fetchone()
    if row is None:
        return 0
    last_id, last_hash = int(row[0]), row[1]
    deleted = conn.execute("DELETE FROM audit_log WHERE id <= ?", (last_id,)).rowcount
    previous = conn.execute("SELECT pruned_total FROM audit_anchor WHERE id = 1").fetchone()
    pruned_total = (int(previous[0]) if previous else 0) + deleted
    conn.execute(
        "INSERT INTO audit_anchor (id, last_id, last_hash, pruned_total, updated_at, anchor_hash) "
        "VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET last_id = excluded.last_id, "
        "last_hash = excluded.last_hash, pruned_total = excluded.pruned_total, "
        "updated_at = excluded.updated_at, anchor_hash = excluded.anchor_hash",
        (last_id, last_hash, pruned_total, now, anchor_hash(key, last_id, last_hash, pruned_total)),
    )
    return deleted


def minute_counts(conn: sqlite3.Connection, since: float) -> tuple[int, dict[int, int]]:
    total = conn.execute("SELECT count(*) FROM audit_log").fetchone()[0]
    buckets = {
        int(m): int(n)
        for m, n in conn.execute(
            "SELECT CAST(timestamp / 60 AS INTEGER) AS m, count(*) FROM audit_log "
            "WHERE timestamp >= ? GROUP BY m", (since,)
        )
    }
    return int(total), buckets


# -- key --------------------------------------------------------------------------------


def load_or_create_key_file(path: str) -> bytes:
    """Read the hex key in ``path``; create it (O_EXCL, 0600) when absent."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as fh:
            fh.write(_secrets.token_hex(32) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        log.warning("Created the audit HMAC key file {path} (mode 0600); keep it: entries "
                    "written with it only verify with it", path=path)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o077:
        log.warning("Audit key file {path} had mode {mode}; tightening to 0600", path=path,
                    mode=oct(mode))
        os.chmod(path, 0o600)
    with open(path, "r", encoding="utf-8") as fh:
        text = fh.read().strip()
    if len(text) < 32:
        raise ValueError(f"audit key file {path} holds less than 32 characters")
    return text.encode("utf-8")


# -- sampling (pure; the caller passes ``now``) ------------------------------------------


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


# -- the writer -----------------------------------------------------------------------


class AuditLog(Service):
    """``ctx.audit``: the one audit writer (see the module docstring)."""

    name = "audit"

    def __init__(self, ctx: Any, *, sample_limit: int = 5, sample_global_limit: int = 100,
                 key_path: Optional[str] = None):
        self.ctx = ctx
        self.db = ctx.db
        self.clock = ctx.clock
        cfg = getattr(ctx.config, "audit", None)
        self.retention_days = int(getattr(cfg, "retention_days", 365) or 0)
        configured = getattr(cfg, "key_file", "") or ""
        self.key_path = key_path or (os.path.expanduser(configured) if configured
                                     else ctx.path("config", "cloud", "audit.key"))
        # ``AUDIT_HMAC_KEY`` may also come from the environment (through secrets).
        self.key_source: Optional[str] = None
        self._key: Optional[bytes] = None
        self._ready: defer.Deferred = defer.Deferred()
        self.sampler = AuditSampler(sample_limit, sample_global_limit)
        self.total = 0
        self._buckets: dict[int, int] = {}
        self.pruned = 0
        self.write_failures = 0

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        """Load the key and the counters (database open).  Called from
        ``start_capabilities``; ``record`` calls made earlier wait for it."""
        key = None
        secrets = getattr(self.ctx, "secrets", None)
        if secrets is not None:
            try:
                value = await defer.maybeDeferred(secrets.get, "AUDIT_HMAC_KEY")
            except Exception:
                log.failure("Could not read AUDIT_HMAC_KEY from secrets; using the key file")
                value = None
            if value:
                key, self.key_source = value.encode("utf-8"), "secrets"
        if key is None:
            key = await threads.deferToThreadPool(self.ctx.reactor, self.ctx.reactor.getThreadPool(),
                                                  load_or_create_key_file, self.key_path)
            self.key_source = "file"
        self._key = key
        await self.refresh_counts()
        newest = await self.db.run_read(_newest_entry)
        if newest is not None and not hmac.compare_digest(entry_hash(key, newest), newest["entry_hash"]):
            log.error("The newest audit entry ({id}) does not verify with the audit key from {source}: "
                      "the key changed or the entry was altered; GET /api/audit/verify for details",
                      id=newest["id"], source=self.key_source)
        backups = getattr(self.ctx, "backups", None)
        if backups is not None and hasattr(backups, "after_restore"):
            backups.after_restore.append(self.refresh_counts)
        if not self._ready.called:
            self._ready.callback(None)

    def stopService(self) -> Any:
        super().stopService()
        aggregates = self.sampler.flush(self.clock.seconds(), force=True)
        if not aggregates or self._key is None:
            return None
        d = self.db.run_write(self._write_aggregates, aggregates, self.clock.seconds())
        d.addCallback(lambda rows: [self._counted(r["timestamp"]) for r in rows])
        d.addErrback(lambda f: log.failure("Could not write audit aggregates at shutdown", failure=f))
        return d

    async def _key_ready(self) -> bytes:
        if self._key is None:
            await self._ready
        assert self._key is not None
        return self._key

    # -- writing ----------------------------------------------------------------------

    async def record(self, event_type: str, actor: Any = "system", ip: Any = None,
                     target: Any = None, action: Any = None, details: Any = None) -> int:
        """Append one entry; fires with its id after the commit."""
        key = await self._key_ready()
        row = await self.db.run_write(append_entry, key, self.clock.seconds(), event_type, actor, ip,
                                      target, action, details)
        self._counted(row["timestamp"])
        return row["id"]

    def record_soon(self, event_type: str, **kwargs: Any) -> defer.Deferred:
        """Fire-and-forget ``record``: a failed write is logged, never raised."""
        d = defer.ensureDeferred(self.record(event_type, **kwargs))

        def failed(failure: Any) -> None:
            self.write_failures += 1
            log.failure("Could not write audit entry {event_type}", failure=failure,
                        event_type=event_type)

        d.addErrback(failed)
        return d

    def append(self, conn: sqlite3.Connection, event_type: str, actor: Any = "system",
               ip: Any = None, target: Any = None, action: Any = None, details: Any = None) -> int:
        """Append inside the caller's ``run_write`` function (same transaction).

        Only valid after start-up (the key is loaded).  The in-memory counters
        are bumped now; a rolled-back transaction is corrected by the next
        hourly recount."""
        if self._key is None:
            raise RuntimeError("the audit log is not started yet")
        row = append_entry(conn, self._key, self.clock.seconds(), event_type, actor, ip, target,
                           action, details)
        self.ctx.reactor.callFromThread(self._counted, row["timestamp"])
        return row["id"]

    async def sampled(self, event_type: str, actor: Any = "system", ip: Any = None,
                      target: Any = None, action: Any = None, details: Any = None) -> Optional[int]:
        """Record unless the ``(event_type, ip)`` flood budget is spent (see the
        module docstring); returns the entry id or ``None`` when only counted."""
        now = self.clock.seconds()
        reason = details.get("reason") if isinstance(details, Mapping) else None
        record_it, closed = self.sampler.offer(event_type, ip, now, reason=_clip(reason),
                                               sample={"target": _clip(target), "action": _clip(action)})
        if closed:
            await self._flush_aggregates(closed)
        if not record_it:
            return None
        return await self.record(event_type, actor=actor, ip=ip, target=target, action=action,
                                 details=details)

    def _write_aggregates(self, conn: sqlite3.Connection, aggregates: Iterable[dict],
                          now: float) -> list[dict]:
        rows = []
        for agg in aggregates:
            rows.append(append_entry(
                conn, self._key, now, agg["event_type"], "system", agg["ip"] or None,
                agg["sample"].get("target") if agg.get("sample") else None, "aggregate",
                {"suppressed": agg["suppressed"], "window_start": agg["window_start"],
                 "window_end": agg["window_end"], "reasons": agg["reasons"]},
            ))
        return rows

    async def _flush_aggregates(self, aggregates: list[dict]) -> None:
        key = await self._key_ready()
        del key
        rows = await self.db.run_write(self._write_aggregates, aggregates, self.clock.seconds())
        for row in rows:
            self._counted(row["timestamp"])

    async def flush_sampler(self, force: bool = False) -> int:
        """Timer body: write aggregates of windows that closed (every open
        window with ``force``); returns how many."""
        closed = self.sampler.flush(self.clock.seconds(), force=force)
        if closed:
            await self._flush_aggregates(closed)
        return len(closed)

    # -- counting ---------------------------------------------------------------------

    def _counted(self, timestamp: float) -> None:
        self.total += 1
        minute = int(timestamp // MINUTE)
        self._buckets[minute] = self._buckets.get(minute, 0) + 1
        if len(self._buckets) > 1500:
            self._trim_buckets(self.clock.seconds())

    def _trim_buckets(self, now: float) -> None:
        horizon = int((now - DAY) // MINUTE)
        for minute in [m for m in self._buckets if m < horizon]:
            del self._buckets[minute]

    def count_last_24h(self) -> int:
        now = self.clock.seconds()
        self._trim_buckets(now)
        horizon = int(math.floor((now - DAY) / MINUTE))
        return sum(n for m, n in self._buckets.items() if m >= horizon)

    def stats(self) -> dict:
        return {"total": self.total, "last_24h": self.count_last_24h(),
                "suppressed": self.sampler.suppressed_total, "pruned": self.pruned,
                "write_failures": self.write_failures}

    async def refresh_counts(self) -> None:
        """Reload ``total`` and the 24 h buckets from the table (timer body)."""
        now = self.clock.seconds()
        total, buckets = await self.db.run_read(minute_counts, now - DAY)
        self.total, self._buckets = total, buckets

    # -- reading / verifying / retention ----------------------------------------------

    async def query(self, **filters: Any) -> dict:
        return await self.db.run_read(query_entries, **filters)

    async def verify(self, batch: int = 1000) -> dict:
        """Walk the whole chain in batches on reader threads."""
        key = await self._key_ready()
        state = await self.db.run_read(verify_start, key)
        result = {"valid": True, "checked": 0, "first_broken_id": None, "reason": None,
                  "anchor": state["anchor"], "entries": state["count"]}
        if not state["anchor_ok"]:
            result.update(valid=False, reason="the retention anchor does not match its HMAC",
                          first_broken_id=(state["anchor"] or {}).get("last_id"))
            return result
        after, previous, upto = state["after_id"], state["previous_hash"], state["max_id"]
        while after < upto:
            step = await self.db.run_read(verify_batch, key, after, previous, upto, batch)
            result["checked"] += step["checked"]
            if step["broken"] is not None:
                result.update(valid=False, first_broken_id=step["broken"]["id"],
                              reason=step["broken"]["reason"])
                return result
            if step["checked"] == 0:
                break
            after, previous = step["last_id"], step["previous_hash"]
        if state["sequence"] > max(upto, state["after_id"]):
            # Entries after the last one present were deleted.
            result.update(valid=False, first_broken_id=upto + 1,
                          reason="the newest entries are missing (the log was truncated)")
        return result

    async def prune(self) -> int:
        """Retention timer body: delete entries older than ``retention_days``
        (0 keeps everything), keeping an anchor; audited as ``audit.pruned``."""
        if self.retention_days <= 0:
            return 0
        key = await self._key_ready()
        now = self.clock.seconds()
        cutoff = now - self.retention_days * DAY

        def work(conn: sqlite3.Connection) -> int:
            deleted = prune_before(conn, key, cutoff, now)
            if deleted:
                append_entry(conn, key, now, "audit.pruned", "system", None, "audit_log", "prune",
                             {"deleted": deleted, "retention_days": self.retention_days})
            return deleted

        deleted = await self.db.run_write(work)
        if deleted:
            self.pruned += deleted
            log.info("Audit retention removed {n} entries older than {days} days", n=deleted,
                     days=self.retention_days)
            await self.refresh_counts()
        return deleted


def request_actor(request: Any) -> str:
    """The actor of a request: the principal's name, or ``anonymous``."""
    principal = getattr(request, "principal", None)
    if principal is None:
        return "anonymous"
    return str(getattr(principal, "username", None) or getattr(principal, "user_id", "anonymous"))


def key_file_path(config: Any) -> str:
    configured = getattr(getattr(config, "audit", None), "key_file", "") or ""
    return os.path.expanduser(configured) if configured else state_path(config, "config", "cloud",
                                                                         "audit.key")


def append_from_tool(config: Any, db_path: str, event_type: str, actor: Any = "system",
                     ip: Any = None, target: Any = None, action: Any = None, details: Any = None,
                     *, now: float, key: Optional[bytes] = None) -> int:
    """Blocking: append one entry from a command-line tool (``stdaemon-admin``).

    The key is ``key`` (a tool that resolved ``AUDIT_HMAC_KEY`` from the
    secrets stores passes it), else ``AUDIT_HMAC_KEY`` from the config's
    environment snapshot, else the key file.  ``now`` is the caller's clock."""
    if key is None:
        value = (getattr(config, "environ", None) or {}).get("AUDIT_HMAC_KEY")
        key = value.encode("utf-8") if value else load_or_create_key_file(key_file_path(config))
    conn = connect(db_path)
    try:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = append_entry(conn, key, now, event_type, actor, ip, target, action, details)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return row["id"]
    finally:
        conn.close()


def install(ctx: Any) -> AuditLog:
    """Create ``ctx.audit`` and its timers (started by ``start_capabilities``)."""
    audit = AuditLog(ctx)
    ctx.audit = audit
    audit.setServiceParent(ctx.services)
    ctx.add_timer("audit-sampler", MINUTE, audit.flush_sampler)
    ctx.add_timer("audit-counts", 3600.0, audit.refresh_counts)
    ctx.add_timer("audit-retention", 3600.0, audit.prune)

    async def check() -> Any:
        from stdaemon.health.service import HEALTHY, UNHEALTHY, Component

        if audit._key is None:
            return Component("audit", UNHEALTHY, "the audit key is not loaded")
        return Component("audit", HEALTHY,
                         f"{audit.total} entries; key from {audit.key_source}; "
                         f"{audit.write_failures} failed background writes")

    ctx.health.register("audit", check)
    return audit
