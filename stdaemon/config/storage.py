"""Validation of the ``storage`` section (where the S3 endpoint keeps objects): each key, and what
the ``s3`` backend needs together (its CA bundle read once). The loader calls it, so
``--check-config`` sees it all."""

from __future__ import annotations

import os
import re
from typing import Any, Callable

from stdaemon.invalid import InvalidValue
from stdaemon.outbound.tls import CABundleError, load_ca_bundle

BACKENDS = ("local", "s3")
ADDRESSING_STYLES = ("auto", "path", "virtual")
#: S3's smallest part (every part but the last).
MIN_PART_SIZE = 5 * 1024 * 1024


def _check_choice(choices: tuple[str, ...]) -> Callable[[str, Any], Any]:
    def check(path: str, value: str) -> str:
        if value.lower() not in choices:
            raise InvalidValue(path, f"must be one of {', '.join(choices)}, got {value!r}")
        return value.lower()

    return check


def _check_url(path: str, value: str) -> str:
    if value and not re.match(r"^https?://[^/\s]+", value):
        raise InvalidValue(path, f"must be an http(s) URL such as https://host:port, got {value!r}")
    return value.rstrip("/")


def _check_storage_prefix(path: str, value: str) -> str:
    """A key prefix in the backing bucket: no leading slash, ends with one when set."""
    value = value.strip().lstrip("/")
    if any(part in (".", "..") for part in value.split("/")) or "//" in value:
        raise InvalidValue(path, f"must be a plain key prefix such as stdaemon/ or teams/a/, got {value!r}")
    return value + "/" if value and not value.endswith("/") else value


def _check_bucket_name(path: str, value: str) -> str:
    if value and not re.match(r"^[a-z0-9][a-z0-9.\-_]{1,254}$", value, re.IGNORECASE):
        raise InvalidValue(path, f"not an S3 bucket name, got {value!r}")
    return value


def _check_part_size(path: str, value: int) -> int:
    # a smaller threshold would make parts the backing store refuses
    if value < MIN_PART_SIZE:
        raise InvalidValue(path, f"must be at least 5 MiB (5242880), got {value!r}")
    return value


def check_storage(section: Any) -> Any:
    """What the ``s3`` backend needs together; read at load so --check-config sees it."""
    if section.backend != "s3":
        return section
    if not section.bucket:
        raise InvalidValue("storage.bucket", "required when storage.backend is s3")
    if bool(section.access_key_id_secret) != bool(section.secret_access_key_secret):
        raise InvalidValue("storage.secret_access_key_secret" if section.access_key_id_secret
                           else "storage.access_key_id_secret",
                           "access_key_id_secret and secret_access_key_secret must be set together")
    if section.ssl_ca_bundle:
        try:
            load_ca_bundle(os.path.expanduser(section.ssl_ca_bundle))
        except CABundleError as e:
            raise InvalidValue("storage.ssl_ca_bundle", str(e)) from None
    return section


STORAGE_VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "storage.backend": _check_choice(BACKENDS),
    "storage.endpoint_url": _check_url,
    "storage.bucket": _check_bucket_name,
    "storage.prefix": _check_storage_prefix,
    "storage.addressing_style": _check_choice(ADDRESSING_STYLES),
    "storage.multipart_threshold": _check_part_size,
}
