"""Approval rules and requests (S4).

- ``GET /api/approvals/rules`` (operator), ``POST /api/approvals/rules``
  ``{"name", "condition": "cost_exceeds"|"hardware_profile", "value"}`` and
  ``DELETE /api/approvals/rules/{id}`` (admin).
- ``GET /api/approvals?status=&limit=&offset=`` (viewers see their own
  requests, operators and admins every request),
  ``POST /api/approvals/{id}/approve|reject`` ``{"reason"}`` (operator).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.approvals import rules as rules_core
from stdaemon.http.surface import ADMIN, OPERATOR, VIEWER, Response, Surface, path_id, route
from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel, QueryModel
from stdaemon.approvals import store
from stdaemon.approvals.service import BODY, ApprovalService


# -- request models (stdaemon.http.validation) -----------------------------------------------

class CreateRule(BodyModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    condition: Literal[rules_core.CONDITIONS]
    # cost_exceeds: USD; hardware_profile: a profile name or a list of them.
    value: Union[int, float, str, list[str]] = Field(union_mode="left_to_right")


class Decision(BodyModel):
    reason: Optional[str] = Field(None, max_length=1000)


class ListApprovals(QueryModel):
    status: Optional[Literal[store.REQUEST_STATUSES]] = None
    limit: int = Field(100, ge=1, le=500)
    offset: int = Field(0, ge=0, le=SQLITE_MAX_INT)


class ApprovalsSurface(Surface):
    app = Klein()
    prefixes = ("/api/approvals",)

    @property
    def approvals(self) -> ApprovalService:
        return self.ctx.approvals

    @route(app, "/api/approvals/rules", access=OPERATOR)
    async def list_rules(self, request):
        """Every approval rule."""
        rules = await self.ctx.db.run_read(store.list_rules)
        return {"rules": rules, "total": len(rules)}

    @route(app, "/api/approvals/rules", methods=["POST"], access=ADMIN, max_body=BODY, body=CreateRule)
    async def add_rule(self, request, body: CreateRule):
        """Add an approval rule."""
        return Response(await self.approvals.add_rule(body.given(), request), status=201)

    @route(app, "/api/approvals/rules/<rule_id>", methods=["DELETE"], access=ADMIN)
    async def delete_rule(self, request, rule_id):
        """Delete an approval rule."""
        number = path_id(rule_id, "Approval rule")
        await self.approvals.delete_rule(number, rule_id, request)
        return {"success": True, "id": number}

    @route(app, "/api/approvals", access=VIEWER, query=ListApprovals)
    async def list_requests(self, request, query: ListApprovals):
        """Approval requests (viewers: their own)."""
        status, limit, offset = query.status, query.limit, query.offset
        principal = request.principal
        owner = None if principal.role in ("admin", "operator") else principal.user_id
        rows, total = await self.ctx.db.run_read(store.list_requests, status, owner, limit, offset)
        return {"approvals": rows, "total": total, "limit": limit, "offset": offset}

    @route(app, "/api/approvals/<request_id>/approve", methods=["POST"], access=OPERATOR, max_body=BODY,
           body=Decision, body_required=False, path_ids={"request_id": "Approval request"})
    async def approve(self, request, request_id, body: Decision):
        """Approve a held submission (it is submitted to the provider)."""
        return await self._decide(self.approvals.approve, request, request_id, body)

    @route(app, "/api/approvals/<request_id>/reject", methods=["POST"], access=OPERATOR, max_body=BODY,
           body=Decision, body_required=False, path_ids={"request_id": "Approval request"})
    async def reject(self, request, request_id, body: Decision):
        """Reject a held submission (the job is cancelled)."""
        return await self._decide(self.approvals.reject, request, request_id, body)

    @staticmethod
    async def _decide(decide: Any, request: Any, request_id: str, body: Decision) -> dict:
        decided = await decide(path_id(request_id, "Approval request"), request.principal, body.reason,
                               request)
        return {"success": True, "approval": decided}
