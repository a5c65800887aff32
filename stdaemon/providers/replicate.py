"""Replicate REST client (S4): predictions and the account check.

All traffic goes through the one outbound factory (:mod:`stdaemon.outbound.http`)
and the provider's circuit breaker (:mod:`stdaemon.outbound.breaker`).  Idempotent
GETs are retried by the schedule in :mod:`stdaemon.outbound.retry`; ``POST``s
(create, cancel) are never retried blindly.

Endpoints used (Replicate HTTP API v1):

* ``POST /v1/predictions`` ``{version, input, webhook, webhook_events_filter}``
  → 201 + prediction
* ``GET /v1/predictions/{id}`` → prediction (``status``, ``logs``,
  ``metrics.predict_time``, ``output``, ``error``)
* ``POST /v1/predictions/{id}/cancel`` → prediction (404: nothing to cancel)
* ``GET /v1/models/{owner}/{name}`` → model (``latest_version``: ``{id, created_at}``)
* ``GET /v1/models/{owner}/{name}/versions`` → ``{next, previous, results: [{id,
  created_at, cog_version, openapi_schema}]}`` (newest first)
* ``GET /v1/account`` → ``{type, username, name}``
* ``GET /v1/webhooks/default/secret`` → ``{key: "whsec_…"}``

Errors from Replicate carry ``detail`` (and ``title``); that text is what
:class:`ProviderAPIError` reports.
"""

from __future__ import annotations

import random
from typing import Any, Callable
from urllib.parse import quote

from twisted.internet import defer, task

from stdaemon.outbound.http import HTTPClientFactory, OutboundError, OutboundResponse
from stdaemon.outbound.breaker import CircuitBreaker, CircuitOpenError, is_failure_status
from stdaemon.outbound.retry import RetryPolicy, next_delay, parse_retry_after

PROVIDER = "replicate"
DEFAULT_API_BASE_URL = "https://api.replicate.com"
DEFAULT_WEBHOOK_EVENTS = ("start", "output", "logs", "completed")

# Outbound failures that say the provider (or the path to it) is unhealthy.
# TLS verification and configuration errors are the operator's to fix and do
# not trip the breaker.
_BREAKER_KINDS = frozenset({"connection", "timeout", "proxy"})

__all__ = [
    "CircuitOpenError",
    "ProviderAPIError",
    "ProviderNotConfigured",
    "ProviderUnavailable",
    "ReplicateClient",
]


class ReplicateError(Exception):
    """Base of the errors this client raises."""


class ProviderNotConfigured(ReplicateError):
    """No API token (or another required setting) for the provider."""


class ProviderUnavailable(ReplicateError):
    """The provider could not be reached (connection, proxy, TLS, timeout)."""

    def __init__(self, message: str, kind: str = "connection"):
        self.kind = kind
        super().__init__(message)


class ProviderAPIError(ReplicateError):
    """Replicate answered with an error status; ``message`` is its own text."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        self.status = status
        self.message = message
        self.retry_after = retry_after
        super().__init__(f"Replicate API error {status}: {message}")


def error_message(response: OutboundResponse) -> str:
    """Replicate's own error text from a response (``detail``, ``title`` or the body)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("detail", "title", "error", "message"):
            value = body.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    text = response.body.decode("utf-8", "replace").strip()
    return text[:500] or f"HTTP {response.status}"


class ReplicateClient:
    """Replicate predictions for stdaemon.

    ``token()`` returns the API token (``REPLICATE_API_TOKEN``), or a Deferred
    of it; ``api_base_url()`` the current base URL (the provider setting
    ``api_base_url``, looked up on every call).
    """

    def __init__(
        self,
        http: HTTPClientFactory,
        breaker: CircuitBreaker,
        clock,
        token: Callable[[], Any],
        api_base_url: Callable[[], str] = lambda: DEFAULT_API_BASE_URL,
        retry_policy: RetryPolicy | None = None,
        rand: Callable[[], float] = random.random,
        provider: str = PROVIDER,
    ):
        self._http = http
        self.breaker = breaker
        self._clock = clock
        self._token = token
        self._api_base_url = api_base_url
        self._retry = retry_policy or RetryPolicy()
        self._rand = rand
        self.provider = provider
        self.calls_total = 0

    # -- public API -------------------------------------------------------
    async def create_prediction(self, version: str, input_: dict, *, webhook: str | None = None,
                                webhook_events_filter=DEFAULT_WEBHOOK_EVENTS) -> dict:
        body: dict[str, Any] = {"version": version, "input": input_}
        if webhook:
            body["webhook"] = webhook
            body["webhook_events_filter"] = list(webhook_events_filter)
        response = await self._call("POST", "/v1/predictions", json=body)
        return self._expect_json(response, (200, 201))

    async def get_prediction(self, prediction_id: str) -> dict:
        response = await self._call("GET", f"/v1/predictions/{quote(prediction_id, safe='')}")
        return self._expect_json(response, (200,))

    async def cancel_prediction(self, prediction_id: str) -> dict | None:
        """Cancel; returns the prediction, or None when Replicate says 404 (done/unknown)."""
        response = await self._call("POST", f"/v1/predictions/{quote(prediction_id, safe='')}/cancel")
        if response.status == 404:
            return None
        return self._expect_json(response, (200, 201, 202))

    async def get_logs(self, prediction_id: str) -> str:
        prediction = await self.get_prediction(prediction_id)
        logs = prediction.get("logs")
        return logs if isinstance(logs, str) else ""

    async def get_model(self, owner: str, name: str) -> dict:
        response = await self._call("GET", f"/v1/models/{quote(owner, safe='')}/{quote(name, safe='')}")
        return self._expect_json(response, (200,))

    async def list_versions(self, owner: str, name: str) -> list:
        """The first page of a model's versions (Replicate: newest first)."""
        response = await self._call(
            "GET", f"/v1/models/{quote(owner, safe='')}/{quote(name, safe='')}/versions")
        body = self._expect_json(response, (200,))
        results = body.get("results")
        if not isinstance(results, list):
            raise ProviderAPIError(response.status, "versions response has no results list")
        return results

    async def account(self) -> dict:
        response = await self._call("GET", "/v1/account")
        return self._expect_json(response, (200,))

    async def webhook_secret(self) -> str:
        response = await self._call("GET", "/v1/webhooks/default/secret")
        body = self._expect_json(response, (200,))
        key = body.get("key")
        if not isinstance(key, str) or not key:
            raise ProviderAPIError(response.status, "webhook secret response has no key")
        return key

    # -- internals ----------------------------------------------------------
    def _expect_json(self, response: OutboundResponse, ok: tuple[int, ...]) -> dict:
        if response.status not in ok:
            retry_after = parse_retry_after(response.header("Retry-After"), self._clock.seconds())
            raise ProviderAPIError(response.status, error_message(response), retry_after)
        try:
            body = response.json()
        except ValueError:
            raise ProviderAPIError(response.status, "Replicate returned a body that is not JSON") from None
        if not isinstance(body, dict):
            raise ProviderAPIError(response.status, "Replicate returned an unexpected JSON body")
        return body

    async def _auth_header(self) -> dict[str, str]:
        token = await defer.maybeDeferred(self._token)
        if not token:
            raise ProviderNotConfigured(
                "REPLICATE_API_TOKEN is not configured (set it in the environment or a secrets store)")
        return {"Authorization": f"Bearer {token}"}

    async def _call(self, method: str, path: str, *, json: Any = None) -> OutboundResponse:
        headers = await self._auth_header()
        url = self._api_base_url().rstrip("/") + path
        attempt = 0
        while True:
            attempt += 1
            self.breaker.before_call()  # raises CircuitOpenError when open
            self.calls_total += 1
            try:
                response = await self._http.request(self.provider, method, url, json=json, headers=headers)
            except OutboundError as exc:
                # A proxy asking for credentials is a configuration problem, not an outage.
                counts = exc.kind in _BREAKER_KINDS and getattr(exc, "status", None) != 407
                if counts:
                    self.breaker.record_failure(exc.kind)
                else:
                    self.breaker.record_neutral()
                delay = next_delay(method, attempt, self._retry, connection_error=counts,
                                   rand=self._rand)
                if delay is None:
                    raise ProviderUnavailable(str(exc), exc.kind) from None
            else:
                if not is_failure_status(response.status):
                    self.breaker.record_success()
                    return response
                self.breaker.record_failure(f"HTTP {response.status}")
                retry_after = parse_retry_after(response.header("Retry-After"), self._clock.seconds())
                delay = next_delay(method, attempt, self._retry, status=response.status,
                                   retry_after=retry_after, rand=self._rand)
                if delay is None:
                    return response
            await task.deferLater(self._clock, delay)
