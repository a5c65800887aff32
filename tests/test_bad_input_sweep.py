"""Numeric path ids that cannot exist (too large for SQLite, negative, not a
number) are 404s, never 5xx — on every route that takes one."""

from __future__ import annotations

import json

import pytest_twisted
import treq

ID_ROUTES = [
    ("DELETE", "/api/auth/api-keys/{}"),
    ("DELETE", "/api/users/{}"),
    ("PATCH", "/api/users/{}"),
    ("DELETE", "/api/quotas/{}"),
    ("DELETE", "/api/approvals/rules/{}"),
    ("POST", "/api/approvals/{}/approve"),
    ("POST", "/api/approvals/{}/reject"),
]
BAD_IDS = ["99999999999999999999", "-1", "0", "abc", "9" * 400]


@pytest_twisted.ensureDeferred
async def test_impossible_ids_are_not_found(daemon):
    for method, template in ID_ROUTES:
        for bad in BAD_IDS:
            response = await treq.request(method, daemon.url + template.format(bad),
                                          headers=daemon.admin_headers, data=b'{"reason": "x"}')
            body = await response.content()
            assert response.code == 404, (method, template, bad, response.code, body[:200])
            assert json.loads(body)["error"] == "not_found"
    response = await treq.get(daemon.url + "/api/cloud/health/ready")
    assert response.code == 200
    await response.content()
