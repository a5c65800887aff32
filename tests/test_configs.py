"""Named training configs (S18; issue 13 point 3): SimpleTuner's WebUI layout on disk,
``/api/configs`` on a real daemon, and submission by ``config_name_to_load``."""

from __future__ import annotations

import json
import os
import stat

import pytest_twisted

from tests.authhelpers import call, create_user, user_key
from tests.replicate_env import audit_events, start_env

CONFIG = {"model_family": "flux", "model_type": "lora", "max_train_steps": 100, "learning_rate": 1e-4,
          "resolution": 1024, "note": "héllo ✓"}
DATALOADER = [{"id": "pics", "type": "local", "instance_data_dir": "/data/pics"},
              {"id": "text-embeds", "type": "local", "dataset_type": "text_embeds", "default": True}]


@pytest_twisted.ensureDeferred
async def test_put_get_list_delete_in_the_webui_layout(daemon):
    key = daemon.admin_key
    response, body = await call(daemon, "PUT", "/api/configs/flux-lora",
                                {"config": CONFIG, "dataloader_config": DATALOADER}, key=key)
    assert response.code == 201, body
    assert body["name"] == "flux-lora" and body["config"] == CONFIG
    assert body["dataloader_config"] == DATALOADER and body["updated_at"].endswith("Z")
    directory = os.path.join(daemon.ctx.path("configs"), "flux-lora")
    with open(os.path.join(directory, "config.json"), encoding="utf-8") as fh:
        assert json.load(fh) == CONFIG
    with open(os.path.join(directory, "multidatabackend.json"), encoding="utf-8") as fh:
        assert json.load(fh) == DATALOADER
    assert stat.S_IMODE(os.stat(directory).st_mode) == 0o700
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]

    response, body = await call(daemon, "GET", "/api/configs/flux-lora", key=key)
    assert response.code == 200
    assert body["config"] == CONFIG and body["dataloader_config"] == DATALOADER

    changed = dict(CONFIG, max_train_steps=200)
    response, body = await call(daemon, "PUT", "/api/configs/flux-lora", {"config": changed}, key=key)
    assert response.code == 200 and body["config"]["max_train_steps"] == 200
    assert body["dataloader_config"] == []  # the body's dataloader replaces the stored one

    await call(daemon, "PUT", "/api/configs/sdxl.v2", {"config": {"model_family": "sdxl"}}, key=key)
    response, body = await call(daemon, "GET", "/api/configs", key=key)
    assert response.code == 200 and body["total"] == 2
    assert [c["name"] for c in body["configs"]] == ["flux-lora", "sdxl.v2"]

    response, body = await call(daemon, "DELETE", "/api/configs/flux-lora", key=key)
    assert response.code == 200 and body["success"] is True
    assert not os.path.exists(directory)
    response, body = await call(daemon, "GET", "/api/configs/flux-lora", key=key)
    assert response.code == 404 and "detail" in body
    response, _ = await call(daemon, "DELETE", "/api/configs/flux-lora", key=key)
    assert response.code == 404

    saved = [e for e in await audit_rows(daemon) if e[0] in ("config.saved", "config.deleted")]
    assert [(e[0], e[1]) for e in saved] == [("config.saved", "create"), ("config.saved", "update"),
                                             ("config.saved", "create"), ("config.deleted", "delete")]


async def audit_rows(daemon):
    return await daemon.ctx.db.run_read(
        lambda conn: conn.execute("SELECT event_type, action FROM audit_log ORDER BY id").fetchall())


@pytest_twisted.ensureDeferred
async def test_names_and_bodies_are_validated_and_nothing_escapes(daemon):
    key = daemon.admin_key
    good = {"config": {"a": 1}}
    for name in ("..", ".hidden", "a..b", "-dash", "x" * 129, "%2e%2e", "..%2Fescape", "sp%20ace"):
        response, body = await call(daemon, "PUT", f"/api/configs/{name}", good, key=key)
        assert response.code in (400, 404), (name, response.code, body)
        response, body = await call(daemon, "GET", f"/api/configs/{name}", key=key)
        assert response.code in (400, 404), (name, body)
    state = os.path.dirname(daemon.ctx.path("configs"))
    assert not os.path.exists(os.path.join(state, "escape"))
    assert not os.path.exists(daemon.ctx.path("configs")) or os.listdir(daemon.ctx.path("configs")) == []

    for raw, field in ((json.dumps({"config": [1]}), "config"),
                       (json.dumps({"dataloader_config": []}), "config"),
                       (json.dumps({"config": {}, "dataloader_config": 3}), "dataloader_config"),
                       (json.dumps({"config": {}, "extra": 1}), "extra")):
        response, body = await call(daemon, "PUT", "/api/configs/ok", raw.encode(),
                                    headers={"Content-Type": "application/json"}, key=key)
        assert response.code == 400 and body["field"] == field, (raw, body)
    for raw in (b"{nope", b'{"config": {"lr": NaN}}', b'{"config": {"x": "\\ud800"}}'):
        response, body = await call(daemon, "PUT", "/api/configs/ok", raw, key=key,
                                    headers={"Content-Type": "application/json"})
        assert response.code == 400 and body["error"] == "invalid_json", (raw, body)

    # A hand-edited file that is no longer JSON is a clear error, not a 500.
    await call(daemon, "PUT", "/api/configs/broken", good, key=key)
    with open(os.path.join(daemon.ctx.path("configs"), "broken", "config.json"), "w") as fh:
        fh.write("{half")
    response, body = await call(daemon, "GET", "/api/configs/broken", key=key)
    assert response.code == 409 and "not valid JSON" in body["detail"]


@pytest_twisted.ensureDeferred
async def test_viewers_cannot_read_or_write_configs(daemon):
    user = await create_user(daemon, "vera", "viewer")
    key = await user_key(daemon, user["id"], "viewer")
    response, _ = await call(daemon, "GET", "/api/configs", key=key)
    assert response.code == 403
    response, _ = await call(daemon, "PUT", "/api/configs/x", {"config": {}}, key=key)
    assert response.code == 403
    response, _ = await call(daemon, "GET", "/api/configs")
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_submission_by_config_name_to_load(make_daemon, tmp_path):
    env = await start_env(make_daemon, tmp_path)
    try:
        response, _ = await env.call("PUT", "/api/configs/my-run",
                                     {"config": CONFIG, "dataloader_config": DATALOADER})
        assert response.code == 201
        response, body = await env.call("POST", "/api/cloud/jobs/submit?provider=replicate",
                                        {"config_name_to_load": "my-run"})
        assert response.code == 200 and body["success"] is True, body
        sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
        assert json.loads(sent.body["input"]["config_json"]) == CONFIG
        assert json.loads(sent.body["input"]["dataloader_json"]) == DATALOADER
        _, job = await env.call("GET", f"/api/cloud/jobs/{body['job_id']}")
        assert job["job"]["config_name"] == "my-run"

        # An inline dataloader overrides the stored one.
        response, body = await env.call("POST", "/api/cloud/jobs/submit",
                                        {"config_name_to_load": "my-run", "dataloader_config": []})
        assert response.code == 200, body
        assert json.loads(env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]
                          ["dataloader_json"]) == []

        before = len(env.fake.state.requests_to("POST", "/v1/predictions"))
        response, body = await env.call("POST", "/api/cloud/jobs/submit", {"config_name_to_load": "nope"})
        assert response.code == 404 and body["error"] == "config_not_found" and body["success"] is False
        response, body = await env.call("POST", "/api/cloud/jobs/submit", {"config_name_to_load": "../x"})
        assert response.code == 400 and body["field"] == "config_name_to_load"
        assert len(env.fake.state.requests_to("POST", "/v1/predictions")) == before
        _, listing = await env.call("GET", "/api/cloud/jobs")
        assert listing["total"] == 2
    finally:
        await env.fake.stop()
