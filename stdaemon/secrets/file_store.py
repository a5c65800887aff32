"""The secrets file store (``secrets.file`` or the default locations); blocking, it runs
in the secrets thread pool only."""

from __future__ import annotations

import json
import os
import stat
import threading

import yaml

from stdaemon.secrets.base import ERROR, NOT_FOUND, REFUSED, SecretStoreError, StoreAbsent, flatten
from stdaemon.store.files import write_atomic

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
            return flatten(data, f"secrets file {path}")
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
