"""The one "invalid value at a path" error.

Raised for a configuration value (``path`` is the dotted key path, e.g.
``rate_limit.rules[2].calls``) and for a field of an API request or a saved
setting (``path`` is the field name).  Pure: importable from anywhere
(config, providers, users, metrics, ratelimit, approvals) without cycles.
"""

from __future__ import annotations


class InvalidValue(ValueError):
    """The value at ``path`` is invalid: ``reason`` says why.

    ``str()`` is ``"<path>: <reason>"``, or only ``reason`` when raised with
    ``show_path=False`` (for answers that name the field separately).
    ``code`` is the API error code an HTTP surface answers with
    (``invalid_field``, or ``unknown_field`` for a field that does not exist).
    """

    def __init__(self, path: str, reason: str, *, code: str = "invalid_field",
                 show_path: bool = True):
        super().__init__(f"{path}: {reason}" if show_path else reason)
        self.path = path
        self.reason = reason
        self.code = code

    @property
    def field(self) -> str:
        """The request or settings field: the same as ``path``."""
        return self.path


def check_positive(path: str, value: float) -> float:
    """``value`` when it is greater than 0, else :class:`InvalidValue` at ``path`` (the one such
    check of configuration values, whichever module's keys)."""
    if value <= 0:
        raise InvalidValue(path, f"must be greater than 0, got {value!r}")
    return value
