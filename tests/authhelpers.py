"""Helpers for tests of users, sessions and permissions (real daemon, treq)."""

from __future__ import annotations

import json
from http.cookies import SimpleCookie
from typing import Optional

import treq


async def call(daemon, method: str, path: str, body=None, headers: Optional[dict] = None,
               key: Optional[str] = None, session: "Session | None" = None):
    """``(response, parsed body or raw bytes)``."""
    headers = dict(headers or {})
    if key is not None:
        headers["X-API-Key"] = key
    cookies = None
    if session is not None:
        cookies = session.cookies
        if method.upper() not in ("GET", "HEAD"):
            headers.setdefault("X-CSRF-Token", session.csrf)
            headers.setdefault("Origin", daemon.url)
    data = None
    if isinstance(body, bytes):
        data = body
    elif body is not None:
        data = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    response = await treq.request(method, daemon.url + path, data=data, headers=headers,
                                  cookies=cookies)
    raw = await response.content()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return response, parsed


class Session:
    def __init__(self, cookies: dict, set_cookie_headers: list[str], body: dict):
        self.cookies = cookies
        self.set_cookie_headers = set_cookie_headers
        self.body = body

    @property
    def csrf(self) -> str:
        return self.cookies["st_csrf"]


async def login(daemon, username: str, password: str, expect: int = 200) -> Session:
    response, body = await call(daemon, "POST", "/api/auth/login",
                                {"username": username, "password": password},
                                headers={"Origin": daemon.url})
    assert response.code == expect, body
    headers = response.headers.getRawHeaders("set-cookie") or []
    cookies = {}
    for header in headers:
        jar = SimpleCookie()
        jar.load(header)
        for name, morsel in jar.items():
            cookies[name] = morsel.value
    return Session(cookies, headers, body)


async def create_user(daemon, username: str, role: str, password: str = "correct horse battery"):
    response, body = await call(daemon, "POST", "/api/users",
                                {"username": username, "email": f"{username}@example.test",
                                 "password": password, "role": role}, key=daemon.admin_key)
    assert response.code == 201, body
    return body


async def user_key(daemon, user_id: int, role: str) -> str:
    response, body = await call(daemon, "POST", "/api/auth/api-keys",
                                {"name": f"key for {user_id}", "role": role, "user_id": user_id},
                                key=daemon.admin_key)
    assert response.code == 201, body
    return body["key"]
