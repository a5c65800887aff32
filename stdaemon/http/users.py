"""Users (S12): ``GET /api/users/me`` for anyone signed in; the rest is admin.

``GET|POST /api/users`` (``{"username", "email", "password", "role"}``),
``PATCH|DELETE /api/users/{id}``.  The last enabled admin cannot be demoted,
disabled or deleted.  Lowering a user's role lowers their keys to match;
disabling a user or changing their password or role ends their sessions.
"""

from __future__ import annotations

from klein import Klein

from stdaemon.http.errors import ApiError, invalid_field, not_found
from stdaemon.http.surface import ADMIN, VIEWER, Response, Surface, json_object, path_id, route
from stdaemon.sessions import record_audit
from stdaemon.store import users

USER_BODY = 16 * 1024
_FIELDS = {"username", "email", "password", "role", "disabled"}


def _user_id(raw: str) -> int:
    return path_id(raw, "User")


def _error(error: users.UserError) -> ApiError:
    if str(error) == "is already taken":
        return ApiError(409, "conflict", f"{error.field} is already taken", field=error.field)
    return invalid_field(error.field, str(error))


class UsersSurface(Surface):
    app = Klein()
    prefixes = ("/api/users",)

    @route(app, "/api/users/me", access=VIEWER, rate_limited=False)
    async def me(self, request):
        principal = request.principal
        user = await self.ctx.db.run_read(users.get_user, principal.user_id)
        if user is None:
            raise not_found("Your user no longer exists")
        # The role in force is the credential's (a key may hold less than its user).
        return dict(user, role=principal.role, user_role=user["role"], via=principal.via,
                    key_id=principal.key_id)

    @route(app, "/api/users", access=ADMIN)
    async def list_users(self, request):
        rows = await self.ctx.db.run_read(users.list_users)
        return {"users": rows, "total": len(rows)}

    @route(app, "/api/users", methods=["POST"], access=ADMIN, max_body=USER_BODY)
    async def create_user(self, request):
        body = json_object(request)
        unknown = set(body) - _FIELDS
        if unknown:
            raise invalid_field(sorted(unknown)[0], "unknown field")
        try:
            username = users.check_username(body.get("username"))
            email = users.check_email(body.get("email"))
            password = users.check_password(body.get("password"))
            role = users.check_role(body.get("role", "viewer"))
        except users.UserError as error:
            raise _error(error) from None
        password_hash = await self.ctx.sessions.hash_password(password)
        try:
            user = await self.ctx.db.run_write(users.create_user, username, email, password_hash,
                                               role, self.ctx.now())
        except users.UserError as error:
            raise _error(error) from None
        await record_audit(self.ctx, "user.created", request, target=f"user:{user['id']}",
                           action="create", details={"username": username, "role": role})
        return Response(user, status=201)

    @route(app, "/api/users/<user_id>", methods=["PATCH"], access=ADMIN, max_body=USER_BODY)
    async def update_user(self, request, user_id):
        uid = _user_id(user_id)
        body = json_object(request)
        unknown = set(body) - _FIELDS
        if unknown:
            raise invalid_field(sorted(unknown)[0], "unknown field")
        changes: dict = {}
        try:
            if "username" in body:
                changes["username"] = users.check_username(body["username"])
            if "email" in body:
                changes["email"] = users.check_email(body["email"])
            if "role" in body:
                changes["role"] = users.check_role(body["role"])
            if "disabled" in body:
                if not isinstance(body["disabled"], bool):
                    raise users.UserError("disabled", "must be true or false")
                changes["disabled"] = int(body["disabled"])
            if "password" in body:
                password = users.check_password(body["password"])
                changes["password_hash"] = await self.ctx.sessions.hash_password(password)
        except users.UserError as error:
            raise _error(error) from None
        try:
            user = await self.ctx.db.run_write(users.update_user, uid, changes)
        except users.UserError as error:
            raise ApiError(409, "conflict", f"{error.field}: {error}", field=error.field) \
                if "last enabled admin" in str(error) else _error(error) from None
        if user is None:
            raise not_found(f"User {user_id} not found")
        self.ctx.auth.invalidate()
        shown = {k: v for k, v in changes.items() if k != "password_hash"}
        if "password_hash" in changes:
            shown["password"] = "changed"
        await record_audit(self.ctx, "user.updated", request, target=f"user:{uid}", action="update",
                           details=shown)
        return user

    @route(app, "/api/users/<user_id>", methods=["DELETE"], access=ADMIN)
    async def delete_user(self, request, user_id):
        uid = _user_id(user_id)
        try:
            deleted = await self.ctx.db.run_write(users.delete_user, uid, self.ctx.now())
        except users.UserError as error:
            raise ApiError(409, "conflict", str(error), field=error.field) from None
        if not deleted:
            raise not_found(f"User {user_id} not found")
        self.ctx.auth.invalidate()
        await record_audit(self.ctx, "user.deleted", request, target=f"user:{uid}", action="delete")
        return {"success": True, "id": uid}
