"""What a failed provider call answers: one mapping of the provider client's errors to API errors.

=========================  ======  ==========================  ================================
error                      status  code                        detail
=========================  ======  ==========================  ================================
``ProviderAPIError``       502     ``provider_error``          ``<what> (<status>): <message>``
``ProviderUnavailable``    502     ``provider_unavailable``    ``Replicate could not be reached: …``
``CircuitOpenError``       503     ``circuit_open``            the breaker's text; ``Retry-After``
``ProviderNotConfigured``  400     ``provider_not_configured`` its text
=========================  ======  ==========================  ================================

``what`` says what Replicate refused (each caller names its own call); ``extra`` is added to the
error body (e.g. ``success=False`` on the submission paths).
"""

from __future__ import annotations

from typing import Any

from stdaemon.http.errors import ApiError
from stdaemon.outbound.breaker import CircuitOpenError
from stdaemon.providers.replicate import ProviderAPIError, ProviderNotConfigured, ProviderUnavailable

#: The errors a provider call may raise that have an answer of their own.
PROVIDER_ERRORS = (ProviderAPIError, ProviderUnavailable, ProviderNotConfigured, CircuitOpenError)


def retry_after_header(seconds: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds, rounded up, at least 1."""
    return {"Retry-After": str(max(1, int(seconds + 0.999)))}


def provider_error(exc: Exception, what: str = "Replicate error", **extra: Any) -> ApiError:
    """The :class:`ApiError` answering a provider call that raised ``exc`` (one of
    :data:`PROVIDER_ERRORS`)."""
    if isinstance(exc, ProviderAPIError):
        return ApiError(502, "provider_error", f"{what} ({exc.status}): {exc.message}", **extra)
    if isinstance(exc, CircuitOpenError):
        return ApiError(503, "circuit_open", str(exc), headers=retry_after_header(exc.retry_after), **extra)
    if isinstance(exc, ProviderUnavailable):
        return ApiError(502, "provider_unavailable", f"Replicate could not be reached: {exc}", **extra)
    if isinstance(exc, ProviderNotConfigured):
        return ApiError(400, "provider_not_configured", str(exc), **extra)
    raise TypeError(f"not a provider error: {type(exc).__name__}")
