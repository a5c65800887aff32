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
from stdaemon.http.errors import invalid_field, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, VIEWER, Response, Surface, path_id, route
from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel, QueryModel
from stdaemon.users.sessions import record_audit
from stdaemon.approvals import store
from stdaemon.invalid import InvalidValue

BODY = 16 * 1024


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


def _id(raw: str, what: str) -> int:
    return path_id(raw, what)


class ApprovalsSurface(Surface):
    app = Klein()
    prefixes = ("/api/approvals",)

    @route(app, "/api/approvals/rules", access=OPERATOR)
    async def list_rules(self, request):
        """Every approval rule."""
        rules = await self.ctx.db.run_read(store.list_rules)
        return {"rules": rules, "total": len(rules)}

    @route(app, "/api/approvals/rules", methods=["POST"], access=ADMIN, max_body=BODY, body=CreateRule)
    async def add_rule(self, request, body: CreateRule):
        """Add an approval rule."""
        try:
            name, condition, value = rules_core.validate_rule(body.given())
        except InvalidValue as error:
            raise invalid_field(error.field, str(error)) from None
        rule = await self.ctx.db.run_write(store.add_rule, name, condition, value, self.ctx.now(),
                                           request.principal.actor)
        await record_audit(self.ctx, "approval.rule_created", request, target=f"approval_rule:{rule['id']}",
                           action="create", details={"name": name, "condition": condition, "value": value})
        return Response(rule, status=201)

    @route(app, "/api/approvals/rules/<rule_id>", methods=["DELETE"], access=ADMIN)
    async def delete_rule(self, request, rule_id):
        """Delete an approval rule."""
        number = _id(rule_id, "Approval rule")
        if not await self.ctx.db.run_write(store.delete_rule, number):
            raise not_found(f"Approval rule {rule_id} not found")
        await record_audit(self.ctx, "approval.rule_deleted", request, target=f"approval_rule:{number}",
                           action="delete")
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
        number = _id(request_id, "Approval request")
        decided = await self.ctx.approvals.approve(number, request.principal, body.reason, request)
        return {"success": True, "approval": decided}

    @route(app, "/api/approvals/<request_id>/reject", methods=["POST"], access=OPERATOR, max_body=BODY,
           body=Decision, body_required=False, path_ids={"request_id": "Approval request"})
    async def reject(self, request, request_id, body: Decision):
        """Reject a held submission (the job is cancelled)."""
        number = _id(request_id, "Approval request")
        decided = await self.ctx.approvals.reject(number, request.principal, body.reason, request)
        return {"success": True, "approval": decided}
