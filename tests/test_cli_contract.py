"""SimpleTuner's CLI contract, command group by command group (S18).

Each test sends exactly what a ``simpletuner …`` command of SimpleTuner 4.10.1
sends (path, query, JSON body, ``X-API-Key``; see tests/cli_client.py) to a
real daemon and checks every field that command reads, with the type it
needs.  The command each block stands for is named in a comment.
"""

from __future__ import annotations

import pytest_twisted

from tests.cli_client import CliClient, expect, is_iso


def cli(daemon, key=None) -> CliClient:
    return CliClient(daemon.url, key or daemon.admin_key)


# -- simpletuner auth users … -------------------------------------------------------------

USER_FIELDS = dict(id="int", username="str", email="str", display_name="str?", is_admin="bool",
                   is_active="bool", email_verified="bool", auth_provider="str", created_at="iso",
                   last_login_at="str?")


@pytest_twisted.ensureDeferred
async def test_users_group(daemon):
    client = cli(daemon)

    # auth users list: "{user.get('email', '')[:29]}" — the first admin has no email.
    listing = await client.ok("GET", "/api/users?limit=100&offset=0")
    users = listing["users"]
    assert users and users[0]["username"] == "admin"
    for user in users:
        expect(user, **USER_FIELDS)
    assert users[0]["email"] == "" and users[0]["is_admin"] is True

    # auth users create --email … --username … [--password …] [--display-name …] [--admin]
    created = await client.ok("POST", "/api/users", {"email": "ada@example.test", "username": "ada",
                                                     "is_admin": False, "password": "a long passphrase",
                                                     "display_name": "Ada L."})
    expect(created, id="int", username="str", email="str")
    assert created["display_name"] == "Ada L." and created["role"] == "viewer"
    boss = await client.ok("POST", "/api/users", {"email": "boss@example.test", "username": "boss",
                                                  "is_admin": True})
    assert boss["role"] == "admin" and boss["is_admin"] is True and boss["has_password"] is False
    ops = await client.ok("POST", "/api/users", {"email": "ops@example.test", "username": "ops",
                                                 "is_admin": False, "level_names": ["viewer", "operator"]})
    assert ops["role"] == "operator"
    status, detail = await client.error("POST", "/api/users", {"email": "x@example.test", "username": "x",
                                                               "is_admin": False, "level_names": ["wizard"]})
    assert status == 400 and "level" in detail

    # auth users get <id> / auth users me
    fetched = await client.ok("GET", f"/api/users/{created['id']}")
    expect(fetched, **USER_FIELDS)
    assert fetched["username"] == "ada" and fetched["display_name"] == "Ada L."
    me = await client.ok("GET", "/api/users/me")
    expect(me, **USER_FIELDS)
    await client.error("GET", "/api/users/999999")

    # auth users update <id> --admin true / --active false / --display-name …
    await client.ok("PATCH", f"/api/users/{created['id']}", {"is_admin": True, "display_name": "Ada"})
    fetched = await client.ok("GET", f"/api/users/{created['id']}")
    assert fetched["is_admin"] is True and fetched["role"] == "admin" and fetched["display_name"] == "Ada"
    await client.ok("PATCH", f"/api/users/{created['id']}", {"is_admin": False, "is_active": False})
    fetched = await client.ok("GET", f"/api/users/{created['id']}")
    assert fetched["role"] == "operator" and fetched["is_active"] is False and fetched["disabled"] is True

    # auth users activate / deactivate <id>: the CLI checks "success".
    result = await client.ok("POST", f"/api/users/{created['id']}/activate")
    assert result["success"] is True and result["user"]["is_active"] is True
    result = await client.ok("POST", f"/api/users/{ops['id']}/deactivate")
    assert result["success"] is True and result["user"]["is_active"] is False

    # auth users auth-status / auth status
    status_body = await client.ok("GET", "/api/users/meta/auth-status")
    assert status_body["in_use"] is True and status_body["user_count"] == 4
    assert status_body["has_external_providers"] is False

    # auth users delete <id> --force
    result = await client.ok("DELETE", f"/api/users/{boss['id']}")
    assert result["success"] is True

    # A non-admin reads only itself.
    response = await client.ok("POST", "/api/auth/api-keys", {"name": "k", "role": "operator",
                                                              "user_id": created["id"]})
    own = cli(daemon, response["key"])
    assert (await own.ok("GET", f"/api/users/{created['id']}"))["id"] == created["id"]
    status, _ = await own.error("GET", "/api/users/1")
    assert status == 403


# -- simpletuner auth audit … ----------------------------------------------------------------

ENTRY_FIELDS = dict(id="int", timestamp="iso", event_type="str", action="str", actor_username="str?",
                    actor_id="int?", actor_ip="str?", target_type="str?", target_id="str?")


@pytest_twisted.ensureDeferred
async def test_audit_group(daemon):
    client = cli(daemon)
    ada = await client.ok("POST", "/api/users", {"email": "ada@example.test", "username": "ada",
                                                 "is_admin": False, "password": "a long passphrase"})
    await client.ok("PATCH", f"/api/users/{ada['id']}", {"display_name": "Ada"})
    for i in range(3):
        await daemon.ctx.audit.record("job.submitted", actor="ada", target=f"job-{i}", action=None)

    # auth audit list --limit 2: entries sliced as strings, actor_username or user:<actor_id>.
    page = await client.ok("GET", "/api/audit?limit=2&offset=0")
    assert page["has_more"] is True and len(page["entries"]) == 2
    for entry in page["entries"]:
        expect(entry, **ENTRY_FIELDS)
    newest = page["entries"][0]
    assert newest["event_type"] == "job.submitted" and newest["actor_username"] == "ada"
    assert newest["actor_id"] == ada["id"] and newest["action"] == ""

    # --actor-id / --event-type / --target-type --target-id / --since
    page = await client.ok("GET", f"/api/audit?limit=50&offset=0&actor_id={ada['id']}&event_type=job.submitted")
    assert page["total"] == 3 and not page["has_more"]
    page = await client.ok("GET", f"/api/audit?limit=50&offset=0&target_type=user&target_id={ada['id']}")
    assert {e["event_type"] for e in page["entries"]} == {"user.created", "user.updated"}
    assert all(e["target_type"] == "user" and e["target_id"] == str(ada["id"]) for e in page["entries"])
    page = await client.ok("GET", "/api/audit?limit=50&offset=0&since=2000-01-01&until=2999-01-01")
    assert page["total"] >= 5
    page = await client.ok("GET", "/api/audit?limit=50&offset=0&actor_id=424242")
    assert page["entries"] == [] and page["total"] == 0

    # auth audit stats
    stats = await client.ok("GET", "/api/audit/stats")
    expect(stats, total_entries="int", last_24h="int", first_entry="iso", last_entry="iso", by_type="dict")
    assert stats["by_type"]["job.submitted"] == 3 and stats["total_entries"] == sum(stats["by_type"].values())

    # auth audit types
    types = (await client.ok("GET", "/api/audit/types"))["event_types"]
    values = {t["value"] for t in types}
    assert {"job.submitted", "user.created", "auth.login.failed"} <= values
    assert all(isinstance(t["name"], str) for t in types)

    # auth audit user <id>: by or about the user.
    page = await client.ok("GET", f"/api/audit/user/{ada['id']}?limit=50&offset=0")
    assert {e["event_type"] for e in page["entries"]} == {"job.submitted", "user.created", "user.updated"}
    for entry in page["entries"]:
        expect(entry, **ENTRY_FIELDS)
    await client.error("GET", "/api/audit/user/9999?limit=50&offset=0")

    # auth audit security
    await client.call("POST", "/api/auth/login", {"username": "ada", "password": "wrong password!"})
    page = await client.ok("GET", "/api/audit/security?limit=50&offset=0")
    kinds = {e["event_type"] for e in page["entries"]}
    assert "auth.login.failed" in kinds and "user.created" in kinds and "job.submitted" not in kinds

    # auth audit verify [--start-id N]
    report = await client.ok("GET", "/api/audit/verify?start_id=1")
    expect(report, valid="bool", entries_checked="int", first_id="int", last_id="int", broken_links="list")
    assert report["valid"] is True and report["entries_checked"] == report["last_id"] - report["first_id"] + 1
    assert is_iso(stats["first_entry"])
