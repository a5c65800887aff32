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

from typing import Annotated, Optional

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.http.errors import ApiError, forbidden, invalid_field, not_found
from stdaemon.http.surface import ADMIN, PUBLIC, VIEWER, Response, Surface, path_id, route
from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel, QueryModel
from stdaemon.audit.service import request_actor
from stdaemon.users import store as users
from stdaemon.invalid import InvalidValue

USER_BODY = 16 * 1024
MAX_DISPLAY_NAME = 200


# -- request models (stdaemon.http.validation) -----------------------------------------------

class UserFields(BodyModel):
    """A user's fields; ``is_admin``, ``is_active``, ``display_name`` and ``level_names`` are the
    names SimpleTuner's CLI sends."""

    model_config = ConfigDict(extra="forbid")

    username: Optional[str] = Field(None, max_length=64)
    email: Optional[str] = Field(None, max_length=320)
    password: Optional[str] = Field(None, max_length=users.MAX_PASSWORD)
    role: Optional[str] = Field(None, max_length=32)
    disabled: Optional[bool] = None
    is_admin: Optional[bool] = None
    is_active: Optional[bool] = None
    display_name: Optional[str] = Field(None, max_length=MAX_DISPLAY_NAME)
    level_names: Optional[Annotated[list[Annotated[str, Field(max_length=32)]], Field(max_length=16)]] = None


class FirstAdmin(BodyModel):
    """SimpleTuner's ``auth setup`` body (refused: stdaemon has its first admin from the start)."""

    email: Optional[str] = Field(None, max_length=320)
    username: Optional[str] = Field(None, max_length=64)
    password: Optional[str] = Field(None, max_length=users.MAX_PASSWORD)
    display_name: Optional[str] = Field(None, max_length=MAX_DISPLAY_NAME)


# SimpleTuner's CLI speaks of levels; stdaemon's levels are its three roles.
LEVELS = (
    ("viewer", "Reads jobs, health and its own API keys"),
    ("operator", "Submits, cancels and retries jobs, decides approvals, reads configuration, audit and quotas"),
    ("admin", "Everything: users, keys, providers, quotas, approval rules, metrics, backups"),
)
FIRST_ADMIN = ("stdaemon creates its first admin (user 'admin') when it first starts: open the one-time "
               "setup link printed in its log, or use the API key in <state>/config/cloud/admin.key "
               "(SIMPLETUNER_API_KEY); then add users with 'simpletuner auth users create'.")


class ListUsers(QueryModel):
    # As SimpleTuner's ``auth users list``: disabled users only with ``--include-inactive``.
    include_inactive: bool = False
    limit: int = Field(1000, ge=1, le=10000)
    offset: int = Field(0, ge=0, le=SQLITE_MAX_INT)


def _display_name(value: Optional[str]) -> Optional[str]:
    if value is None:
        return None
    return value.strip() or None


def _role_from_cli(body: dict, current: str | None = None) -> str | None:
    """The role the CLI's ``is_admin``/``level_names`` ask for (None: no change).
    ``role`` wins when it is given and agrees; a contradiction is a 400."""
    wanted = None
    levels = body.get("level_names")
    if levels is not None:
        named = [n.strip().lower() for n in levels if n.strip()]
        unknown = [n for n in named if n not in users.ROLES]
        if unknown:
            raise InvalidValue("level_names", f"unknown level {unknown[0]!r}; stdaemon's levels are its "
                                                 f"roles: {', '.join(users.ROLES)}", show_path=False)
        if named:
            wanted = max(named, key=lambda n: users.ROLE_RANK[n])
    if body.get("is_admin") is not None:
        flag = body["is_admin"]
        if flag:
            wanted = "admin"
        elif wanted is None:
            # Not an admin: a lower role stays as it is; an admin becomes an operator.
            if current == "admin":
                wanted = "operator"
        elif wanted == "admin":
            raise InvalidValue("is_admin", "contradicts level_names", show_path=False)
    if wanted is not None and body.get("role") is not None and body["role"] != wanted:
        raise InvalidValue("role", f"contradicts is_admin/level_names ({wanted})", show_path=False)
    return wanted


def _user_id(raw: str) -> int:
    return path_id(raw, "User")


def _error(error: InvalidValue) -> ApiError:
    if str(error) == "is already taken":
        return ApiError(409, "conflict", f"{error.field} is already taken", field=error.field)
    return invalid_field(error.field, str(error))


class UsersSurface(Surface):
    app = Klein()
    prefixes = ("/api/users", "/api/auth/setup")

    @route(app, "/api/users/me", access=VIEWER, rate_limited=False)
    async def me(self, request):
        """The caller's own user and the role in force."""
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

    @route(app, "/api/users/meta/levels", access=VIEWER)
    async def levels(self, request):
        """SimpleTuner's ``auth users levels list``: the roles, as levels."""
        return {"levels": [{"id": rank + 1, "name": name, "description": description, "priority": rank,
                            "is_system": True, "permissions": [description]}
                           for rank, (name, description) in enumerate(LEVELS)]}

    @route(app, "/api/auth/setup/status", access=VIEWER)
    async def setup_status(self, request):
        """SimpleTuner's ``auth setup`` first asks this: setup is never needed."""
        rows = await self.ctx.db.run_read(users.list_users)
        return {"needs_setup": False, "user_count": len(rows), "detail": FIRST_ADMIN}

    @route(app, "/api/auth/setup/first-admin", methods=["POST"], access=PUBLIC, max_body=USER_BODY,
           body=FirstAdmin, body_required=False)
    async def first_admin(self, request, body: FirstAdmin):
        """Refused with the way to the first admin (no account is created without a credential)."""
        raise ApiError(409, "setup_not_needed", FIRST_ADMIN, success=False)

    @route(app, "/api/users", access=ADMIN, query=ListUsers)
    async def list_users(self, request, query: ListUsers):
        """Users (paged); disabled ones only with ``include_inactive=true``."""
        limit, offset = query.limit, query.offset
        rows = await self.ctx.db.run_read(users.list_users)
        if not query.include_inactive:
            rows = [row for row in rows if not row["disabled"]]
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

    @route(app, "/api/users", methods=["POST"], access=ADMIN, max_body=USER_BODY, body=UserFields)
    async def create_user(self, request, body: UserFields):
        """Create a user."""
        fields = body.given()
        try:
            username = users.check_username(body.username)
            email = users.check_email(body.email)
            password = body.password
            if password is not None:
                password = users.check_password(password)
            role = _role_from_cli(fields) or users.check_role(body.role or "viewer")
            display_name = _display_name(body.display_name)
            disabled = False
            if body.is_active is not None:
                disabled = not body.is_active
        except InvalidValue as error:
            raise _error(error) from None
        password_hash = await self.ctx.sessions.hash_password(password) if password is not None else None
        try:
            user = await self.ctx.db.run_write(users.create_user, username, email, password_hash,
                                               role, self.ctx.now(), display_name)
            if disabled:
                user = await self.ctx.db.run_write(users.update_user, user["id"], {"disabled": 1})
        except InvalidValue as error:
            raise _error(error) from None
        await self.ctx.audit.record_soon("user.created", **request_actor(request),
                                         target=f"user:{user['id']}", action="create",
                                         details={"username": username, "role": role})
        return Response(user, status=201)

    @route(app, "/api/users/<user_id>", methods=["PATCH"], access=ADMIN, max_body=USER_BODY, body=UserFields,
           path_ids={"user_id": "User"})
    async def update_user(self, request, user_id, body: UserFields):
        """Change a user (partial update)."""
        uid = _user_id(user_id)
        given = body.given()
        current = await self.ctx.db.run_read(users.get_user, uid)
        if current is None:
            raise not_found(f"User {user_id} not found")
        changes: dict = {}
        try:
            if "username" in given:
                changes["username"] = users.check_username(body.username)
            if "email" in given:
                changes["email"] = users.check_email(body.email)
            if "role" in given:
                changes["role"] = users.check_role(body.role)
            wanted = _role_from_cli(given, current["role"])
            if wanted is not None:
                changes["role"] = wanted
            if "disabled" in given:
                if body.disabled is None:
                    raise InvalidValue("disabled", "must be true or false", show_path=False)
                changes["disabled"] = int(body.disabled)
            if "is_active" in given:
                if body.is_active is None:
                    raise InvalidValue("is_active", "must be true or false", show_path=False)
                if "disabled" in changes and changes["disabled"] == int(body.is_active):
                    raise InvalidValue("is_active", "contradicts disabled", show_path=False)
                changes["disabled"] = int(not body.is_active)
            if "display_name" in given:
                changes["display_name"] = _display_name(body.display_name)
            if "password" in given:
                password = users.check_password(body.password)
                changes["password_hash"] = await self.ctx.sessions.hash_password(password)
        except InvalidValue as error:
            raise _error(error) from None
        return await self._apply(request, uid, user_id, changes)

    async def _apply(self, request, uid: int, raw_id: str, changes: dict) -> dict:
        try:
            user = await self.ctx.db.run_write(users.update_user, uid, changes)
        except InvalidValue as error:
            raise ApiError(409, "conflict", f"{error.field}: {error}", field=error.field) \
                if "last enabled admin" in str(error) else _error(error) from None
        if user is None:
            raise not_found(f"User {raw_id} not found")
        self.ctx.auth.invalidate()
        shown = {k: v for k, v in changes.items() if k != "password_hash"}
        if "password_hash" in changes:
            shown["password"] = "changed"
        await self.ctx.audit.record_soon("user.updated", **request_actor(request),
                                         target=f"user:{uid}", action="update", details=shown)
        return user

    @route(app, "/api/users/<user_id>/activate", methods=["POST"], access=ADMIN, max_body=USER_BODY)
    async def activate(self, request, user_id):
        """Enable a user."""
        user = await self._apply(request, _user_id(user_id), user_id, {"disabled": 0})
        return {"success": True, "user": user}

    @route(app, "/api/users/<user_id>/deactivate", methods=["POST"], access=ADMIN, max_body=USER_BODY)
    async def deactivate(self, request, user_id):
        """Disable a user (ends their sessions)."""
        user = await self._apply(request, _user_id(user_id), user_id, {"disabled": 1})
        return {"success": True, "user": user}

    @route(app, "/api/users/<user_id>", methods=["DELETE"], access=ADMIN)
    async def delete_user(self, request, user_id):
        """Delete a user."""
        uid = _user_id(user_id)
        try:
            deleted = await self.ctx.db.run_write(users.delete_user, uid, self.ctx.now())
        except InvalidValue as error:
            raise ApiError(409, "conflict", str(error), field=error.field) from None
        if not deleted:
            raise not_found(f"User {user_id} not found")
        self.ctx.auth.invalidate()
        await self.ctx.audit.record_soon("user.deleted", **request_actor(request),
                                         target=f"user:{uid}", action="delete", details={})
        return {"success": True, "id": uid}
