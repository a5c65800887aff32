"""HashiCorp Vault (or OpenBao): one KV secret, KV v2 first then KV v1; token or AppRole
login.  Blocking, in the secrets thread pool only; hvac is imported on first use (it is
heavy, and start-up must not load it: ``tests/test_lazy_imports.py``)."""

from __future__ import annotations

import threading
from typing import Any, Mapping

from stdaemon.secrets.base import DOWN, ERROR, NETWORK_TIMEOUT, NOT_FOUND, SecretStoreError, flatten


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
                return flatten(data, f"Vault secret {self.mount}/{self.path}")
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
