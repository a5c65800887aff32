"""Prometheus scrape endpoint and metrics settings API (S10).

* ``GET /api/cloud/metrics/prometheus`` — the exposition of the enabled
  categories.  Off by default (404 with a hint how to enable it).  Public
  unless ``metrics.bearer_token`` is set; then ``Authorization: Bearer
  <token>`` is required (constant-time compare, 401 otherwise).  Text format
  0.0.4 by default, OpenMetrics when ``Accept`` asks for
  ``application/openmetrics-text``.
* ``GET|PUT /api/cloud/metrics/config`` — ``{prometheus_enabled,
  prometheus_categories}``; reading needs an operator, changing an admin.
  Saved in the ``settings`` table (namespace ``metrics``) over the config
  values, audited as ``metrics.configured``.
* ``POST /api/cloud/metrics/config/templates/{minimal|standard|security|full}``
  — export the categories of a template (sets them and enables the export; admin).
* ``GET /api/cloud/metrics/config/preview?categories=jobs&categories=health``
  — what a scrape would return with those categories; changes nothing.
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Mapping, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon import metrics as m
from stdaemon.http.errors import ApiError, invalid_field, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, PUBLIC, Response, Surface, route
from stdaemon.http.validation import BodyModel, QueryModel
from stdaemon.logs import get_logger

log = get_logger("stdaemon.http.metrics")

ENABLE_HINT = ("Prometheus export is disabled. Enable it with PUT /api/cloud/metrics/config "
               '{"prometheus_enabled": true} (admin API key) or set metrics.prometheus_enabled: true '
               "in the configuration file.")


# -- request models (stdaemon.http.validation) -----------------------------------------------

Name = Annotated[str, Field(max_length=64)]


class MetricsUpdate(BodyModel):
    """``null`` returns a setting to the configuration file's value."""

    model_config = ConfigDict(extra="forbid")

    prometheus_enabled: Optional[bool] = None
    # A list of category names, or one comma-separated string of them.
    prometheus_categories: Optional[Union[Annotated[list[Name], Field(max_length=64)],
                                          Annotated[str, Field(max_length=1024)]]] = None


class PreviewQuery(QueryModel):
    categories: Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=64)] = []


def _actor(request: Any) -> str:
    principal = getattr(request, "principal", None)
    return principal.actor if principal is not None else "system"


def _bearer(request: Any) -> bytes:
    header = request.getHeader("authorization") or ""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return value.strip().encode("utf-8", "replace")


class MetricsSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/metrics",)

    @property
    def metrics(self) -> m.Metrics:
        return self.ctx.metrics

    # -- scrape ------------------------------------------------------------------------

    @route(app, "/api/cloud/metrics/prometheus", access=PUBLIC)
    async def prometheus(self, request):
        """Prometheus exposition of the enabled categories."""
        metrics = self.metrics
        if not metrics.enabled:
            raise ApiError(404, "metrics_disabled", ENABLE_HINT)
        token = metrics.bearer_token
        if token:
            if not hmac.compare_digest(_bearer(request), token.encode("utf-8")):
                raise ApiError(401, "unauthorized", "A valid bearer token is required for this endpoint",
                               headers={"WWW-Authenticate": 'Bearer realm="stdaemon-metrics"'})
        return await self._render(request, metrics.categories)

    async def _render(self, request: Any, categories: list[str]) -> Response:
        if "health" in categories:
            await self._measure_database()
        body, content_type = self.metrics.render(categories, request.getHeader("accept"))
        return Response(body, content_type=content_type)

    async def _measure_database(self) -> None:
        """A real query timed on the clock, for the database latency gauge."""
        started = self.ctx.clock.seconds()
        try:
            await self.ctx.db.ping()
        except Exception:
            self.ctx.last_db_latency_ms = None
            return
        self.ctx.last_db_latency_ms = round((self.ctx.clock.seconds() - started) * 1000.0, 3)

    # -- settings ----------------------------------------------------------------------

    def _describe(self) -> dict:
        metrics = self.metrics
        body = metrics.settings()
        body.update({
            "available_categories": list(m.CATEGORIES),
            "templates": {name: list(categories) for name, categories in m.TEMPLATES.items()},
            "sources": metrics.sources(),
            "bearer_token_required": bool(metrics.bearer_token),
            "endpoint": "/api/cloud/metrics/prometheus",
        })
        return body

    @route(app, "/api/cloud/metrics/config", access=OPERATOR)
    async def get_config(self, request):
        """Metrics settings, categories and templates."""
        return self._describe()

    @route(app, "/api/cloud/metrics/config", methods=("PUT", "PATCH"), access=ADMIN, body=MetricsUpdate)
    async def put_config(self, request, body: MetricsUpdate):
        """Change the metrics settings."""
        body = body.given()
        if not body:
            raise ApiError(400, "empty_update", "The body names no setting to change "
                           f"(settings: {', '.join(m.SETTING_KEYS)})")
        try:
            changes = m.validate_update(body)
        except m.SettingsError as exc:
            raise invalid_field(exc.field, exc.reason) from None
        return await self._save(request, changes, action="update")

    @route(app, "/api/cloud/metrics/config/templates/<name>", methods=("POST",), access=ADMIN)
    async def apply_template(self, request, name):
        """Export a template's categories (and enable the export)."""
        categories = m.TEMPLATES.get(name)
        if categories is None:
            raise not_found(f"Unknown metrics template {name!r} (known: {', '.join(m.TEMPLATES)})")
        # A template is the operator's choice of what to export: it also turns
        # the export on (as the guide's one-line "apply a template" implies).
        body = await self._save(request, {"prometheus_enabled": True, "prometheus_categories": list(categories)},
                                action="template", template=name)
        body["template"] = name
        return body

    async def _save(self, request: Any, changes: Mapping[str, Any], *, action: str,
                    template: str | None = None) -> dict:
        metrics = self.metrics
        before = metrics.settings()
        await self.ctx.db.run_write(m.save_settings, changes, self.ctx.now())
        metrics.apply_saved(await self.ctx.db.run_read(m.load_settings))
        after = metrics.settings()
        log.info("Metrics settings changed by {actor}: {fields}", actor=_actor(request),
                 fields=", ".join(sorted(changes)))
        details: dict[str, Any] = {"old": {k: before[k] for k in changes}, "new": {k: after[k] for k in changes}}
        if template is not None:
            details["template"] = template
        await self._audit(request, action, details)
        return self._describe()

    async def _audit(self, request: Any, action: str, details: dict) -> None:
        writer = getattr(self.ctx, "audit", None)
        if writer is None:
            return
        try:
            result = writer.record("metrics.configured", actor=_actor(request),
                                   ip=getattr(request, "client_ip", None), target="metrics",
                                   action=action, details=details)
            if hasattr(result, "__await__") or hasattr(result, "addCallback"):
                await result
        except Exception:  # the change is committed; a lost audit line is logged
            log.failure("Could not write audit entry metrics.configured")

    # -- preview -----------------------------------------------------------------------

    @route(app, "/api/cloud/metrics/config/preview", access=OPERATOR, query=PreviewQuery)
    async def preview(self, request, query: PreviewQuery):
        """What a scrape would return with these categories."""
        raw = query.categories
        if raw:
            parts = [part.strip() for value in raw for part in value.split(",") if part.strip()]
            try:
                categories = list(m.normalise_categories(parts, "categories"))
            except m.SettingsError as exc:
                raise invalid_field(exc.field, exc.reason) from None
        else:
            categories = self.metrics.categories
        if "health" in categories:
            await self._measure_database()
        body, content_type = self.metrics.render(categories, request.getHeader("accept"))
        return {
            "categories": categories,
            "content_type": content_type,
            "metrics": body.decode("utf-8"),
            "enabled": self.metrics.enabled,
        }
