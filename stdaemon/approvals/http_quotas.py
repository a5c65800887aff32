"""Per-user, per-role and global quotas (S4).

``GET /api/quotas`` (operator), ``POST /api/quotas`` ``{"quota_type":
"concurrent_jobs"|"daily_cost_usd"|"monthly_cost_usd", "limit", "action":
"block"|"warn"|"require_approval", "user_id"? | "role"?}`` and
``DELETE /api/quotas/{id}`` (admin).  ``GET /api/quotas/me`` (and
``/api/quotas/status``, SimpleTuner's name) shows the caller's usage against
the quotas that apply to them; ``GET /api/quotas/types`` lists the types and
actions.  SimpleTuner's CLI sends ``limit_value`` and the type names
``cost_daily``/``cost_monthly``; both are accepted, and a created quota is
answered as itself plus ``quota`` (what the CLI checks).  Enforcement:
``ctx.quotas.check`` at submission.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.approvals import rules as rules_core
from stdaemon.http.surface import ADMIN, OPERATOR, VIEWER, Response, Surface, route, path_id
from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel
from stdaemon.approvals import store
from stdaemon.approvals.service import BODY


# -- request models (stdaemon.http.validation) -----------------------------------------------

class CreateQuota(BodyModel):
    """A quota; SimpleTuner's CLI sends ``limit_value`` for ``limit``, the type names
    ``cost_daily``/``cost_monthly`` and (when given) ``team_id``/``org_id``, which stdaemon
    refuses with a reason (it has no teams or organisations)."""

    model_config = ConfigDict(extra="forbid")

    quota_type: Literal[rules_core.QUOTA_TYPES + tuple(rules_core.QUOTA_TYPE_ALIASES)]
    limit: Optional[Union[int, float]] = Field(None, ge=0, le=1e15)
    limit_value: Optional[Union[int, float]] = Field(None, ge=0, le=1e15)
    action: Literal[rules_core.QUOTA_ACTIONS] = "block"
    user_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)
    role: Optional[Literal[rules_core.ROLES]] = None
    team_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)
    org_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)
    level_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)


class QuotasSurface(Surface):
    app = Klein()
    prefixes = ("/api/quotas",)

    @route(app, "/api/quotas", access=OPERATOR)
    async def list_quotas(self, request):
        """Every quota."""
        rows = await self.ctx.db.run_read(store.list_quotas)
        return {"quotas": rows, "total": len(rows)}

    @route(app, "/api/quotas/me", access=VIEWER)
    async def my_quotas(self, request):
        """The quotas that apply to the caller and their usage."""
        return await self.ctx.quotas.status(request.principal)

    @route(app, "/api/quotas/status", access=VIEWER)
    async def quota_status(self, request):
        """SimpleTuner's ``quota status``: the same answer as ``/api/quotas/me``."""
        return await self.ctx.quotas.status(request.principal)

    @route(app, "/api/quotas/types", access=VIEWER)
    async def quota_types(self, request):
        """SimpleTuner's ``quota types``: the quota types and actions."""
        aliases = {canonical: alias for alias, canonical in rules_core.QUOTA_TYPE_ALIASES.items()}
        types = [{"name": name, "value": name, "description": description, "unit": unit,
                  "alias": aliases.get(name)}
                 for name, (description, unit) in rules_core.QUOTA_TYPE_INFO.items()]
        actions = [{"value": name, "description": description}
                   for name, description in rules_core.QUOTA_ACTION_INFO.items()]
        return {"types": types, "quota_types": types, "actions": actions}

    @route(app, "/api/quotas", methods=["POST"], access=ADMIN, max_body=BODY, body=CreateQuota)
    async def add_quota(self, request, body: CreateQuota):
        """Add a quota (per user, per role or global)."""
        row = await self.ctx.quotas.add(body.given(), request)
        return Response(dict(row, quota=row), status=201)

    @route(app, "/api/quotas/<quota_id>", methods=["DELETE"], access=ADMIN)
    async def delete_quota(self, request, quota_id):
        """Delete a quota."""
        number = path_id(quota_id, "Quota")
        await self.ctx.quotas.delete(number, quota_id, request)
        return {"success": True, "id": number}
