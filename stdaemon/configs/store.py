"""Named training configurations on disk (S18), SimpleTuner's WebUI layout.

``<state>/configs/<name>/config.json`` holds the training configuration (a JSON
object) and ``multidatabackend.json`` the dataloader configuration (a JSON
list, or an object).  Blocking: every function here runs in the configs
thread pool (:class:`stdaemon.configs.ConfigService`), never on the reactor.

Names are checked by :func:`check_name` before any path is built: letters,
digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 128
characters -- so a name can never leave the configs directory.  Each file is
written to a temporary name in the same directory, fsynced and renamed over
the old one, so a reader sees the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

from stdaemon.store.files import fsync_dir, write_atomic

CONFIG_FILE = "config.json"
DATALOADER_FILE = "multidatabackend.json"
MAX_FILE_BYTES = 16 * 1024 * 1024
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ConfigError(Exception):
    """A stored file cannot be read back as JSON (``name``, reason in the message)."""


def check_name(name: Any) -> str:
    """The name, or ValueError(reason) when it is not a safe config name."""
    if not isinstance(name, str) or not NAME.match(name) or ".." in name:
        raise ValueError("must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                         "letter or digit (no '..', no '/')")
    return name


def encode(value: Any) -> bytes:
    """Strict JSON (NaN and Infinity refused: ValueError)."""
    return (json.dumps(value, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode("utf-8")


def _read_json(path: str, name: str) -> Any:
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{os.path.basename(path)} of config {name} is larger than {MAX_FILE_BYTES} bytes")
    try:
        return json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise ConfigError(f"{os.path.basename(path)} of config {name} is not valid JSON") from None


class ConfigStore:
    def __init__(self, root: str):
        self.root = root

    def _dir(self, name: str) -> str:
        return os.path.join(self.root, check_name(name))

    def list(self) -> list[dict]:
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        out = []
        for entry in entries:
            if not NAME.match(entry) or ".." in entry:
                continue
            directory = os.path.join(self.root, entry)
            config_path = os.path.join(directory, CONFIG_FILE)
            if os.path.islink(directory) or not os.path.isfile(config_path):
                continue
            out.append({"name": entry, "updated_at": os.stat(config_path).st_mtime,
                        "has_dataloader": os.path.isfile(os.path.join(directory, DATALOADER_FILE))})
        return out

    def get(self, name: str) -> Optional[dict]:
        directory = self._dir(name)
        if os.path.islink(directory):
            return None
        config = _read_json(os.path.join(directory, CONFIG_FILE), name)
        if config is None:
            return None
        dataloader = _read_json(os.path.join(directory, DATALOADER_FILE), name)
        return {"name": name, "config": config,
                "dataloader_config": [] if dataloader is None else dataloader,
                "updated_at": os.stat(os.path.join(directory, CONFIG_FILE)).st_mtime}

    def put(self, name: str, config: dict, dataloader: Any) -> bool:
        """Write both files; True when the config is new."""
        config_bytes = encode(config)
        dataloader_bytes = encode(dataloader)
        directory = self._dir(name)
        if os.path.islink(directory):
            raise ConfigError(f"config {name} is a symbolic link; refusing to write through it")
        created = not os.path.isfile(os.path.join(directory, CONFIG_FILE))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        # The dataloader first: a crash between the two renames leaves the
        # old config.json next to the new dataloader, never a config without one.
        write_atomic(os.path.join(directory, DATALOADER_FILE), dataloader_bytes)
        write_atomic(os.path.join(directory, CONFIG_FILE), config_bytes)
        if created:
            fsync_dir(self.root)
        return created

    def delete(self, name: str) -> bool:
        directory = self._dir(name)
        if os.path.islink(directory):
            os.unlink(directory)
            return True
        if not os.path.isdir(directory):
            return False
        shutil.rmtree(directory)
        fsync_dir(self.root)
        return True
