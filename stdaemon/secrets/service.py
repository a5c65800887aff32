"""Secrets from the environment, a file, AWS Secrets Manager and Vault (spec S14).

Resolution order for ``get(name)``:

1. environment variables (a non-empty ``os.environ[name]`` wins),
2. the secrets file (``secrets.file``, else ``<state_dir>/secrets.json``,
   ``.yaml`` or ``.yml``, then the same names in ``~/.simpletuner/``) --
   refused, loudly, when group/world accessible; ``write_file_secret`` changes
   one entry in it (the token API),
3. AWS Secrets Manager: one secret (``secrets.aws_secret_name``) holding a
   JSON object of name -> value,
4. HashiCorp Vault (or OpenBao): one KV secret at ``secrets.vault_mount`` /
   ``secrets.vault_path``, KV v2 first then KV v1.

Each store is loaded whole and cached for ``secrets.cache_ttl`` seconds of
the injected clock, so a rotated value is picked up without a restart.  A
store that cannot be reached keeps serving what it last loaded (and is retried
at most every ``retry_interval`` seconds); one that never loaded is skipped so
resolution falls through to the next store.  Either way ``status()`` reports
it and the health component ``secrets`` turns ``degraded``; the daemon keeps
running.

All blocking work (file reads, boto3, hvac) runs in one bounded thread pool
owned by :class:`SecretsService`, which stops it at shutdown.  boto3 and hvac
clients are created once, lazily, inside that pool.

One module per store (:mod:`file_store`, :mod:`aws_store`, :mod:`vault_store`,
sharing :mod:`base`); this one holds the resolution order, the cache
(:class:`SecretsManager`) and the pool's service.

Secret values are never logged and never part of ``status()``; error messages
that reach logs or health are built from exception types and store locations.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from stdaemon.health.service import Component
from stdaemon.logs import get_logger
from stdaemon.secrets.aws_store import AwsStore
from stdaemon.secrets.base import (
    ABSENT,
    DEGRADED_STATES,
    ERROR,
    NOT_FOUND,
    OK,
    REFUSED,
    UNKNOWN,
    SecretStoreError,
    StoreAbsent,
    describe,
)
from stdaemon.secrets.file_store import FileStore
from stdaemon.secrets.vault_store import VaultStore
from stdaemon.threads import BlockingPool

REPLICATE_TOKEN = "REPLICATE_API_TOKEN"

DEFAULT_TTL = 300.0
DEFAULT_RETRY_INTERVAL = 30.0
DEFAULT_POOL_SIZE = 4

log = get_logger("stdaemon.secrets")

# --------------------------------------------------------------------------
# The manager: cache, resolution order, status.  Runs on the reactor thread.
# --------------------------------------------------------------------------


@dataclass
class _StoreState:
    store: Any
    data: dict[str, str] | None = None
    loaded_at: float | None = None
    attempted_at: float | None = None
    state: str = UNKNOWN
    message: str = ""
    failures: int = 0
    inflight: defer.Deferred | None = None
    waiters: list = field(default_factory=list)


def _section(config: Any, name: str) -> Any:
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config.get(name)
    return getattr(config, name, None)


def _opt(section: Any, name: str, default: Any) -> Any:
    if section is None:
        return default
    if isinstance(section, Mapping):
        value = section.get(name, default)
    else:
        value = getattr(section, name, default)
    return default if value in (None, "") else value


def build_stores(config: Any, environ: Mapping[str, str]) -> list:
    """The stores in resolution order after the environment: file, AWS, Vault."""
    cfg = _section(config, "secrets")
    cfg_env = _section(config, "environ") or {}
    server = _section(config, "server")

    def env(name: str) -> str:
        return cfg_env.get(name) or environ.get(name, "") or ""

    region = _opt(cfg, "aws_region", "") or env("AWS_DEFAULT_REGION") or env("AWS_REGION")
    endpoint = env("AWS_ENDPOINT_URL_SECRETS_MANAGER") or env("AWS_ENDPOINT_URL")
    vault_addr = _opt(cfg, "vault_addr", "") or env("VAULT_ADDR")
    return [
        FileStore(_opt(cfg, "file", ""), _opt(server, "state_dir", "~/.simpletuner"), env("HOME")),
        AwsStore(_opt(cfg, "aws_secret_name", ""), region, endpoint, environ),
        VaultStore(
            vault_addr,
            _opt(cfg, "vault_mount", "secret"),
            _opt(cfg, "vault_path", "simpletuner"),
            environ,
            namespace=env("VAULT_NAMESPACE"),
        ),
    ]


class SecretsManager:
    """Resolve secrets by name; ``get`` returns a Deferred firing with ``str`` or ``None``."""

    def __init__(
        self,
        config: Any,
        clock: IReactorTime,
        threadpool: BlockingPool,
        *,
        environ: Mapping[str, str] | None = None,
        retry_interval: float | None = None,
    ):
        self._clock = clock
        self._pool = threadpool
        self._environ = os.environ if environ is None else environ
        self.ttl = float(_opt(_section(config, "secrets"), "cache_ttl", DEFAULT_TTL))
        self.retry_interval = float(
            retry_interval if retry_interval is not None else min(self.ttl, DEFAULT_RETRY_INTERVAL)
        )
        stores = build_stores(config, self._environ)
        self._states = [_StoreState(s) for s in stores]
        for st in self._states:
            if not st.store.configured:
                st.state = ABSENT
        self._stopped = False

    # -- public API --------------------------------------------------------

    def get(self, name: str) -> defer.Deferred:
        """Deferred -> the value of secret ``name``, or ``None`` when no store has it."""
        return defer.Deferred.fromCoroutine(self._get(name))

    def refresh(self) -> defer.Deferred:
        """Reload every configured store now (ignoring the TTL).  Never fails."""

        async def run() -> None:
            for st in self._states:
                if st.store.configured:
                    await self._load(st)

        return defer.Deferred.fromCoroutine(run())

    def invalidate(self) -> None:
        """Forget freshness (not values): the next ``get`` reloads each store."""
        for st in self._states:
            st.loaded_at = None
            st.attempted_at = None

    def stop(self) -> None:
        self._stopped = True

    def file_target(self) -> str | None:
        """Where :meth:`write_file_secret` writes (no I/O beyond ``lexists``)."""
        st = self._file_state()
        return st.store.target() if st is not None else None

    def _file_state(self) -> _StoreState | None:
        for st in self._states:
            if st.store.name == "file":
                return st
        return None

    async def write_file_secret(self, name: str, value: str | None) -> dict:
        """Set (``None``: remove) ``name`` in the secrets file off the reactor,
        then reload that store so the very next ``get``/``known`` sees it.
        Returns ``{"path", "changed"}``; raises :class:`SecretStoreError`."""
        st = self._file_state()
        if st is None:
            raise SecretStoreError(ERROR, "no secrets file store")
        result = await self._pool.run(st.store.write, name, value)
        if st.inflight is not None:  # a load that read the old file: let it finish first
            await self._load(st)
        st.loaded_at = None
        st.attempted_at = None
        await self._load(st)
        return result

    def status(self) -> dict:
        """Which stores are reachable and whether the provider token is known.  No values."""
        now = self._clock.seconds()
        stores = [
            {
                "name": "env",
                "configured": True,
                "reachable": True,
                "state": OK,
                "message": "",
            }
        ]
        problems = []
        for st in self._states:
            entry = {
                "name": st.store.name,
                "configured": st.store.configured and st.state != ABSENT,
                "reachable": (
                    None if st.state in (UNKNOWN, ABSENT) else st.state in (OK, NOT_FOUND, ERROR)
                ),
                "state": st.state,
                "location": st.store.location,
                "message": st.message,
                "failures": st.failures,
                "age_seconds": None if st.loaded_at is None else round(now - st.loaded_at, 3),
                "serving_stale": bool(st.state in DEGRADED_STATES and st.data is not None),
            }
            if st.store.name == "vault":
                entry["kv_version"] = st.store.kv_version
                entry["auth"] = st.store.auth_method or None
            stores.append(entry)
            if st.state in DEGRADED_STATES:
                problems.append(f"{st.store.name}: {st.message}")
        token_present = self.known(REPLICATE_TOKEN)
        if not token_present:
            problems.insert(0, f"{REPLICATE_TOKEN} not configured")
        status = "healthy" if not problems else "degraded"
        message = "API token configured" if not problems else "; ".join(problems)
        return {
            "status": status,
            "message": message,
            "token_present": token_present,
            "token_source": self.source(REPLICATE_TOKEN),
            "ttl_seconds": self.ttl,
            "stores": stores,
        }

    def source(self, name: str) -> str | None:
        """Which store currently provides ``name`` (``env``/``file``/``aws``/``vault``), from cache."""
        if self._environ.get(name):
            return "env"
        for st in self._states:
            if st.data and st.data.get(name):
                return st.store.name
        return None

    def known(self, name: str) -> bool:
        """Whether ``name`` is currently resolvable from env or cached data (no I/O)."""
        if self._environ.get(name):
            return True
        return any(st.data and st.data.get(name) for st in self._states)

    async def health(self, wait: float = 1.0) -> dict:
        """The ``secrets`` health component: ``{name, status, latency_ms, message}``.

        Refreshes a stale cache first but waits at most ``wait`` seconds for it:
        a slow store is reported from what is known, never by a hanging probe.
        """
        started = self._clock.seconds()
        waiter: defer.Deferred = defer.Deferred()

        def release(_: Any = None) -> None:
            if not waiter.called:
                waiter.callback(None)

        self.get(REPLICATE_TOKEN).addBoth(release)
        timer = self._clock.callLater(wait, release)
        await waiter
        if timer.active():
            timer.cancel()
        report = self.status()
        return {
            "name": "secrets",
            "status": report["status"],
            "latency_ms": round((self._clock.seconds() - started) * 1000.0, 3),
            "message": report["message"],
        }

    # -- internals ---------------------------------------------------------

    async def _get(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value:
            return value
        for st in self._states:
            if not st.store.configured:
                continue
            data = await self._current(st)
            if data:
                value = data.get(name)
                if value:
                    return value
        return None

    async def _current(self, st: _StoreState) -> dict[str, str] | None:
        if st.inflight is not None:
            await self._load(st)  # join the load under way
            return st.data
        now = self._clock.seconds()
        if st.loaded_at is not None and now - st.loaded_at < self.ttl and st.state in (OK, ABSENT):
            return st.data
        if st.attempted_at is not None and now - st.attempted_at < self.retry_interval and st.state not in (OK, ABSENT):
            return st.data  # recently failed: serve what we have, retry later
        await self._load(st)
        return st.data

    def _load(self, st: _StoreState) -> defer.Deferred:
        """Load one store in the pool; concurrent callers share one load.  Never fails."""
        if st.inflight is not None:
            d: defer.Deferred = defer.Deferred()
            st.waiters.append(d)
            return d
        if self._stopped:
            return defer.succeed(None)
        st.attempted_at = self._clock.seconds()
        st.inflight = self._pool.run(st.store.load)
        st.inflight.addCallbacks(lambda data: self._loaded(st, data), lambda f: self._failed(st, f))

        def done(result: Any) -> None:
            if isinstance(result, Failure):  # a bug in _loaded/_failed, not a store error
                log.failure("secrets cache update failed", failure=result)
            st.inflight = None
            waiters, st.waiters = st.waiters, []
            for w in waiters:
                w.callback(None)

        st.inflight.addBoth(done)
        d = defer.Deferred()
        st.waiters.append(d)
        return d

    def _loaded(self, st: _StoreState, data: dict[str, str]) -> None:
        if st.state not in (OK, UNKNOWN):
            log.info("secrets store {store} is back ({location})", store=st.store.name, location=st.store.location)
        st.data = data
        st.loaded_at = self._clock.seconds()
        st.state = OK
        st.message = ""

    def _failed(self, st: _StoreState, failure: Any) -> None:
        exc = failure.value
        if isinstance(exc, StoreAbsent):
            st.data = {}
            st.loaded_at = self._clock.seconds()
            st.state = ABSENT
            st.message = ""
            return
        if isinstance(exc, SecretStoreError):
            state, message = exc.state, str(exc)
        else:
            state, message = ERROR, f"{st.store.name}: unexpected {describe(exc)}"
        st.failures += 1
        changed = (state, message) != (st.state, st.message)
        st.state, st.message = state, message
        if state == NOT_FOUND:
            # The store answered that the secret is gone (deleted, revoked):
            # that is authoritative, unlike an outage -- stop serving old values.
            st.data = None
        if changed:
            level = log.critical if state == REFUSED else log.warning
            level(
                "secrets store {store} degraded: {reason}{stale}",
                store=st.store.name,
                reason=message,
                stale="; keeping the values loaded earlier" if st.data is not None else "",
            )


class SecretsService(service.Service):
    """Owns the secrets thread pool and the :class:`SecretsManager`; stops the pool at shutdown."""

    name = "secrets"

    def __init__(
        self,
        config: Any,
        clock: IReactorTime,
        *,
        reactor: Any,
        environ: Mapping[str, str] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
    ):
        self.pool = BlockingPool(reactor, "stdaemon-secrets", maxthreads=pool_size)
        self.manager = SecretsManager(config, clock, self.pool, environ=environ)

    def startService(self) -> None:
        super().startService()
        self.pool.start()
        # Warm the cache in the background; start-up never waits on a store.
        self.manager.refresh().addErrback(lambda f: log.failure("secrets warm-up failed", failure=f))

    def stopService(self) -> defer.Deferred:
        """Stop accepting loads and join the pool's threads off the reactor thread.

        Loads in flight are bounded by the clients' timeouts, so this ends.
        """
        super().stopService()
        self.manager.stop()
        return self.pool.stop()

    async def health(self) -> Component:
        """The ``secrets`` health component."""
        report = await self.manager.health()
        return Component(report["name"], report["status"], report["message"], report["latency_ms"])


def resolve_blocking(config: Any, name: str, environ: Mapping[str, str] | None = None) -> tuple[str | None, list[str]]:
    """Blocking, uncached resolution of one secret for command-line tools.

    Same order and stores as the daemon.  Returns ``(value, problems)``;
    ``problems`` names stores that could not answer (no values), so a tool
    can refuse to guess when the answer may sit in a store that is down."""
    environ = os.environ if environ is None else environ
    value = environ.get(name)
    if value:
        return value, []
    problems = []
    for store in build_stores(config, environ):
        if not store.configured:
            continue
        try:
            data = store.load()
        except StoreAbsent:
            continue
        except SecretStoreError as exc:
            if exc.state != NOT_FOUND:
                problems.append(f"{store.name}: {exc}")
            continue
        except Exception as exc:  # a client library bug: report, do not guess
            problems.append(f"{store.name}: {describe(exc)}")
            continue
        if data.get(name):
            return data[name], problems
    return None, problems
