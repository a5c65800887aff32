"""Validation of the ``cluster`` config section (pure; the loader calls it with key paths)."""

from __future__ import annotations

import re
from typing import Any, Callable
from urllib.parse import urlsplit

from stdaemon.invalid import InvalidValue, check_positive

#: environment variable → key path, merged into the loader's table
ENV_KEYS: dict[str, str] = {
    "SIMPLETUNER_CLUSTER_REDIS_URL": "cluster.redis_url",
    "SIMPLETUNER_CLUSTER_INSTANCE_ID": "cluster.instance_id",
    "SIMPLETUNER_CLUSTER_LEASE_SECONDS": "cluster.lease_seconds",
}

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,63}$")


def check_redis_url(path: str, value: str) -> str:
    """"" (one instance) or a ``redis://``, ``rediss://`` or ``unix://`` URL whose port and
    database are numbers.  The value is never echoed: it may carry a password."""
    if value == "":
        return value
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise InvalidValue(path, "must be a redis://, rediss:// or unix:// URL")
    try:
        parts.port  # noqa: B018 (raises on a port that is not a number)
        if parts.scheme == "unix":
            query = dict(item.partition("=")[::2] for item in parts.query.split("&") if item)
            database, located = query.get("db", "0"), bool(parts.path)
        else:
            database, located = parts.path.strip("/") or "0", bool(parts.hostname)
        int(database)
    except ValueError as e:
        raise InvalidValue(path, f"is not a usable redis URL ({e})") from None
    if not located:
        raise InvalidValue(path, "names no host (or socket path)")
    return value


def check_name(allow_empty: bool) -> Callable[[str, str], str]:
    """An instance id or namespace: 1-64 of ``[A-Za-z0-9._:-]``, starting with a letter or digit."""
    def check(path: str, value: str) -> str:
        if value == "" and allow_empty:
            return value
        if not _NAME.match(value):
            raise InvalidValue(path, "must be 1-64 letters, digits, '.', '_', ':' or '-', "
                                     f"starting with a letter or digit, got {value!r}")
        return value
    return check


#: key path → validator, merged into the loader's table
VALIDATORS: dict[str, Callable[[str, Any], Any]] = {
    "cluster.redis_url": check_redis_url,
    "cluster.instance_id": check_name(allow_empty=True),
    "cluster.lease_seconds": check_positive,
    "cluster.namespace": check_name(allow_empty=False),
    "cluster.timeout": check_positive,
}


def check_section(cluster: Any) -> None:
    """Rules across keys: a holder renews its lease every ``lease_seconds / 3`` and each renewal
    may take up to ``timeout``."""
    if cluster.lease_seconds < 3 * cluster.timeout:
        raise InvalidValue("cluster.lease_seconds",
                           f"must be at least 3 x cluster.timeout ({3 * cluster.timeout:g} s)")
