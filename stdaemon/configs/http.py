"""Named training configurations (S18): ``/api/configs`` over ``app.configs``
(:class:`stdaemon.configs.service.ConfigService`, the ``<state>/configs/<name>/`` directories),
so ``simpletuner cloud submit <name>`` -- which sends
``{"config_name_to_load": name}`` -- and its ``--dry-run`` (``GET
/api/configs/{name}``) work unmodified.

* ``GET /api/configs`` → ``{configs: [{name, updated_at, has_dataloader}], total}``
* ``GET /api/configs/{name}`` → ``{name, config, dataloader_config, updated_at}``
* ``PUT /api/configs/{name}`` body ``{"config": {...}, "dataloader_config": [...]}``
  → the stored config (201 when new); audited ``config.saved``
* ``DELETE /api/configs/{name}`` → ``{success, name}``; audited ``config.deleted``

Operators and admins (the roles that submit jobs) read and write them.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.audit.service import request_actor
from stdaemon.timestamps import iso
from stdaemon.http.errors import ApiError, not_found
from stdaemon.http.surface import OPERATOR, Response, Surface, route
from stdaemon.http.validation import BodyModel
from stdaemon.configs import store
from stdaemon.configs.service import ConfigService


# -- request models ---------------------------------------------------------------------------

class SaveConfig(BodyModel):
    """``PUT /api/configs/{name}``: the training config and its dataloader config."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any]
    dataloader_config: Union[list[Any], dict[str, Any]] = Field(default_factory=list)
    name: Optional[str] = Field(None, max_length=128)  # tolerated (the path names the config)


def _invalid_name(exc: ValueError) -> ApiError:
    return ApiError(400, "invalid_field", f"name: {exc}", field="name", success=False)


def public(entry: dict) -> dict:
    out = dict(entry)
    out["updated_at"] = iso(entry.get("updated_at"))
    return out


class ConfigsSurface(Surface):
    app = Klein()
    prefixes = ("/api/configs",)

    @property
    def configs(self) -> ConfigService:
        return self.ctx.configs

    @route(app, "/api/configs", access=OPERATOR)
    async def list_configs(self, request):
        entries = await self.configs.list()
        return {"configs": [public(e) for e in entries], "total": len(entries)}

    @route(app, "/api/configs/<name>", access=OPERATOR)
    async def get_config(self, request, name):
        try:
            entry = await self.configs.get(name)
        except ValueError as exc:
            raise _invalid_name(exc) from None
        except store.ConfigError as exc:
            raise ApiError(409, "config_unreadable", str(exc)) from None
        if entry is None:
            raise ApiError(404, "not_found", f"Config {name[:128]} not found", success=False)
        return public(entry)

    @route(app, "/api/configs/<name>", methods=("PUT",), access=OPERATOR, body=SaveConfig)
    async def put_config(self, request, name, body: SaveConfig):
        try:
            store.check_name(name)
        except ValueError as exc:
            raise _invalid_name(exc) from None
        config, dataloader = body.config, body.dataloader_config
        for field, value in (("config", config), ("dataloader_config", dataloader)):
            try:
                store.encode(value)
            except ValueError:
                raise ApiError(400, "invalid_field", f"{field}: must be plain JSON (no NaN or "
                               "Infinity, valid Unicode)", field=field) from None
        try:
            created = await self.configs.put(name, config, dataloader)
        except store.ConfigError as exc:
            raise ApiError(409, "config_unwritable", str(exc)) from None
        await self.ctx.audit.record_soon("config.saved", **request_actor(request, anonymous="system"),
                                         target=name, action="create" if created else "update",
                                         details={"name": name})
        entry = await self.configs.get(name)
        return Response(public(entry), status=201 if created else 200)

    @route(app, "/api/configs/<name>", methods=("DELETE",), access=OPERATOR)
    async def delete_config(self, request, name):
        try:
            deleted = await self.configs.delete(name)
        except ValueError as exc:
            raise _invalid_name(exc) from None
        if not deleted:
            raise ApiError(404, "not_found", f"Config {name[:128]} not found", success=False)
        await self.ctx.audit.record_soon("config.deleted", **request_actor(request, anonymous="system"),
                                         target=name, action="delete", details={"name": name})
        return {"success": True, "name": name}
