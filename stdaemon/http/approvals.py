"""Approval rules and requests (S4).

- ``GET /api/approvals/rules`` (operator), ``POST /api/approvals/rules``
  ``{"name", "condition": "cost_exceeds"|"hardware_profile", "value"}`` and
  ``DELETE /api/approvals/rules/{id}`` (admin).
- ``GET /api/approvals?status=&limit=&offset=`` (viewers see their own
  requests, operators and admins every request),
  ``POST /api/approvals/{id}/approve|reject`` ``{"reason"}`` (operator).
"""

from __future__ import annotations

from klein import Klein

from stdaemon.core import approvals as rules_core
from stdaemon.http.errors import bad_request, invalid_field, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, VIEWER, Response, Surface, json_object, path_id, query_arg, \
    query_int, route
from stdaemon.sessions import record_audit
from stdaemon.store import approvals as store

BODY = 16 * 1024


def _id(raw: str, what: str) -> int:
    return path_id(raw, what)


def _reason(request) -> str | None:
    body = json_object(request, required=False)
    reason = body.get("reason")
    if reason is not None and (not isinstance(reason, str) or len(reason) > 1000):
        raise invalid_field("reason", "must be a string of at most 1000 characters")
    return reason


class ApprovalsSurface(Surface):
    app = Klein()
    prefixes = ("/api/approvals",)

    @route(app, "/api/approvals/rules", access=OPERATOR)
    async def list_rules(self, request):
        rules = await self.ctx.db.run_read(store.list_rules)
        return {"rules": rules, "total": len(rules)}

    @route(app, "/api/approvals/rules", methods=["POST"], access=ADMIN, max_body=BODY)
    async def add_rule(self, request):
        try:
            name, condition, value = rules_core.validate_rule(json_object(request))
        except rules_core.FieldError as error:
            raise invalid_field(error.field, str(error)) from None
        rule = await self.ctx.db.run_write(store.add_rule, name, condition, value, self.ctx.now(),
                                           request.principal.actor)
        await record_audit(self.ctx, "approval.rule_created", request, target=f"approval_rule:{rule['id']}",
                           action="create", details={"name": name, "condition": condition, "value": value})
        return Response(rule, status=201)

    @route(app, "/api/approvals/rules/<rule_id>", methods=["DELETE"], access=ADMIN)
    async def delete_rule(self, request, rule_id):
        number = _id(rule_id, "Approval rule")
        if not await self.ctx.db.run_write(store.delete_rule, number):
            raise not_found(f"Approval rule {rule_id} not found")
        await record_audit(self.ctx, "approval.rule_deleted", request, target=f"approval_rule:{number}",
                           action="delete")
        return {"success": True, "id": number}

    @route(app, "/api/approvals", access=VIEWER)
    async def list_requests(self, request):
        status = query_arg(request, "status")
        if status is not None and status not in store.REQUEST_STATUSES:
            raise bad_request(f"status must be one of {', '.join(store.REQUEST_STATUSES)}",
                              code="invalid_query")
        limit = query_int(request, "limit", 100, minimum=1, maximum=500)
        offset = query_int(request, "offset", 0)
        principal = request.principal
        owner = None if principal.role in ("admin", "operator") else principal.user_id
        rows, total = await self.ctx.db.run_read(store.list_requests, status, owner, limit, offset)
        return {"approvals": rows, "total": total, "limit": limit, "offset": offset}

    @route(app, "/api/approvals/<request_id>/approve", methods=["POST"], access=OPERATOR, max_body=BODY)
    async def approve(self, request, request_id):
        number = _id(request_id, "Approval request")
        reason = _reason(request)
        decided = await self.ctx.approvals.approve(number, request.principal, reason, request)
        return {"success": True, "approval": decided}

    @route(app, "/api/approvals/<request_id>/reject", methods=["POST"], access=OPERATOR, max_body=BODY)
    async def reject(self, request, request_id):
        number = _id(request_id, "Approval request")
        reason = _reason(request)
        decided = await self.ctx.approvals.reject(number, request.principal, reason, request)
        return {"success": True, "approval": decided}
