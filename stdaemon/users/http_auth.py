"""Login, logout, registration and API keys (S12).

- ``POST /api/auth/login`` (public) ``{"username"|"email", "password"}`` →
  ``st_session`` (HttpOnly, SameSite=Strict, Secure on HTTPS) and ``st_csrf``
  cookies; audited ``auth.login.success`` / ``auth.login.failed``.
  With ``{"api_key": "st_…"}`` instead ("Sign in with API key" in the
  console) the session belongs to the key's user, never exceeds the key's role
  and ends when the key is revoked or expires.
- ``POST /api/auth/setup`` (public) ``{"token", "password"}``: the one-time
  first sign-in link printed in the log on first start (valid 30 minutes,
  single use, stored hashed) sets the first admin's password and signs in;
  ``POST /api/auth/setup/check`` ``{"token"}`` → ``{valid, username}``.
- ``POST /api/auth/logout`` (public: always clears the cookies; ends the
  session when the CSRF token proves the request came from the console).
- ``POST /api/auth/register`` (public) only when ``auth.registration_enabled``
  or the runtime setting ``auth/registration_enabled`` (``PUT
  /api/auth/settings``, admin) allows it; new users are viewers.
- ``POST|GET /api/auth/api-keys``, ``DELETE /api/auth/api-keys/{id}``: own
  keys (admin: every key, and may mint keys for another user); a key's role
  never exceeds the caller's role nor its owner's; the key is shown once.
"""

from __future__ import annotations

from typing import Any, Optional, Union

from klein import Klein
from pydantic import ConfigDict, Field

from stdaemon.audit.service import request_actor
from stdaemon.store import settings as settings_store
from stdaemon.timestamps import iso
from stdaemon.http.errors import ApiError, forbidden, invalid_field, not_found
from stdaemon.http.surface import ADMIN, OPERATOR, PUBLIC, VIEWER, Response, Surface, path_id, route
from stdaemon.http.validation import SQLITE_MAX_INT, BodyModel, QueryModel
from stdaemon.users.sessions import SESSION_COOKIE, cookie
from stdaemon.users import store as users
from stdaemon.invalid import InvalidValue

MAX_KEY_DAYS = 3650
AUTH_BODY = 16 * 1024


# -- request models (stdaemon.http.validation) -----------------------------------------------

class Login(BodyModel):
    username: Optional[str] = Field(None, max_length=320)
    email: Optional[str] = Field(None, max_length=320)
    password: Optional[str] = Field(None, max_length=users.MAX_PASSWORD)
    api_key: Optional[str] = Field(None, max_length=200)  # "Sign in with API key"


class SetupCheck(BodyModel):
    token: str = Field(max_length=200)


class Setup(BodyModel):
    token: str = Field(min_length=1, max_length=200)
    password: Optional[str] = Field(None, max_length=users.MAX_PASSWORD)


class AuthSettings(BodyModel):
    model_config = ConfigDict(extra="forbid")

    registration_enabled: Optional[bool] = None


class Register(BodyModel):
    username: Optional[str] = Field(None, max_length=64)
    email: Optional[str] = Field(None, max_length=320)
    password: Optional[str] = Field(None, max_length=users.MAX_PASSWORD)


class CreateKey(BodyModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"\S")
    role: Optional[str] = Field(None, max_length=32)
    user_id: Optional[int] = Field(None, ge=1, le=SQLITE_MAX_INT)
    expires_days: Optional[Union[int, float]] = Field(None, gt=0, le=MAX_KEY_DAYS)


class RevokeKeyQuery(QueryModel):
    id: Optional[str] = Field(None, max_length=64)


class RevokeKey(BodyModel):
    id: Optional[Union[int, str]] = None


def _field_error(error: InvalidValue) -> ApiError:
    return invalid_field(error.field, str(error))


async def registration_enabled(ctx: Any) -> bool:
    setting = await ctx.db.run_read(settings_store.read_key, "auth", "registration_enabled")
    if setting is not None:
        return bool(setting)
    return bool(ctx.config.auth.registration_enabled)


class AuthSurface(Surface):
    app = Klein()
    prefixes = ("/api/auth",)

    @property
    def sessions(self) -> Any:
        return self.ctx.sessions

    # -- login / logout ----------------------------------------------------------

    @route(app, "/api/auth/login", methods=["POST"], access=PUBLIC, max_body=AUTH_BODY, body=Login)
    async def login(self, request, body: Login):
        """Sign in with a password: sets the session and CSRF cookies."""
        # A login form posted from another site could sign the victim into
        # the attacker's account: the Origin rule applies here too.
        self.sessions.check_origin(request)
        if body.api_key is not None:
            return await self._login_with_key(request, body.api_key)
        login = body.username or body.email
        password = body.password
        if not login:
            raise invalid_field("username", "username or email is required")
        if not password:
            raise invalid_field("password", "password is required")
        row = await self.ctx.db.run_read(users.find_login, login)
        ok = await self.sessions.verify_password(row["password_hash"] if row else None, password)
        if not ok or row is None or row["disabled"]:
            await self.ctx.audit.record_soon("auth.login.failed",
                                             **request_actor(request, login[:64]),
                                             target=login[:64], action="login",
                                             details={"reason": "invalid credentials"},
                                             sampled=True)
            raise ApiError(401, "invalid_credentials", "Invalid username or password")
        session = await self.ctx.db.run_write(
            users.create_session, row["id"], self.ctx.now(), self.sessions.ttl,
            getattr(request, "client_ip", None), request.getHeader("user-agent"))
        self.sessions.set_cookies(request, session)
        await self.ctx.audit.record_soon("auth.login.success",
                                         **request_actor(request, row["username"]),
                                         target=row["username"], action="login",
                                         details={"via": "password"})
        return {"success": True, "user": users.user_dict(row), "expires_at": iso(session.expires_at),
                "csrf_token": session.csrf}

    async def _login_with_key(self, request, key: str):
        if not key.strip():
            raise invalid_field("api_key", "an API key (st_…) is required")
        key = key.strip()
        principal = await self.ctx.db.run_read(users.lookup, key, self.ctx.now())
        if principal is None:
            await self.ctx.audit.record_soon("auth.login.failed", **request_actor(request, key[:7]),
                                             target=key[:7], action="login",
                                             details={"reason": "invalid API key", "via": "api_key"},
                                             sampled=True)
            raise ApiError(401, "invalid_credentials", "Invalid or revoked API key")
        row = await self.ctx.db.run_read(users.get_user, principal.user_id)
        session = await self.ctx.db.run_write(
            users.create_session, principal.user_id, self.ctx.now(), self.sessions.ttl,
            getattr(request, "client_ip", None), request.getHeader("user-agent"), principal.key_id)
        self.sessions.set_cookies(request, session)
        await self.ctx.audit.record_soon("auth.login.success",
                                         **request_actor(request, principal.username),
                                         target=principal.username, action="login",
                                         details={"via": "api_key", "key_id": principal.key_id, "role": principal.role})
        user = dict(row or {})
        user["role"] = principal.role  # the session's ceiling
        return {"success": True, "user": user, "expires_at": iso(session.expires_at),
                "csrf_token": session.csrf}

    # -- first sign-in (one-time setup link) ---------------------------------------

    @route(app, "/api/auth/setup/check", methods=["POST"], access=PUBLIC, max_body=AUTH_BODY, body=SetupCheck)
    async def setup_check(self, request, body: SetupCheck):
        """Whether a first sign-in link is still valid, and for whom."""
        user = await self.ctx.db.run_read(users.setup_token_user, body.token, self.ctx.now())
        return {"valid": user is not None, "username": user["username"] if user is not None else None}

    @route(app, "/api/auth/setup", methods=["POST"], access=PUBLIC, max_body=AUTH_BODY, body=Setup)
    async def setup(self, request, body: Setup):
        """First sign-in: the one-time link's token sets the first admin's password."""
        self.sessions.check_origin(request)
        token = body.token
        try:
            password = users.check_password(body.password)
        except InvalidValue as error:
            raise _field_error(error) from None
        invalid = ApiError(401, "invalid_setup_token",
                           "This setup link is not valid: it was used already or has expired "
                           "(restart the daemon for a new one, or sign in with the API key in admin.key)")
        if await self.ctx.db.run_read(users.setup_token_user, token, self.ctx.now()) is None:
            await self.ctx.audit.record_soon("auth.login.failed", **request_actor(request, "setup"),
                                             target="setup", action="setup",
                                             details={"reason": "invalid setup token"},
                                             sampled=True)
            raise invalid
        password_hash = await self.sessions.hash_password(password)
        row = await self.ctx.db.run_write(users.consume_setup_token, token, password_hash, self.ctx.now())
        if row is None:  # spent or expired meanwhile
            raise invalid
        self.ctx.auth.invalidate()
        session = await self.ctx.db.run_write(
            users.create_session, row["id"], self.ctx.now(), self.sessions.ttl,
            getattr(request, "client_ip", None), request.getHeader("user-agent"))
        self.sessions.set_cookies(request, session)
        await self.ctx.audit.record_soon("auth.setup.completed",
                                         **request_actor(request, row["username"]),
                                         target=row["username"], action="setup",
                                         details={"user_id": row["id"]})
        return {"success": True, "user": users.user_dict(row), "expires_at": iso(session.expires_at),
                "csrf_token": session.csrf}

    @route(app, "/api/auth/logout", methods=["POST"], access=PUBLIC, max_body=AUTH_BODY)
    async def logout(self, request):
        """Sign out: clears the cookies and ends the session."""
        token = cookie(request, SESSION_COOKIE)
        ended = False
        if token:
            info = await self.ctx.db.run_read(users.lookup_session, token, self.ctx.now())
            if info is not None:
                self.sessions.check_csrf(request, info.csrf_hash)
                ended = bool(await self.ctx.db.run_write(users.delete_session, token))
        self.sessions.clear_cookies(request)
        return {"success": True, "session_ended": ended}

    # -- registration ------------------------------------------------------------

    @route(app, "/api/auth/settings", access=PUBLIC)
    async def get_settings(self, request):
        """Whether self-registration is enabled."""
        return {"registration_enabled": await registration_enabled(self.ctx)}

    @route(app, "/api/auth/settings", methods=["PUT"], access=ADMIN, max_body=AUTH_BODY, body=AuthSettings)
    async def put_settings(self, request, body: AuthSettings):
        """Change the runtime authentication settings."""
        if body.registration_enabled is not None:
            value = body.registration_enabled
            await self.ctx.db.run_write(settings_store.write_key, "auth", "registration_enabled", value,
                                        self.ctx.now())
            await self.ctx.audit.record_soon("auth.settings.changed", **request_actor(request),
                                             target="auth", action="update",
                                             details={"registration_enabled": value})
        return {"registration_enabled": await registration_enabled(self.ctx)}

    @route(app, "/api/auth/register", methods=["POST"], access=PUBLIC, max_body=AUTH_BODY, body=Register)
    async def register(self, request, body: Register):
        """Create a viewer account (when registration is enabled)."""
        self.sessions.check_origin(request)
        if not await registration_enabled(self.ctx):
            raise forbidden("Registration is disabled; an admin can enable it")
        try:
            username = users.check_username(body.username)
            email = users.check_email(body.email)
            password = users.check_password(body.password)
        except InvalidValue as error:
            raise _field_error(error) from None
        password_hash = await self.sessions.hash_password(password)
        try:
            user = await self.ctx.db.run_write(users.create_user, username, email, password_hash,
                                               "viewer", self.ctx.now())
        except InvalidValue as error:
            raise ApiError(409, "conflict", f"{error.field} {error}", field=error.field) from None
        await self.ctx.audit.record_soon("user.registered", **request_actor(request, username),
                                         target=username, action="register",
                                         details={"role": "viewer"})
        return Response({"success": True, "user": user}, status=201)

    # -- API keys ----------------------------------------------------------------

    @route(app, "/api/auth/api-keys", methods=["POST"], access=OPERATOR, max_body=AUTH_BODY, body=CreateKey)
    async def create_key(self, request, body: CreateKey):
        """Create an API key (shown once)."""
        principal = request.principal
        name = body.name
        owner_id = principal.user_id
        if body.user_id is not None:
            if principal.role != "admin":
                raise forbidden("Only an admin may create keys for another user")
            owner_id = body.user_id
        owner = await self.ctx.db.run_read(users.get_user, owner_id)
        if owner is None:
            raise invalid_field("user_id", "no such user")
        if owner["disabled"]:
            raise invalid_field("user_id", "the user is disabled")
        role = body.role or (owner["role"] if owner_id != principal.user_id else principal.role)
        try:
            users.check_role(role)
        except InvalidValue as error:
            raise _field_error(error) from None
        if not users.role_at_most(role, principal.role) or not users.role_at_most(role, owner["role"]):
            raise ApiError(403, "role_too_high",
                           f"A key with role {role} exceeds what the caller or its owner may hold",
                           field="role")
        expires_days = body.expires_days
        expires_at = None
        if expires_days is not None:
            expires_at = self.ctx.now() + float(expires_days) * 86400.0
        key_id, key = await self.ctx.db.run_write(users.create_key, owner_id, name.strip(), role,
                                                  self.ctx.now(), expires_at)
        await self.ctx.audit.record_soon("api_key.created", **request_actor(request),
                                         target=f"api_key:{key_id}", action="create",
                                         details={"name": name.strip(), "role": role,
                                                  "owner": owner["username"],
                                                  "expires_at": iso(expires_at)})
        return Response({"id": key_id, "key": key, "name": name.strip(), "role": role,
                         "prefix": key[:7], "user_id": owner_id, "expires_at": iso(expires_at),
                         "note": "Store this key now: it is not shown again."}, status=201)

    @route(app, "/api/auth/api-keys", access=VIEWER)
    async def list_keys(self, request):
        """The caller's API keys (an admin: every key)."""
        principal = request.principal
        owner = None if principal.role == "admin" else principal.user_id
        keys = await self.ctx.db.run_read(users.list_keys, owner)
        return {"keys": keys, "total": len(keys)}

    @route(app, "/api/auth/api-keys", methods=["DELETE"], access=OPERATOR, max_body=AUTH_BODY,
           query=RevokeKeyQuery, body=RevokeKey, body_required=False)
    async def revoke_key_by_query(self, request, query: RevokeKeyQuery, body: RevokeKey):
        """Revoke an API key: ``?id=N`` (or body ``{"id": N}``)."""
        key_id = query.id if query.id is not None else body.id
        if key_id is None:
            raise invalid_field("id", "the id of the key to revoke is required")
        return await self._revoke(request, str(key_id))

    @route(app, "/api/auth/api-keys/<key_id>", methods=["DELETE"], access=OPERATOR)
    async def revoke_key(self, request, key_id):
        """Revoke an API key."""
        return await self._revoke(request, key_id)

    async def _revoke(self, request, key_id: str):
        principal = request.principal
        key_number = path_id(key_id, "API key")
        key = await self.ctx.db.run_read(users.get_key, key_number)
        if key is None or (principal.role != "admin" and key["user_id"] != principal.user_id):
            raise not_found(f"API key {key_id} not found")
        revoked = await self.ctx.db.run_write(users.revoke_key, key_number, self.ctx.now())
        self.ctx.auth.invalidate()
        if revoked:
            await self.ctx.audit.record_soon("api_key.revoked", **request_actor(request),
                                             target=f"api_key:{key_number}", action="revoke",
                                             details={"name": key["name"], "owner": key["username"]})
        return {"success": True, "id": key_number, "already_revoked": not revoked}
