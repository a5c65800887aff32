"""The audit log (S7): one append-only writer, an HMAC hash chain, sampling.

Every capability writes through the one :class:`AuditLog` (``app.audit``), calling
its methods directly; :func:`request_actor` gives the actor and ip of a request::

    entry_id = await audit.record("job.cancelled", **request_actor(request),
                                  target=job_id, action="cancel", details={"reason": "..."})

``record`` commits through ``db.run_write`` and fires with the new entry's id after the
commit (and raises when the write fails).  ``record_soon`` is the same write that never
fails its caller: a failed write is logged and counted; await it to answer only after the
entry is committed.  Inside a transaction of your own (so the entry commits or rolls back
with your change) call ``audit.append(conn, ...)`` from the ``run_write`` function instead.

Modules: :mod:`chain` (pure: canonical JSON, hashes, verification of rows),
:mod:`sampler` (pure), :mod:`store` (the only SQL on ``audit_log``/``audit_anchor``),
this one (the writer, its key and counters) and :mod:`http`.

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
itself HMAC-protected).  :meth:`AuditLog.verify` walks the chain.

The key comes from secrets (``AUDIT_HMAC_KEY``) when the secrets manager has
it, otherwise from a 0600 key file (``audit.key_file``, default
``<state>/config/cloud/audit.key``) created with ``O_EXCL`` on first start.
Changing the key makes every older entry fail verification.

Sampling (flood-prone events)
-----------------------------
``await audit.sampled(event_type, ip=..., ...)`` is for events an
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
``audit.total`` is the number of entries in the table and
``audit.count_last_24h()`` the entries of the last 24 h, kept in memory
from per-minute buckets (loaded at start, bumped on every write, reloaded by
the ``audit-counts`` timer every hour), so a scrape never scans the table.
"""

from __future__ import annotations

import math
import os
import secrets as _secrets
import sqlite3
from typing import TYPE_CHECKING, Any, Mapping, Optional

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.internet.interfaces import IReactorTime

from stdaemon.audit import store
from stdaemon.audit.chain import DAY, MINUTE, clip, entry_ok
from stdaemon.audit.sampler import AuditSampler
from stdaemon.config import state_path
from stdaemon.config.schema import AuditConfig, Config
from stdaemon.health.service import HEALTHY, UNHEALTHY, Component
from stdaemon.logs import get_logger
from stdaemon.store.database import Database
from stdaemon.store.engines import engine_for
from stdaemon.store.key_fingerprints import fingerprint

if TYPE_CHECKING:
    from stdaemon.secrets.service import SecretsManager

log = get_logger("stdaemon.audit")


# -- key --------------------------------------------------------------------------------


def key_file_path(config: Config) -> str:
    """``audit.key_file``, else ``<state>/config/cloud/audit.key``."""
    configured = config.audit.key_file or ""
    return os.path.expanduser(configured) if configured else state_path(config, "config", "cloud",
                                                                         "audit.key")


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


# -- the writer -----------------------------------------------------------------------


class AuditLog(Service):
    """``app.audit``: the one audit writer (see the module docstring)."""

    name = "audit"

    def __init__(self, db: Database, clock: IReactorTime, reactor: Any, config: AuditConfig,
                 key_path: str, secrets: Optional["SecretsManager"] = None, *,
                 sample_limit: int = 5, sample_global_limit: int = 100):
        self.db = db
        self.clock = clock
        self.reactor = reactor  # the key file is read in its thread pool; append counts through it
        self.retention_days = int(config.retention_days or 0)
        self.key_path = key_path
        # ``AUDIT_HMAC_KEY`` may also come from the environment (through secrets).
        self.secrets = secrets
        self.key_source: Optional[str] = None
        self._key: Optional[bytes] = None
        self._ready: defer.Deferred = defer.Deferred()
        self.sampler = AuditSampler(sample_limit, sample_global_limit)
        self.total = 0
        self._buckets: dict[int, int] = {}
        self.pruned = 0
        self.write_failures = 0

    # -- lifecycle --------------------------------------------------------------------

    def key_fingerprint(self) -> str:
        """A fingerprint of the key in use (:mod:`stdaemon.store.key_fingerprints`); after ``start``."""
        return fingerprint(self._key)

    async def start(self) -> None:
        """Load the key and the counters (database open).  Called from
        ``start_capabilities``; ``record`` calls made earlier wait for it."""
        key = None
        if self.secrets is not None:
            try:
                value = await defer.maybeDeferred(self.secrets.get, "AUDIT_HMAC_KEY")
            except Exception:
                log.failure("Could not read AUDIT_HMAC_KEY from secrets; using the key file")
                value = None
            if value:
                key, self.key_source = value.encode("utf-8"), "secrets"
        if key is None:
            key = await threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(),
                                                  load_or_create_key_file, self.key_path)
            self.key_source = "file"
        self._key = key
        await self.refresh_counts()
        newest = await self.db.run_read(store.newest_entry)
        if newest is not None and not entry_ok(key, newest):
            log.error("The newest audit entry ({id}) does not verify with the audit key from {source}: "
                      "the key changed or the entry was altered; GET /api/audit/verify for details",
                      id=newest["id"], source=self.key_source)
        if not self._ready.called:
            self._ready.callback(None)

    def stopService(self) -> Any:
        super().stopService()
        aggregates = self.sampler.flush(self.clock.seconds(), force=True)
        if not aggregates or self._key is None:
            return None
        d = self.db.run_write(store.append_aggregates, self._key, aggregates, self.clock.seconds())
        d.addCallback(lambda rows: [self._counted(r["timestamp"]) for r in rows])
        d.addErrback(lambda f: log.failure("Could not write audit aggregates at shutdown", failure=f))
        return d

    async def _key_ready(self) -> bytes:
        if self._key is None:
            await self._ready
        assert self._key is not None
        return self._key

    async def health(self) -> Component:
        """The ``audit`` health component."""
        if self._key is None:
            return Component("audit", UNHEALTHY, "the audit key is not loaded")
        return Component("audit", HEALTHY,
                         f"{self.total} entries; key from {self.key_source}; "
                         f"{self.write_failures} failed background writes")

    # -- writing ----------------------------------------------------------------------

    async def record(self, event_type: str, actor: Any = "system", ip: Any = None,
                     target: Any = None, action: Any = None, details: Any = None) -> int:
        """Append one entry; fires with its id after the commit."""
        key = await self._key_ready()
        row = await self.db.run_write(store.append_entry, key, self.clock.seconds(), event_type,
                                      actor, ip, target, action, details)
        self._counted(row["timestamp"])
        return row["id"]

    def record_soon(self, event_type: str, *, sampled: bool = False, **kwargs: Any) -> defer.Deferred:
        """``record`` (``sampled``: :meth:`sampled`) that never fails its caller: a failed
        write is logged and counted.  The Deferred fires after the write; callers that
        answer only once the entry is committed await it, others let it run."""
        write = self.sampled if sampled else self.record
        d = defer.ensureDeferred(write(event_type, **kwargs))

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
        row = store.append_entry(conn, self._key, self.clock.seconds(), event_type, actor, ip,
                                 target, action, details)
        self.reactor.callFromThread(self._counted, row["timestamp"])
        return row["id"]

    async def sampled(self, event_type: str, actor: Any = "system", ip: Any = None,
                      target: Any = None, action: Any = None, details: Any = None) -> Optional[int]:
        """Record unless the ``(event_type, ip)`` flood budget is spent (see the
        module docstring); returns the entry id or ``None`` when only counted."""
        now = self.clock.seconds()
        reason = details.get("reason") if isinstance(details, Mapping) else None
        record_it, closed = self.sampler.offer(event_type, ip, now, reason=clip(reason),
                                               sample={"target": clip(target), "action": clip(action)})
        if closed:
            await self._flush_aggregates(closed)
        if not record_it:
            return None
        return await self.record(event_type, actor=actor, ip=ip, target=target, action=action,
                                 details=details)

    async def _flush_aggregates(self, aggregates: list[dict]) -> None:
        key = await self._key_ready()
        rows = await self.db.run_write(store.append_aggregates, key, aggregates, self.clock.seconds())
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
        """Reload ``total`` and the 24 h buckets from the table (timer body; after a restore)."""
        now = self.clock.seconds()
        total, buckets = await self.db.run_read(store.minute_counts, now - DAY)
        self.total, self._buckets = total, buckets

    # -- reading / verifying / retention ----------------------------------------------

    async def query(self, **filters: Any) -> dict:
        return await self.db.run_read(store.query_entries, **filters)

    async def summary(self) -> dict:
        return await self.db.run_read(store.summary)

    async def seen_event_types(self) -> list[str]:
        return await self.db.run_read(store.seen_event_types)

    async def verify(self, batch: int = 1000) -> dict:
        """Walk the whole chain in batches on reader threads."""
        key = await self._key_ready()
        state = await self.db.run_read(store.verify_start, key)
        result = {"valid": True, "checked": 0, "first_broken_id": None, "reason": None,
                  "anchor": state["anchor"], "entries": state["count"]}
        if not state["anchor_ok"]:
            result.update(valid=False, reason="the retention anchor does not match its HMAC",
                          first_broken_id=(state["anchor"] or {}).get("last_id"))
            return result
        after, previous, upto = state["after_id"], state["previous_hash"], state["max_id"]
        while after < upto:
            step = await self.db.run_read(store.verify_batch, key, after, previous, upto, batch)
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
            deleted = store.prune_before(conn, key, cutoff, now)
            if deleted:
                store.append_entry(conn, key, now, "audit.pruned", "system", None, "audit_log",
                                   "prune", {"deleted": deleted, "retention_days": self.retention_days})
            return deleted

        deleted = await self.db.run_write(work)
        if deleted:
            self.pruned += deleted
            log.info("Audit retention removed {n} entries older than {days} days", n=deleted,
                     days=self.retention_days)
            await self.refresh_counts()
        return deleted


def request_actor(request: Any, actor: Optional[str] = None,
                  anonymous: str = "anonymous") -> dict[str, Any]:
    """The actor and ip of a request, as keyword arguments of ``record``/``record_soon``/
    ``sampled``: ``actor`` when the caller names one (a login attempt's name), else the
    signed-in principal's name, else ``anonymous``; ``ip`` is the client's address (``None``
    without a request)."""
    if actor is None:
        principal = getattr(request, "principal", None)
        if principal is None:
            actor = anonymous
        else:
            actor = str(getattr(principal, "username", None) or getattr(principal, "user_id", "anonymous"))
    return {"actor": actor, "ip": getattr(request, "client_ip", None)}


def append_from_tool(config: Config, db_path: str, event_type: str, actor: Any = "system",
                     ip: Any = None, target: Any = None, action: Any = None, details: Any = None,
                     *, now: float, key: Optional[bytes] = None) -> int:
    """Blocking: append one entry from a command-line tool (``stdaemon-admin``).

    The key is ``key`` (a tool that resolved ``AUDIT_HMAC_KEY`` from the
    secrets stores passes it), else ``AUDIT_HMAC_KEY`` from the config's
    environment snapshot, else the key file.  ``now`` is the caller's clock.  The
    database is the daemon's: ``database.url`` when set, else the SQLite file ``db_path``."""
    if key is None:
        value = (config.environ or {}).get("AUDIT_HMAC_KEY")
        key = value.encode("utf-8") if value else load_or_create_key_file(key_file_path(config))
    engine = engine_for(config.database.url, db_path)
    conn = engine.connect()
    try:
        row = engine.transaction(conn, lambda c: store.append_entry(
            c, key, now, event_type, actor, ip, target, action, details))
        return row["id"]
    finally:
        conn.close()
