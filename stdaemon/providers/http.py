"""Provider configuration API (S5).

``GET /api/cloud/providers`` lists providers with their ``configured`` flag;
``GET|PUT /api/cloud/providers/{p}`` and the alias ``…/{p}/config`` (the path
SimpleTuner's CLI uses) show and partially update one provider's settings;
``GET /api/cloud/providers/{p}/versions?model_id=`` lists a Replicate model's
versions, newest first, the one submissions run marked ``current``.

``PUT|DELETE /api/cloud/providers/{p}/token`` (admin; body ``{"token"}``, or
``{"api_token"}`` as SimpleTuner's CLI sends it) writes the provider's API
token into the secrets file (0600, atomic rename, created when absent, other
entries kept) and reloads that store, so the next provider call uses it.  The
token is never returned, logged or audited; ``GET …/token`` says whether one
is configured and which store provides it (env, file, aws, vault). With several
instances on one database (``db.shared``) a PUT/DELETE answers 409: the file is one
instance's own, and the token must live where every instance reads it.
Every answer carries the effective values (``config``) and where each came
from (``sources``: default, file, env or api).  Reading needs an operator,
changing needs an admin.

``GET /api/cloud/replicate/validate`` (``cloud jobs submit --dry-run``) says
whether the API token works (``{valid, user_info: {username}, error}``).

``GET /api/cloud/replicate/status`` is what SimpleTuner's ``cloud status``
asks for Replicate's state: stdaemon answers from its own live API check and
circuit breaker (``operational``; a failing check is listed in
``ongoing_incidents``), not from Replicate's public status page.
"""

from __future__ import annotations

from typing import Annotated, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field, create_model

from stdaemon.audit.service import request_actor
from stdaemon.providers.service import TOKEN_NAMES
from stdaemon.providers.replicate import (
    CircuitOpenError, ProviderAPIError, ProviderNotConfigured, ProviderUnavailable,
)
from stdaemon.jobs import costs
from stdaemon.providers import model_versions as mv
from stdaemon.providers import settings as ps
from stdaemon.providers.errors import PROVIDER_ERRORS, provider_error
from stdaemon.timestamps import iso
from stdaemon.health.service import HEALTHY
from stdaemon.http.errors import ApiError, bad_request, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, VIEWER, Surface, route
from stdaemon.http.validation import BodyModel, QueryModel
from stdaemon.logs import get_logger
from stdaemon.secrets.service import SecretStoreError
from stdaemon.invalid import InvalidValue

log = get_logger("stdaemon.providers")
MAX_TOKEN = 4096

# -- request models (stdaemon.http.validation) -----------------------------------------------
# The model fixes the JSON shape of each setting (sizes included); the meaning of each value
# (CIDRs, URLs, readable CA bundle, ranges) is checked by stdaemon.providers.settings, the
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


class SaveToken(BodyModel):
    """``PUT …/token``: ``{"token"}``, or ``{"api_token"}`` as SimpleTuner's CLI sends it."""

    token: Optional[str] = Field(None, max_length=MAX_TOKEN)
    api_token: Optional[str] = Field(None, max_length=MAX_TOKEN)


def _provider(name: str) -> str:
    if name not in ps.PROVIDERS:
        raise not_found(f"Unknown provider {name!r} (known: {', '.join(ps.PROVIDERS)})")
    return name


def _actor(request) -> str:
    principal = getattr(request, "principal", None)
    return principal.actor if principal is not None else "system"


class ProvidersSurface(Surface):
    app = Klein()
    prefixes = ("/api/cloud/providers", "/api/cloud/replicate")

    @route(app, "/api/cloud/replicate/validate", access=OPERATOR)
    async def replicate_validate(self, request):
        """Does the Replicate API token work?  One account call through the
        provider's client (proxy, CA bundle, breaker, retries)."""
        try:
            account = await self.ctx.providers.replicate.account()
        except ProviderNotConfigured as exc:
            return {"valid": False, "error": str(exc)}
        except ProviderAPIError as exc:
            return {"valid": False, "error": f"Replicate answered {exc.status}: {exc.message}"}
        except (ProviderUnavailable, CircuitOpenError) as exc:
            return {"valid": False, "error": str(exc)}
        return {"valid": True, "error": None,
                "user_info": {"username": account.get("username"), "name": account.get("name"),
                              "type": account.get("type")}}

    @route(app, "/api/cloud/replicate/status", access=VIEWER)
    async def replicate_status(self, request):
        """The health report's ``provider:replicate`` check (live, bounded by the
        client's timeout and breaker) in the shape ``cloud status`` prints."""
        component = await self.ctx.providers.provider_health("replicate")
        operational = component.status == HEALTHY
        incidents = [] if operational else [{"name": "Replicate API check", "status": component.status,
                                             "message": component.message}]
        return {"operational": operational, "status": component.status, "message": component.message,
                "latency_ms": component.latency_ms,
                "circuit_breaker": self.ctx.providers.breaker("replicate").snapshot()["state"],
                "ongoing_incidents": incidents, "in_progress_maintenances": [],
                "scheduled_maintenances": [], "source": "stdaemon API check",
                "checked_at": iso(self.ctx.clock.seconds())}

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
        except InvalidValue as exc:
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
        except PROVIDER_ERRORS as exc:
            raise provider_error(exc, f"Replicate could not list versions of {model_id}", versions=[]) from None
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

    # -- the provider's API token (write-only) -------------------------------------------

    async def _token_status(self, provider: str) -> dict:
        secrets = self.ctx.secrets
        name = TOKEN_NAMES[provider]
        configured = await self.ctx.providers.is_configured(provider)
        source = secrets.source(name)
        return {"provider": provider, "name": name, "configured": configured, "source": source,
                "file_path": secrets.file_target()}

    @route(app, "/api/cloud/providers/<provider>/token", access=OPERATOR)
    async def token_status(self, request, provider):
        return await self._token_status(_provider(provider))

    @route(app, "/api/cloud/providers/<provider>/token", methods=("PUT",), access=ADMIN, body=SaveToken)
    async def put_token(self, request, provider, body: SaveToken):
        provider = _provider(provider)
        token = body.token if body.token is not None else body.api_token
        if not isinstance(token, str) or not token.strip():
            raise ApiError(400, "invalid_field", "token: must be a non-empty string", field="token",
                           success=False)
        token = token.strip()
        if len(token) > MAX_TOKEN or any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in token):
            raise ApiError(400, "invalid_field",
                           f"token: must be at most {MAX_TOKEN} characters without spaces or control "
                           "characters", field="token", success=False)
        return await self._write_token(request, provider, token)

    @route(app, "/api/cloud/providers/<provider>/token", methods=("DELETE",), access=ADMIN)
    async def delete_token(self, request, provider):
        return await self._write_token(request, _provider(provider), None)

    async def _write_token(self, request, provider: str, token):
        secrets = self.ctx.secrets
        name = TOKEN_NAMES[provider]
        if self.ctx.db.shared:
            # The file is this instance's own: the others would go on with the old token, and a
            # round-robin proxy would make every other submission fail. Refuse rather than half-apply.
            raise ApiError(409, "secrets_not_shared",
                           f"Several instances share this database, but the secrets file belongs to this "
                           f"instance alone: set {name} where every instance reads it (the environment, "
                           "AWS Secrets Manager or Vault; README: Running several instances)",
                           success=False)
        try:
            result = await secrets.write_file_secret(name, token)
        except SecretStoreError as exc:
            raise ApiError(409, "secrets_file_error", str(exc), success=False) from None
        except OSError as exc:
            raise ApiError(500, "secrets_file_error",
                           f"Could not write the secrets file: {exc.strerror or type(exc).__name__}",
                           success=False) from None
        self.ctx.providers.token_changed(provider)
        action = "set" if token is not None else "delete"
        actor = _actor(request)
        log.info("{name} {action} in the secrets file {path} by {actor}", name=name,
                 action="saved" if token is not None else "removed", path=result["path"], actor=actor)
        event_type = "provider.token_set" if token is not None else "provider.token_deleted"
        await self.ctx.audit.record_soon(event_type, **request_actor(request, actor), target=provider,
                                         action=action, details={"name": name, "file": result["path"],
                                                                 "changed": result["changed"]})
        status = await self._token_status(provider)
        status.update({"success": True, "changed": result["changed"], "file_path": result["path"]})
        if token is not None and status["source"] not in (None, "file"):
            status["warning"] = (f"{name} is also set in {status['source']}, which takes precedence "
                                 "over the secrets file")
        elif token is None and status["configured"]:
            status["warning"] = f"{name} is still provided by {status['source']}"
        return status
