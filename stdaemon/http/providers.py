"""Provider configuration API (S5).

``GET /api/cloud/providers`` lists providers with their ``configured`` flag;
``GET|PUT /api/cloud/providers/{p}`` and the alias ``…/{p}/config`` (the path
SimpleTuner's CLI uses) show and partially update one provider's settings.
Every answer carries the effective values (``config``) and where each came
from (``sources``: default, file, env or api).  Reading needs an operator,
changing needs an admin.
"""

from __future__ import annotations

from klein import Klein

from stdaemon.core import provider_settings as ps
from stdaemon.http.errors import ApiError, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, Surface, json_object, route


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
        manager = self.ctx.providers
        providers = []
        for name in ps.PROVIDERS:
            described = manager.describe(name, await manager.is_configured(name))
            providers.append({"name": name, "provider": name, "configured": described["configured"],
                              "circuit_breaker": described["circuit_breaker"]["state"]})
        return {"providers": providers}

    @route(app, "/api/cloud/providers/<provider>", access=OPERATOR)
    async def get_provider(self, request, provider):
        return await self._describe(provider)

    @route(app, "/api/cloud/providers/<provider>/config", access=OPERATOR)
    async def get_provider_config(self, request, provider):
        return await self._describe(provider)

    async def _describe(self, provider):
        provider = _provider(provider)
        manager = self.ctx.providers
        return manager.describe(provider, await manager.is_configured(provider))

    @route(app, "/api/cloud/providers/<provider>", methods=("PUT", "PATCH"), access=ADMIN)
    async def put_provider(self, request, provider):
        return await self._update(request, provider)

    @route(app, "/api/cloud/providers/<provider>/config", methods=("PUT", "PATCH"), access=ADMIN)
    async def put_provider_config(self, request, provider):
        return await self._update(request, provider)

    async def _update(self, request, provider):
        provider = _provider(provider)
        body = json_object(request)
        if not body:
            raise ApiError(400, "empty_update", "The body names no setting to change")
        try:
            return await self.ctx.providers.update(provider, body, actor=_actor(request),
                                                   ip=getattr(request, "client_ip", None))
        except ps.FieldError as exc:
            raise ApiError(400, exc.code, f"{exc.field}: {exc.reason}", field=exc.field) from None
