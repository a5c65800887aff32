"""Provider token management without a shell (issue 13 point 2) and the default
secrets file lookup (point 8): ``PUT|DELETE /api/cloud/providers/{p}/token`` on a
real daemon, the token going to the secrets file and used by the next call."""

from __future__ import annotations

import json
import os
import stat

import pytest
import pytest_twisted
from twisted.internet import reactor

from tests.authhelpers import call, create_user, user_key
from tests.fake_replicate import FakeReplicate

BODY = {"config": {"model_family": "flux"}, "dataloader_config": []}


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "home"
    path.mkdir()
    monkeypatch.setenv("HOME", str(path))
    monkeypatch.delenv("REPLICATE_API_TOKEN", raising=False)
    return path


async def start(make_daemon, tmp_path, **secrets):
    fake = await FakeReplicate(reactor).start()
    bundle = fake.write_ca_bundle(tmp_path / "ca.pem")
    daemon = await make_daemon(settings={
        "server": {"public_url": "https://daemon.example.test"},
        "secrets": secrets,
        "providers": {"replicate": {"api_base_url": fake.url, "ssl_ca_bundle": bundle}}})
    return daemon, fake


def write_secrets(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    os.chmod(path, 0o600)


@pytest_twisted.ensureDeferred
async def test_put_token_creates_the_file_and_the_next_call_uses_it(make_daemon, tmp_path, home):
    daemon, fake = await start(make_daemon, tmp_path)
    try:
        key = daemon.admin_key
        target = os.path.join(daemon.ctx.path(), "secrets.json")
        response, body = await call(daemon, "GET", "/api/cloud/providers/replicate/token", key=key)
        assert response.code == 200
        assert body["configured"] is False and body["source"] is None and body["file_path"] == target
        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit", BODY, key=key)
        assert response.code == 400 and body["error"] == "provider_not_configured"

        response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate/token",
                                    {"token": fake.state.token}, key=key)
        assert response.code == 200, body
        assert body["success"] is True and body["configured"] is True and body["source"] == "file"
        assert fake.state.token not in json.dumps(body)  # never returned
        assert stat.S_IMODE(os.stat(target).st_mode) == 0o600
        with open(target) as fh:
            assert json.load(fh) == {"REPLICATE_API_TOKEN": fake.state.token}

        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit", BODY, key=key)
        assert response.code == 200 and body["success"] is True, body
        sent = fake.state.requests_to("POST", "/v1/predictions")[-1]
        assert sent.headers["authorization"] == f"Bearer {fake.state.token}"

        _, described = await call(daemon, "GET", "/api/cloud/providers/replicate", key=key)
        assert described["configured"] is True and described["token_source"] == "file"

        rows = await daemon.ctx.db.run_read(lambda c: c.execute(
            "SELECT event_type, action, details FROM audit_log WHERE event_type LIKE 'provider.token%'"
        ).fetchall())
        assert [(r[0], r[1]) for r in rows] == [("provider.token_set", "set")]
        assert fake.state.token not in rows[0][2]

        response, body = await call(daemon, "DELETE", "/api/cloud/providers/replicate/token", key=key)
        assert response.code == 200 and body["configured"] is False and body["changed"] is True
        with open(target) as fh:
            assert json.load(fh) == {}
        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit", BODY, key=key)
        assert response.code == 400 and body["error"] == "provider_not_configured"
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_cli_body_keeps_other_entries_and_bad_input_is_refused(make_daemon, tmp_path, home):
    explicit = tmp_path / "conf" / "secrets.yaml"
    explicit.parent.mkdir()
    explicit.write_text("OTHER_SECRET: keep-me\nREPLICATE_API_TOKEN: r8_old\n")
    os.chmod(explicit, 0o600)
    daemon, fake = await start(make_daemon, tmp_path, file=str(explicit))
    try:
        key = daemon.admin_key
        response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate/token",
                                    {"api_token": fake.state.token}, key=key)  # SimpleTuner's CLI body
        assert response.code == 200 and body["success"] is True, body
        import yaml

        assert yaml.safe_load(explicit.read_text()) == {"OTHER_SECRET": "keep-me",
                                                        "REPLICATE_API_TOKEN": fake.state.token}
        assert stat.S_IMODE(os.stat(explicit).st_mode) == 0o600
        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit", BODY, key=key)
        assert response.code == 200, body

        for bad in ({}, {"token": ""}, {"token": "has space"}, {"token": 5}, {"token": "x" * 5000}):
            response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate/token", bad, key=key)
            assert response.code == 400 and body["field"] == "token", (bad, body)
        response, _ = await call(daemon, "PUT", "/api/cloud/providers/nope/token", {"token": "a"}, key=key)
        assert response.code == 404

        user = await create_user(daemon, "olga", "operator")
        operator = await user_key(daemon, user["id"], "operator")
        response, _ = await call(daemon, "PUT", "/api/cloud/providers/replicate/token",
                                 {"token": "r8_x"}, key=operator)
        assert response.code == 403
        response, _ = await call(daemon, "DELETE", "/api/cloud/providers/replicate/token", key=operator)
        assert response.code == 403
        response, body = await call(daemon, "GET", "/api/cloud/providers/replicate/token", key=operator)
        assert response.code == 200 and body["source"] == "file"
        response, _ = await call(daemon, "PUT", "/api/cloud/providers/replicate/token", {"token": "r8_x"})
        assert response.code == 401

        # A file that cannot be parsed is never overwritten.
        explicit.write_text("OTHER_SECRET: [unclosed\n")
        response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate/token",
                                    {"token": "r8_new"}, key=key)
        assert response.code == 409 and "cannot be parsed" in body["detail"]
        assert explicit.read_text() == "OTHER_SECRET: [unclosed\n"
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_default_secrets_file_is_looked_up_in_state_then_home(make_daemon, tmp_path, home):
    write_secrets(home / ".simpletuner" / "secrets.json", {"REPLICATE_API_TOKEN": "r8_test_token"})
    daemon, fake = await start(make_daemon, tmp_path)
    try:
        response, body = await call(daemon, "POST", "/api/cloud/jobs/submit", BODY, key=daemon.admin_key)
        assert response.code == 200, body  # found in ~/.simpletuner
        status = daemon.ctx.secrets.status()
        assert status["token_source"] == "file"
        assert [s for s in status["stores"] if s["name"] == "file"][0]["location"] == \
            str(home / ".simpletuner" / "secrets.json")
        # A token saved through the API goes to the file in use.
        response, body = await call(daemon, "PUT", "/api/cloud/providers/replicate/token",
                                    {"token": "r8_test_token"}, key=daemon.admin_key)
        assert body["file_path"] == str(home / ".simpletuner" / "secrets.json")
    finally:
        await fake.stop()
    # The state directory's file comes first.
    state_file = tmp_path / "second" / "state" / "secrets.json"
    write_secrets(state_file, {"REPLICATE_API_TOKEN": "r8_state"})
    fake = await FakeReplicate(reactor).start()
    try:
        daemon = await make_daemon(subdir="second", settings={
            "server": {"public_url": "https://daemon.example.test"},
            "providers": {"replicate": {"api_base_url": fake.url,
                                        "ssl_ca_bundle": fake.write_ca_bundle(tmp_path / "ca2.pem")}}})
        assert await daemon.ctx.secrets.get("REPLICATE_API_TOKEN") == "r8_state"
    finally:
        await fake.stop()


@pytest_twisted.ensureDeferred
async def test_with_several_instances_the_token_is_not_written_to_one_instances_file(
        make_daemon, tmp_path, home, monkeypatch):
    daemon, fake = await start(make_daemon, tmp_path)
    try:
        monkeypatch.setattr(daemon.ctx.db, "shared", True)
        target = os.path.join(daemon.ctx.path(), "secrets.json")
        for method, body in (("PUT", {"token": fake.state.token}), ("DELETE", None)):
            response, answer = await call(daemon, method, "/api/cloud/providers/replicate/token", body,
                                          key=daemon.admin_key)
            assert response.code == 409, answer
            assert answer["error"] == "secrets_not_shared" and "REPLICATE_API_TOKEN" in json.dumps(answer), answer
        assert not os.path.exists(target)
    finally:
        await fake.stop()
