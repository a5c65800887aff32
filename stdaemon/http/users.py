"""Users (S12): ``GET /api/users/me`` for anyone signed in; the rest is admin.

``GET|POST /api/users`` (``{"username", "email", "password", "role"}``),
``GET|PATCH|DELETE /api/users/{id}``.  The last enabled admin cannot be
demoted, disabled or deleted.  Lowering a user's role lowers their keys to
match; disabling a user or changing their password or role ends their sessions.

SimpleTuner's CLI (``simpletuner auth users …``) speaks of ``is_admin``,
``is_active``, ``display_name`` and ``level_names`` instead of roles; they
are accepted and mapped onto the three roles (``is_admin: true`` → admin,
``level_names`` → the highest role named, ``is_active`` → not disabled), and
``POST /api/users/{id}/activate|deactivate`` and
``GET /api/users/meta/auth-status`` answer as the CLI expects.  A user created
without a password (the CLI makes it optional) signs in only with API keys
until an admin sets one.
"""

from __future__ import annotations

from klein import Klein

from stdaemon.http.errors import ApiError, forbidden, invalid_field, not_found
from stdaemon.http.surface import ADMIN, VIEWER, Response, Surface, json_object, path_id, query_int, route
from stdaemon.sessions import record_audit
from stdaemon.store import users

USER_BODY = 16 * 1024
_FIELDS = {"username", "email", "password", "role", "disabled",
           # the names SimpleTuner's CLI sends
           "is_admin", "is_active", "display_name", "level_names"}
MAX_DISPLAY_NAME = 200


def _display_name(value):
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_DISPLAY_NAME:
        raise users.UserError("display_name", f"must be a string of at most {MAX_DISPLAY_NAME} characters")
    return value.strip() or None


def _role_from_cli(body: dict, current: str | None = None) -> str | None:
    """The role the CLI's ``is_admin``/``level_names`` ask for (None: no change).
    ``role`` wins when it is given and agrees; a contradiction is a 400."""
    wanted = None
    levels = body.get("level_names")
    if levels is not None:
        if not isinstance(levels, list) or not all(isinstance(n, str) for n in levels):
            raise users.UserError("level_names", "must be a list of role names")
        named = [n.strip().lower() for n in levels if n.strip()]
        unknown = [n for n in named if n not in users.ROLES]
        if unknown:
            raise users.UserError("level_names", f"unknown level {unknown[0]!r}; stdaemon's levels are its "
                                                 f"roles: {', '.join(users.ROLES)}")
        if named:
            wanted = max(named, key=lambda n: users.ROLE_RANK[n])
    if "is_admin" in body:
        flag = body["is_admin"]
        if not isinstance(flag, bool):
            raise users.UserError("is_admin", "must be true or false")
        if flag:
            wanted = "admin"
        elif wanted is None:
            # Not an admin: a lower role stays as it is; an admin becomes an operator.
            if current == "admin":
                wanted = "operator"
        elif wanted == "admin":
            raise users.UserError("is_admin", "contradicts level_names")
    if wanted is not None and body.get("role") is not None and body["role"] != wanted:
        raise users.UserError("role", f"contradicts is_admin/level_names ({wanted})")
    return wanted


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

    @route(app, "/api/users/meta/auth-status", access=VIEWER)
    async def auth_status(self, request):
        """What ``simpletuner auth status`` asks: authentication is always on."""
        rows = await self.ctx.db.run_read(users.list_users)
        return {"in_use": True, "user_count": len(rows), "has_external_providers": False}

    @route(app, "/api/users", access=ADMIN)
    async def list_users(self, request):
        limit = query_int(request, "limit", 1000, minimum=1, maximum=10000)
        offset = query_int(request, "offset", 0, minimum=0, maximum=2**62)
        rows = await self.ctx.db.run_read(users.list_users)
        return {"users": rows[offset:offset + limit], "total": len(rows), "limit": limit,
                "offset": offset}

    @route(app, "/api/users/<user_id>", access=VIEWER)
    async def get_user(self, request, user_id):
        """An admin reads anyone; others only themselves."""
        uid = _user_id(user_id)
        principal = request.principal
        if principal.role != "admin" and principal.user_id != uid:
            raise forbidden("Only an admin may read other users")
        user = await self.ctx.db.run_read(users.get_user, uid)
        if user is None:
            raise not_found(f"User {user_id} not found")
        return user

    @route(app, "/api/users", methods=["POST"], access=ADMIN, max_body=USER_BODY)
    async def create_user(self, request):
        body = json_object(request)
        unknown = set(body) - _FIELDS
        if unknown:
            raise invalid_field(sorted(unknown)[0], "unknown field")
        try:
            username = users.check_username(body.get("username"))
            email = users.check_email(body.get("email"))
            password = body.get("password")
            if password is not None:
                password = users.check_password(password)
            role = _role_from_cli(body) or users.check_role(body.get("role", "viewer"))
            display_name = _display_name(body.get("display_name"))
            disabled = False
            if "is_active" in body:
                if not isinstance(body["is_active"], bool):
                    raise users.UserError("is_active", "must be true or false")
                disabled = not body["is_active"]
        except users.UserError as error:
            raise _error(error) from None
        password_hash = await self.ctx.sessions.hash_password(password) if password is not None else None
        try:
            user = await self.ctx.db.run_write(users.create_user, username, email, password_hash,
                                               role, self.ctx.now(), display_name)
            if disabled:
                user = await self.ctx.db.run_write(users.update_user, user["id"], {"disabled": 1})
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
        current = await self.ctx.db.run_read(users.get_user, uid)
        if current is None:
            raise not_found(f"User {user_id} not found")
        changes: dict = {}
        try:
            if "username" in body:
                changes["username"] = users.check_username(body["username"])
            if "email" in body:
                changes["email"] = users.check_email(body["email"])
            if "role" in body:
                changes["role"] = users.check_role(body["role"])
            wanted = _role_from_cli(body, current["role"])
            if wanted is not None:
                changes["role"] = wanted
            if "disabled" in body:
                if not isinstance(body["disabled"], bool):
                    raise users.UserError("disabled", "must be true or false")
                changes["disabled"] = int(body["disabled"])
            if "is_active" in body:
                if not isinstance(body["is_active"], bool):
                    raise users.UserError("is_active", "must be true or false")
                if "disabled" in changes and changes["disabled"] == int(body["is_active"]):
                    raise users.UserError("is_active", "contradicts disabled")
                changes["disabled"] = int(not body["is_active"])
            if "display_name" in body:
                changes["display_name"] = _display_name(body["display_name"])
            if "password" in body:
                password = users.check_password(body["password"])
                changes["password_hash"] = await self.ctx.sessions.hash_password(password)
        except users.UserError as error:
            raise _error(error) from None
        return await self._apply(request, uid, user_id, changes)

    async def _apply(self, request, uid: int, raw_id: str, changes: dict) -> dict:
        try:
            user = await self.ctx.db.run_write(users.update_user, uid, changes)
        except users.UserError as error:
            raise ApiError(409, "conflict", f"{error.field}: {error}", field=error.field) \
                if "last enabled admin" in str(error) else _error(error) from None
        if user is None:
            raise not_found(f"User {raw_id} not found")
        self.ctx.auth.invalidate()
        shown = {k: v for k, v in changes.items() if k != "password_hash"}
        if "password_hash" in changes:
            shown["password"] = "changed"
        await record_audit(self.ctx, "user.updated", request, target=f"user:{uid}", action="update",
                           details=shown)
        return user

    @route(app, "/api/users/<user_id>/activate", methods=["POST"], access=ADMIN, max_body=USER_BODY)
    async def activate(self, request, user_id):
        user = await self._apply(request, _user_id(user_id), user_id, {"disabled": 0})
        return {"success": True, "user": user}

    @route(app, "/api/users/<user_id>/deactivate", methods=["POST"], access=ADMIN, max_body=USER_BODY)
    async def deactivate(self, request, user_id):
        user = await self._apply(request, _user_id(user_id), user_id, {"disabled": 1})
        return {"success": True, "user": user}

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
