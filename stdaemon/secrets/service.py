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

Secret values are never logged and never part of ``status()``; error messages
that reach logs or health are built from exception types and store locations.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml
from twisted.application import service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from stdaemon.store.files import write_atomic
from stdaemon.threads import BlockingPool
from stdaemon.logs import get_logger

REPLICATE_TOKEN = "REPLICATE_API_TOKEN"

DEFAULT_TTL = 300.0
DEFAULT_RETRY_INTERVAL = 30.0
DEFAULT_POOL_SIZE = 4
NETWORK_TIMEOUT = 3.0

# Store states reported by ``status()``.
OK = "ok"  # loaded (possibly an empty set)
ABSENT = "absent"  # nothing configured / no default file: not an error
UNKNOWN = "unknown"  # configured, not yet loaded
DOWN = "unreachable"  # network error, timeout, sealed
REFUSED = "refused"  # file with unsafe permissions
NOT_FOUND = "not_found"  # reachable, but the configured secret does not exist
ERROR = "error"  # reachable but failing: auth, bad format, ...

_DEGRADED_STATES = (DOWN, REFUSED, NOT_FOUND, ERROR)

log = get_logger("stdaemon.secrets")


class SecretStoreError(Exception):
    """A store could not deliver its secrets.  The message never holds a value."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


class StoreAbsent(Exception):
    """The store is not in use (for example: no default secrets file)."""


def _describe(exc: BaseException) -> str:
    """A short, value-free description of a client library exception."""
    text = str(exc).replace("\n", " ")
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _flatten(data: Any, origin: str) -> dict[str, str]:
    """Keep the scalar entries of a secrets mapping, as strings."""
    if not isinstance(data, Mapping):
        raise SecretStoreError(ERROR, f"{origin} does not hold a JSON/YAML object of name -> value")
    out: dict[str, str] = {}
    for key, value in data.items():
        if value is None or isinstance(value, (Mapping, list, tuple)):
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        out[str(key)] = str(value)
    return out


# --------------------------------------------------------------------------
# Blocking stores: ``load()`` runs in the secrets thread pool only.
# --------------------------------------------------------------------------


SECRETS_FILE_NAMES = ("secrets.json", "secrets.yaml", "secrets.yml")


class FileStore:
    """The secrets file: ``secrets.file``, else the first of
    ``<state>/secrets.{json,yaml,yml}`` and ``~/.simpletuner/secrets.{json,yaml,yml}``
    that exists.  :meth:`write` changes one name in it (the token API)."""

    name = "file"

    def __init__(self, explicit: str, state_dir: str, home: str = ""):
        self.explicit = bool(explicit)
        if explicit:
            self.candidates = (os.path.expanduser(explicit),)
        else:
            bases = [os.path.expanduser(state_dir or "~/.simpletuner")]
            home_base = os.path.join(home or os.path.expanduser("~"), ".simpletuner")
            if os.path.abspath(home_base) != os.path.abspath(bases[0]):
                bases.append(home_base)
            self.candidates = tuple(os.path.join(base, n) for base in bases for n in SECRETS_FILE_NAMES)
        self.location = self.candidates[0]
        self._write_lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return True

    def load(self) -> dict[str, str]:
        for path in self.candidates:
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise SecretStoreError(ERROR, f"cannot open secrets file {path}: {exc.strerror}")
            self.location = path
            try:
                st = os.fstat(fd)
                if not stat.S_ISREG(st.st_mode):
                    raise SecretStoreError(ERROR, f"secrets file {path} is not a regular file")
                mode = stat.S_IMODE(st.st_mode)
                if mode & 0o066:
                    raise SecretStoreError(
                        REFUSED,
                        f"secrets file {path} has mode {mode:04o} and is accessible by group/others;"
                        f" refusing to use it (chmod 600 {path})",
                    )
                with os.fdopen(fd, "rb") as fh:
                    fd = -1
                    raw = fh.read(1024 * 1024 + 1)
            finally:
                if fd >= 0:
                    os.close(fd)
            if len(raw) > 1024 * 1024:
                raise SecretStoreError(ERROR, f"secrets file {path} is larger than 1 MiB")
            try:
                if path.endswith((".yaml", ".yml")):
                    data = yaml.safe_load(raw.decode("utf-8")) or {}
                else:
                    data = json.loads(raw.decode("utf-8"))
            except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
                # The parser's message may quote file content: report the type only.
                raise SecretStoreError(ERROR, f"secrets file {path} cannot be parsed ({type(exc).__name__})")
            return _flatten(data, f"secrets file {path}")
        self.location = self.candidates[0]
        if self.explicit:
            raise SecretStoreError(NOT_FOUND, f"secrets file {self.location} does not exist")
        raise StoreAbsent()

    def target(self) -> str:
        """The file a write goes to: the configured one, else the first
        existing candidate, else ``<state>/secrets.json``."""
        if self.explicit:
            return self.candidates[0]
        for path in self.candidates:
            if os.path.lexists(path):
                return path
        return self.candidates[0]

    def write(self, name: str, value: str | None) -> dict:
        """Set (or, with ``None``, remove) ``name`` in the secrets file, keeping
        every other entry.  The new file is written 0600 under a temporary name
        in the same directory, fsynced and renamed over the old one (created
        when absent).  A file that cannot be parsed is never overwritten.
        Returns ``{"path", "changed"}``; never a value."""
        with self._write_lock:
            path = self.target()
            yaml_format = path.endswith((".yaml", ".yml"))
            data: dict = {}
            try:
                fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            except FileNotFoundError:
                fd = -1
            except OSError as exc:
                raise SecretStoreError(ERROR, f"cannot open secrets file {path}: {exc.strerror}")
            if fd >= 0:
                with os.fdopen(fd, "rb") as fh:
                    raw = fh.read(1024 * 1024 + 1)
                if len(raw) > 1024 * 1024:
                    raise SecretStoreError(ERROR, f"secrets file {path} is larger than 1 MiB")
                try:
                    text = raw.decode("utf-8")
                    loaded = (yaml.safe_load(text) if yaml_format else json.loads(text)) if text.strip() else {}
                except (ValueError, yaml.YAMLError, UnicodeDecodeError) as exc:
                    raise SecretStoreError(
                        ERROR, f"secrets file {path} cannot be parsed ({type(exc).__name__}); "
                        "not overwriting it") from None
                if not isinstance(loaded, dict):
                    raise SecretStoreError(ERROR, f"secrets file {path} does not hold an object; "
                                           "not overwriting it")
                data = loaded
            if value is None:
                if name not in data:
                    return {"path": path, "changed": False}
                del data[name]
            else:
                if data.get(name) == value:
                    return {"path": path, "changed": False}
                data[name] = value
            if yaml_format:
                body = yaml.safe_dump(data, default_flow_style=False, sort_keys=False).encode("utf-8")
            else:
                body = (json.dumps(data, indent=2) + "\n").encode("utf-8")
            os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
            write_atomic(path, body)  # 0600, temp + fsync + rename
            return {"path": path, "changed": True}


class AwsStore:
    name = "aws"

    def __init__(self, secret_name: str, region: str, endpoint_url: str, environ: Mapping[str, str]):
        self.secret_name = secret_name
        self.region = region
        self.endpoint_url = endpoint_url
        self._environ = environ
        self._client = None
        self._lock = threading.Lock()
        self.location = f"aws:{secret_name}" + (f"@{region}" if region else "")

    @property
    def configured(self) -> bool:
        return bool(self.secret_name)

    def _get_client(self):
        with self._lock:
            if self._client is None:
                import boto3
                from botocore.config import Config as BotoConfig

                env = self._environ
                session = boto3.session.Session(
                    aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
                    aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
                    aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
                    region_name=self.region or None,
                )
                self._client = session.client(
                    "secretsmanager",
                    endpoint_url=self.endpoint_url or None,
                    config=BotoConfig(
                        connect_timeout=NETWORK_TIMEOUT,
                        read_timeout=NETWORK_TIMEOUT,
                        retries={"max_attempts": 2, "mode": "standard"},
                    ),
                )
            return self._client

    def load(self) -> dict[str, str]:
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            ConnectionError as BotoConnectionError,
            NoCredentialsError,
            NoRegionError,
        )

        try:
            response = self._get_client().get_secret_value(SecretId=self.secret_name)
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "ResourceNotFoundException":
                raise SecretStoreError(NOT_FOUND, f"AWS secret {self.secret_name!r} does not exist")
            raise SecretStoreError(ERROR, f"AWS Secrets Manager refused: {code or 'error'}")
        except (NoCredentialsError, NoRegionError) as exc:
            raise SecretStoreError(ERROR, f"AWS Secrets Manager not usable: {type(exc).__name__}")
        except BotoConnectionError as exc:
            raise SecretStoreError(DOWN, f"AWS Secrets Manager unreachable: {type(exc).__name__}")
        except BotoCoreError as exc:
            raise SecretStoreError(DOWN, f"AWS Secrets Manager failed: {type(exc).__name__}")
        text = response.get("SecretString")
        if text is None:
            blob = response.get("SecretBinary") or b""
            text = blob.decode("utf-8", "replace") if isinstance(blob, bytes) else str(blob)
        try:
            data = json.loads(text)
        except ValueError:
            raise SecretStoreError(ERROR, f"AWS secret {self.secret_name!r} is not a JSON object")
        return _flatten(data, f"AWS secret {self.secret_name!r}")


class VaultStore:
    name = "vault"

    def __init__(self, addr: str, mount: str, path: str, environ: Mapping[str, str], namespace: str = ""):
        self.addr = addr.rstrip("/")
        self.mount = (mount or "secret").strip("/")
        self.path = (path or "simpletuner").strip("/")
        self.namespace = namespace
        self._environ = environ
        self._client = None
        self._lock = threading.Lock()
        self.kv_version: int | None = None
        self.auth_method = ""
        self.location = f"{self.addr}/{self.mount}/{self.path}" if self.addr else ""

    @property
    def configured(self) -> bool:
        return bool(self.addr)

    def _credentials(self) -> tuple[str, str, str]:
        env = self._environ
        return (
            env.get("VAULT_TOKEN", ""),
            env.get("VAULT_ROLE_ID", ""),
            env.get("VAULT_SECRET_ID", ""),
        )

    def _login(self, client) -> None:
        token, role_id, secret_id = self._credentials()
        if token:
            client.token = token
            self.auth_method = "token"
        elif role_id:
            client.auth.approle.login(role_id=role_id, secret_id=secret_id or None)
            self.auth_method = "approle"
        else:
            self.auth_method = "none"
            raise SecretStoreError(ERROR, "Vault: neither VAULT_TOKEN nor VAULT_ROLE_ID is set")

    def _get_client(self):
        if self._client is None:
            import hvac

            verify: Any = True
            cacert = self._environ.get("VAULT_CACERT", "")
            if cacert:
                verify = cacert
            client = hvac.Client(
                url=self.addr,
                token=None,
                timeout=NETWORK_TIMEOUT,
                verify=verify,
                namespace=self.namespace or None,
            )
            client.token = None
            self._login(client)
            self._client = client
        return self._client

    def _read(self, client, version: int) -> dict | None:
        import hvac.exceptions as hx

        try:
            if version == 2:
                resp = client.secrets.kv.v2.read_secret_version(
                    path=self.path, mount_point=self.mount, raise_on_deleted_version=True
                )
                return (resp or {}).get("data", {}).get("data")
            resp = client.secrets.kv.v1.read_secret(path=self.path, mount_point=self.mount)
            return (resp or {}).get("data")
        except hx.InvalidPath:
            return None

    def _load_once(self) -> dict[str, str]:
        client = self._get_client()
        order = (2, 1) if self.kv_version != 1 else (1, 2)
        for version in order:
            data = self._read(client, version)
            if data is not None:
                self.kv_version = version
                return _flatten(data, f"Vault secret {self.mount}/{self.path}")
        raise SecretStoreError(NOT_FOUND, f"Vault secret {self.mount}/{self.path} does not exist (KV v2 or v1)")

    def load(self) -> dict[str, str]:
        import hvac.exceptions as hx

        with self._lock:
            try:
                try:
                    return self._load_once()
                except (hx.Forbidden, hx.Unauthorized):
                    # An expired AppRole token: log in again once.
                    if self.auth_method != "approle":
                        raise
                    self._client = None
                    return self._load_once()
            except SecretStoreError:
                raise
            except (hx.Forbidden, hx.Unauthorized) as exc:
                self._client = None
                raise SecretStoreError(ERROR, f"Vault refused access: {type(exc).__name__}")
            except (hx.VaultDown, hx.InternalServerError, hx.BadGateway) as exc:
                self._client = None
                raise SecretStoreError(DOWN, f"Vault unavailable: {type(exc).__name__}")
            except OSError as exc:  # hvac's HTTP errors (requests' RequestException is an OSError)
                self._client = None
                raise SecretStoreError(DOWN, f"Vault unreachable: {type(exc).__name__}")
            except hx.VaultError as exc:
                self._client = None
                raise SecretStoreError(ERROR, f"Vault error: {type(exc).__name__}")


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
        reactor: Any = None,
        environ: Mapping[str, str] | None = None,
        retry_interval: float | None = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._clock = clock
        self._pool = threadpool
        self._reactor = reactor
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
                "serving_stale": bool(st.state in _DEGRADED_STATES and st.data is not None),
            }
            if st.store.name == "vault":
                entry["kv_version"] = st.store.kv_version
                entry["auth"] = st.store.auth_method or None
            stores.append(entry)
            if st.state in _DEGRADED_STATES:
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
            state, message = ERROR, f"{st.store.name}: unexpected {_describe(exc)}"
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
        reactor: Any = None,
        environ: Mapping[str, str] | None = None,
        pool_size: int = DEFAULT_POOL_SIZE,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self._reactor = reactor
        self.pool = BlockingPool(reactor, "stdaemon-secrets", maxthreads=pool_size)
        self.manager = SecretsManager(config, clock, self.pool, reactor=reactor, environ=environ)

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


__all__ = [
    "REPLICATE_TOKEN",
    "install",
    "resolve_blocking",
    "SecretStoreError",
    "SecretsManager",
    "SecretsService",
]



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
            problems.append(f"{store.name}: {_describe(exc)}")
            continue
        if data.get(name):
            return data[name], problems
    return None, problems


def install(ctx: Any) -> SecretsService:
    """Wire secrets into the App context: ``ctx.secrets`` (the manager), the pool
    service under ``ctx.services`` and the ``secrets`` health component."""
    svc = SecretsService(ctx.config, ctx.clock, reactor=ctx.reactor)
    svc.setServiceParent(ctx.services)
    ctx.secrets = svc.manager

    async def check() -> Any:
        from stdaemon.health.service import Component

        report = await svc.manager.health()
        return Component(report["name"], report["status"], report["message"], report["latency_ms"])

    ctx.health.register("secrets", check)
    return svc
