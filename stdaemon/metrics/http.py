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
  (also ``POST /api/metrics/config/preview`` with ``{"categories": [...]}``, as
  SimpleTuner's web UI sends)
  — what a scrape would return with those categories, as ``{content,
  metric_count, categories_used}`` (SimpleTuner's shape; ``metrics`` is the
  same text); changes nothing.

SimpleTuner's own paths answer the same data with the same access:
``/api/metrics/config…`` are the routes above; ``GET /api/metrics/prometheus``
is the scrape (JSON ``{"metrics": text}`` when the client asks for JSON, as
``simpletuner metrics prometheus --raw`` does); ``GET /api/metrics/status``
and ``/api/metrics/prometheus/info`` describe the settings;
``GET /api/metrics/health`` is the health report in the CLI's shape
(``healthy``, ``components: {name: {healthy, status, detail}}``).
"""

from __future__ import annotations

import hmac
from typing import Annotated, Any, Literal, Mapping, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.audit.service import request_actor
from stdaemon.metrics import settings as m
from stdaemon.metrics import service as metrics_service
from stdaemon.metrics.service import Metrics
from stdaemon.jobs import costs
from stdaemon.timestamps import iso
from stdaemon.health.service import HEALTHY, UNHEALTHY, overall
from stdaemon.http.errors import ApiError, invalid_field, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, PUBLIC, Response, Surface, route
from stdaemon.http.validation import BodyModel, QueryModel
from stdaemon.logs import get_logger
from stdaemon.jobs import store as jobs_store
from stdaemon.invalid import InvalidValue

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


class PreviewBody(BodyModel):
    categories: Optional[Annotated[list[Annotated[str, Field(max_length=1024)]], Field(max_length=64)]] = None


class PeriodQuery(QueryModel):
    period: Optional[Literal["day", "week", "month"]] = None


def _actor(request: Any) -> str:
    principal = getattr(request, "principal", None)
    return principal.actor if principal is not None else "system"


_PERIODS = {"day": "daily", "week": "weekly", "month": "monthly"}


def _wants_json(request: Any) -> bool:
    accept = (request.getHeader("accept") or "").lower()
    return "application/json" in accept and "text/plain" not in accept and "openmetrics" not in accept


def _bearer(request: Any) -> bytes:
    header = request.getHeader("authorization") or ""
    scheme, _, value = header.strip().partition(" ")
    if scheme.lower() != "bearer":
        return b""
    return value.strip().encode("utf-8", "replace")


class MetricsSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/metrics", "/api/metrics")

    @property
    def metrics(self) -> Metrics:
        return self.ctx.metrics

    # -- scrape ------------------------------------------------------------------------

    @route(app, "/api/cloud/metrics/prometheus", access=PUBLIC,
           produces=("text/plain", "application/openmetrics-text"))
    async def prometheus(self, request):
        """Prometheus exposition of the enabled categories."""
        return await self._scrape(request)

    @route(app, "/api/metrics/prometheus", access=PUBLIC)
    async def prometheus_alias(self, request):
        """SimpleTuner's path for the scrape.  Its CLI (``Accept:
        application/json``) reads ``{"metrics": text}``; Prometheus gets the text."""
        answer = await self._scrape(request)
        if not _wants_json(request):
            return answer
        return {"metrics": answer.body.decode("utf-8"), "content_type": answer.content_type,
                "enabled": True}

    async def _scrape(self, request):
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
        await self.ctx.health_checks.measure_database()

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

    @route(app, "/api/metrics/config", access=OPERATOR)
    async def get_config_alias(self, request):
        """Metrics settings (SimpleTuner's path)."""
        return self._describe()

    @route(app, "/api/metrics/status", access=OPERATOR)
    async def status(self, request):
        """``simpletuner metrics status``: the settings, with the CLI's names."""
        body = self._describe()
        body.update({"enabled": body["prometheus_enabled"], "prometheus_endpoint": body["endpoint"],
                     "collectors": list(body["prometheus_categories"])})
        return body

    @route(app, "/api/metrics/prometheus/info", access=OPERATOR)
    async def prometheus_info(self, request):
        """``simpletuner metrics prometheus``: endpoint, enabled, the families exported."""
        metrics = self.metrics
        text, _ = metrics.render(metrics.categories, None)
        families = [line.split()[2] for line in text.decode("utf-8").splitlines()
                    if line.startswith("# TYPE ") and len(line.split()) >= 4]
        return {"endpoint": "/api/cloud/metrics/prometheus", "enabled": metrics.enabled,
                "categories": list(metrics.categories), "metric_families": families,
                "bearer_token_required": bool(metrics.bearer_token)}

    @route(app, "/api/metrics/health", access=PUBLIC, rate_limited=False)
    async def health(self, request):
        """``simpletuner metrics health``: the health report (the same checks as
        ``/api/cloud/health``) as ``{healthy, status, components: {name: {…}}}``."""
        components = await self.ctx.health.check_all(include_optional=False)
        status = overall(components)
        body = {
            "healthy": status == HEALTHY,
            "status": status,
            "components": {c.name: {"healthy": c.status == HEALTHY, "status": c.status,
                                    "detail": c.message, "latency_ms": c.latency_ms}
                           for c in components},
        }
        return Response(body, status=503 if status == UNHEALTHY else 200)

    async def _period(self, period: Optional[str], default: str) -> tuple[str, float, dict]:
        period = period or default
        now = self.ctx.now()
        since = costs.period_start(now, _PERIODS[period])
        summary = await self.ctx.db.run_read(jobs_store.period_summary, since, now)
        return period, since, summary

    @route(app, "/api/metrics/costs", access=OPERATOR, query=PeriodQuery)
    async def cost_metrics(self, request, query: PeriodQuery):
        """``simpletuner metrics costs --period day|week|month``: job costs of the
        current UTC period (the jobs table; the figures behind the cost limit)."""
        period, since, summary = await self._period(query.period, "month")
        total = round(sum(summary["by_provider"].values()), 6)
        elapsed = max(self.ctx.now() - since, 1.0)
        days_in_month = (costs.period_end(since, "monthly") - costs.period_start(since, "monthly")) / 86400.0
        return {
            "period": period,
            "since": iso(since),
            "summary": {"total_cost": total, "currency": "USD",
                        "estimated_monthly": round(total / elapsed * 86400.0 * days_in_month, 2)
                        if period == "month" else None},
            "by_provider": {k: round(v, 6) for k, v in summary["by_provider"].items()},
            "by_job_type": {"cloud": total},
            "by_hardware_profile": {k: round(v["cost_usd"], 6) for k, v in summary["by_profile"].items()},
            "recent_jobs": [dict(j, created_at=iso(j["created_at"])) for j in summary["recent_jobs"]],
        }

    @route(app, "/api/metrics/usage", access=OPERATOR, query=PeriodQuery)
    async def usage_metrics(self, request, query: PeriodQuery):
        """``simpletuner metrics usage --period …``: GPU hours run and jobs by
        status for jobs created in the current UTC period."""
        period, since, summary = await self._period(query.period, "day")
        by_type: dict[str, float] = {}
        for name, figures in summary["by_profile"].items():
            try:
                gpus = costs.profile(name).gpu_count
                gpu = costs.profile(name).gpu
            except ValueError:
                gpus, gpu = 1, name
            by_type[gpu] = by_type.get(gpu, 0.0) + figures["run_seconds"] * gpus / 3600.0
        by_status = summary["by_status"]
        return {
            "period": period,
            "since": iso(since),
            "gpu": {"total_hours": round(sum(by_type.values()), 4),
                    "by_type": {k: round(v, 4) for k, v in by_type.items()}},
            "jobs": {"submitted": sum(by_status.values()), "completed": by_status.get("completed", 0),
                     "failed": by_status.get("failed", 0), "by_status": by_status},
        }

    @route(app, "/api/cloud/metrics/config", methods=("PUT", "PATCH"), access=ADMIN, body=MetricsUpdate)
    async def put_config(self, request, body: MetricsUpdate):
        """Change the metrics settings."""
        return await self._put_config(request, body)

    @route(app, "/api/metrics/config", methods=("PUT", "PATCH"), access=ADMIN, body=MetricsUpdate)
    async def put_config_alias(self, request, body: MetricsUpdate):
        """Change the metrics settings (SimpleTuner's path)."""
        return await self._put_config(request, body)

    async def _put_config(self, request, body: MetricsUpdate):
        body = body.given()
        if not body:
            raise ApiError(400, "empty_update", "The body names no setting to change "
                           f"(settings: {', '.join(m.SETTING_KEYS)})")
        try:
            changes = m.validate_update(body)
        except InvalidValue as exc:
            raise invalid_field(exc.field, exc.reason) from None
        return await self._save(request, changes, action="update")

    @route(app, "/api/cloud/metrics/config/templates/<name>", methods=("POST",), access=ADMIN)
    async def apply_template(self, request, name):
        """Export a template's categories (and enable the export)."""
        return await self._apply_template(request, name)

    @route(app, "/api/metrics/config/templates/<name>", methods=("POST",), access=ADMIN)
    async def apply_template_alias(self, request, name):
        """Export a template's categories (SimpleTuner's path)."""
        return await self._apply_template(request, name)

    @route(app, "/api/metrics/config/apply-template/<name>", methods=("POST",), access=ADMIN)
    async def apply_template_original(self, request, name):
        """SimpleTuner's own path for applying a template."""
        return await self._apply_template(request, name)

    async def _apply_template(self, request, name):
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
        await metrics_service.save_settings(metrics, self.ctx.db, changes, self.ctx.now())
        after = metrics.settings()
        log.info("Metrics settings changed by {actor}: {fields}", actor=_actor(request),
                 fields=", ".join(sorted(changes)))
        details: dict[str, Any] = {"old": {k: before[k] for k in changes}, "new": {k: after[k] for k in changes}}
        if template is not None:
            details["template"] = template
        await self.ctx.audit.record_soon("metrics.configured", **request_actor(request, anonymous="system"),
                                         target="metrics", action=action, details=details)
        return self._describe()

    # -- preview -----------------------------------------------------------------------

    @route(app, "/api/cloud/metrics/config/preview", access=OPERATOR, query=PreviewQuery)
    async def preview(self, request, query: PreviewQuery):
        """What a scrape would return with these categories."""
        return await self._preview(request, query.categories)

    @route(app, "/api/metrics/config/preview", access=OPERATOR, query=PreviewQuery)
    async def preview_alias(self, request, query: PreviewQuery):
        """The preview (SimpleTuner's path)."""
        return await self._preview(request, query.categories)

    @route(app, "/api/metrics/config/preview", methods=("POST",), access=OPERATOR,
           query=PreviewQuery, body=PreviewBody, body_required=False)
    async def preview_alias_post(self, request, query: PreviewQuery, body: PreviewBody):
        """The preview with the categories in the body, as SimpleTuner's web UI sends them."""
        return await self._preview(request, list(query.categories) + list(body.categories or []))

    async def _preview(self, request, raw: list):
        if raw:
            parts = [part.strip() for value in raw for part in value.split(",") if part.strip()]
            try:
                categories = list(m.normalise_categories(parts, "categories"))
            except InvalidValue as exc:
                raise invalid_field(exc.field, exc.reason) from None
        else:
            categories = self.metrics.categories
        if "health" in categories:
            await self._measure_database()
        rendered, content_type = self.metrics.render(categories, request.getHeader("accept"))
        text = rendered.decode("utf-8")
        return {
            "content": text,
            "metric_count": sum(1 for line in text.splitlines() if line.startswith("simpletuner_")),
            "categories_used": categories,
            "categories": categories,
            "content_type": content_type,
            "metrics": text,
            "enabled": self.metrics.enabled,
        }
