"""What every secrets store shares: the states ``status()`` reports, the errors a store
raises (never holding a value) and the value-free helpers.  Pure: no I/O."""

from __future__ import annotations

from typing import Any, Mapping

NETWORK_TIMEOUT = 3.0  # seconds, for the AWS and Vault clients

# Store states reported by ``status()``.
OK = "ok"  # loaded (possibly an empty set)
ABSENT = "absent"  # nothing configured / no default file: not an error
UNKNOWN = "unknown"  # configured, not yet loaded
DOWN = "unreachable"  # network error, timeout, sealed
REFUSED = "refused"  # file with unsafe permissions
NOT_FOUND = "not_found"  # reachable, but the configured secret does not exist
ERROR = "error"  # reachable but failing: auth, bad format, ...

DEGRADED_STATES = (DOWN, REFUSED, NOT_FOUND, ERROR)


class SecretStoreError(Exception):
    """A store could not deliver its secrets.  The message never holds a value."""

    def __init__(self, state: str, message: str):
        super().__init__(message)
        self.state = state


class StoreAbsent(Exception):
    """The store is not in use (for example: no default secrets file)."""


def describe(exc: BaseException) -> str:
    """A short, value-free description of a client library exception."""
    text = str(exc).replace("\n", " ")
    if len(text) > 200:
        text = text[:200] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def flatten(data: Any, origin: str) -> dict[str, str]:
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
