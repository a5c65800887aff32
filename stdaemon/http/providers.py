"""Provider configuration API (S5).

``GET /api/cloud/providers`` lists providers with their ``configured`` flag;
``GET|PUT /api/cloud/providers/{p}`` and the alias ``…/{p}/config`` (the path
SimpleTuner's CLI uses) show and partially update one provider's settings;
``GET /api/cloud/providers/{p}/versions?model_id=`` lists a Replicate model's
versions, newest first, the one submissions run marked ``current``.
Every answer carries the effective values (``config``) and where each came
from (``sources``: default, file, env or api).  Reading needs an operator,
changing needs an admin.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field, create_model

from stdaemon.clients.replicate import (
    CircuitOpenError,
    ProviderAPIError,
    ProviderNotConfigured,
    ProviderUnavailable,
)
from stdaemon.core import costs
from stdaemon.core import model_versions as mv
from stdaemon.core import provider_settings as ps
from stdaemon.http.errors import ApiError, bad_request, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, Surface, route
from stdaemon.http.validation import BodyModel, QueryModel

# -- request models (stdaemon.http.validation) -----------------------------------------------
# The model fixes the JSON shape of each setting (sizes included); the meaning of each value
# (CIDRs, URLs, readable CA bundle, ranges) is checked by stdaemon.core.provider_settings, the
# same checks the configuration file goes through. ``null`` returns a setting to its lower layers.

Text = Annotated[str, Field(max_length=4096)]
SettingValue = Union[bool, int, float, Text, Annotated[list[Text], Field(max_length=1000)],
                     Annotated[dict[Text, Union[Text, int, float]], Field(max_length=100)]]


class _ProviderUpdateBase(BodyModel):
    model_config = ConfigDict(extra="forbid")


ProviderUpdate = create_model(
    "ProviderUpdate", __base__=_ProviderUpdateBase,
    **{name: (Optional[SettingValue], Field(None, description=spec.help)) for name, spec in ps.FIELDS.items()})


class VersionsQuery(QueryModel):
    hardware_profile: Optional[str] = Field(None, max_length=64)
    model_id: Optional[str] = Field(None, max_length=256)


def _provider(name: str) -> str:
    if name not in ps.PROVIDERS:
        raise not_found(f"Unknown provider {name!r} (known: {', '.join(ps.PROVIDERS)})")
    return name


def _actor(request) -> str:
    principal = getattr(request, "principal", None)
    return principal.actor if principal is not None else "system"


class ProvidersSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/providers",)

    @route(app, "/api/cloud/providers", access=OPERATOR, rate_limited=False)
    async def list_providers(self, request):
        """Providers with their configured flag and circuit-breaker state."""
        manager = self.ctx.providers
        providers = []
        for name in ps.PROVIDERS:
            described = manager.describe(name, await manager.is_configured(name))
            providers.append({"name": name, "provider": name, "configured": described["configured"],
                              "circuit_breaker": described["circuit_breaker"]["state"]})
        return {"providers": providers}

    @route(app, "/api/cloud/providers/<provider>", access=OPERATOR)
    async def get_provider(self, request, provider):
        """A provider's effective settings and where each came from."""
        return await self._describe(provider)

    @route(app, "/api/cloud/providers/<provider>/config", access=OPERATOR)
    async def get_provider_config(self, request, provider):
        """A provider's effective settings (the path SimpleTuner's CLI uses)."""
        return await self._describe(provider)

    async def _describe(self, provider):
        provider = _provider(provider)
        manager = self.ctx.providers
        return manager.describe(provider, await manager.is_configured(provider))

    @route(app, "/api/cloud/providers/<provider>", methods=("PUT", "PATCH"), access=ADMIN, body=ProviderUpdate)
    async def put_provider(self, request, provider, body):
        """Change a provider's settings (partial update)."""
        return await self._update(request, provider, body)

    @route(app, "/api/cloud/providers/<provider>/config", methods=("PUT", "PATCH"), access=ADMIN,
           body=ProviderUpdate)
    async def put_provider_config(self, request, provider, body):
        """Change a provider's settings (the path SimpleTuner's CLI uses)."""
        return await self._update(request, provider, body)

    async def _update(self, request, provider, update):
        provider = _provider(provider)
        body = update.given()
        if not body:
            raise ApiError(400, "empty_update", "The body names no setting to change")
        try:
            return await self.ctx.providers.update(provider, body, actor=_actor(request),
                                                   ip=getattr(request, "client_ip", None))
        except ps.FieldError as exc:
            raise ApiError(400, exc.code, f"{exc.field}: {exc.reason}", field=exc.field) from None

    @route(app, "/api/cloud/providers/<provider>/versions", access=OPERATOR, query=VersionsQuery)
    async def versions(self, request, provider, query: VersionsQuery):
        """A Replicate model's versions, newest first, the one submissions run marked current."""
        provider = _provider(provider)
        manager = self.ctx.providers
        profile = query.hardware_profile or manager.value(provider, "hardware_profile")
        if profile not in costs.HARDWARE_PROFILES:
            raise bad_request(f"hardware_profile must be one of {', '.join(costs.HARDWARE_PROFILES)}",
                              code="invalid_query", field="hardware_profile")
        model_id = (query.model_id or "").strip() or manager.model_id(provider, profile)
        try:
            mv.parse_model_id(model_id)
        except ValueError as exc:
            raise bad_request(f"model_id {exc}", code="invalid_query", field="model_id") from None
        try:
            listed = await manager.list_model_versions(provider, model_id)
        except ProviderAPIError as exc:
            raise ApiError(502, "provider_error",
                           f"Replicate could not list versions of {model_id} ({exc.status}): {exc.message}",
                           versions=[]) from None
        except ProviderUnavailable as exc:
            raise ApiError(502, "provider_unavailable", f"Replicate could not be reached: {exc}",
                           versions=[]) from None
        except CircuitOpenError as exc:
            retry = max(1, int(exc.retry_after + 0.999))
            raise ApiError(503, "circuit_open", str(exc), headers={"Retry-After": str(retry)},
                           versions=[]) from None
        except ProviderNotConfigured as exc:
            raise ApiError(400, "provider_not_configured", str(exc), versions=[]) from None
        configured = manager.model_version(provider, profile)
        if configured and ":" in configured and configured.split(":", 1)[0] != model_id:
            current = None  # the override runs another model
        else:
            current = configured or (listed[0].full_version if listed else None)
        return {
            "provider": provider,
            "model_id": model_id,
            "hardware_profile": profile,
            "versions": [v.public(current) for v in listed],
            "current_version": current,
            "version_source": "config" if configured else "replicate",
            "error": None,
        }
