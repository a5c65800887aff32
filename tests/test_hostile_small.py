"""The smaller hostile-input findings (S19): provider calls a viewer can trigger at will, and a
same-status webhook that changed the job while answering ``ignored``."""

from __future__ import annotations

import pytest_twisted
import treq

from stdaemon.jobs import store as jobs_store
from tests.authhelpers import create_user, user_key
from tests.replicate_env import start_env
from tests.test_job_updates import _signed


@pytest_twisted.ensureDeferred
async def test_same_status_webhook_changes_nothing_when_ignored(make_daemon, tmp_path):
    env = await start_env(make_daemon, tmp_path)
    response, body = await env.submit(hardware_profile="h100")
    assert response.code == 200, body
    job_id = body["job_id"]
    external = (await env.ctx.db.run_read(jobs_store.get_job, job_id))["external_id"]

    async def deliver(prediction):
        data, headers = _signed(env.fake.state.webhook_secret, prediction, env.ctx.now())
        answer = await treq.post(env.url("/api/webhooks/replicate"), data=data, headers=headers)
        assert answer.code == 200
        return await answer.json()

    answer = await deliver(env.fake.state.set_status(external, "processing"))
    assert answer["status"] == "applied"
    before = await env.ctx.db.run_read(jobs_store.get_job, job_id)
    # A late (stale) delivery of the same status carrying other figures.
    stale = dict(env.fake.state.set_status(external, "processing", predict_time=987.0,
                                           output=["https://example.test/stale.safetensors"]))
    answer = await deliver(stale)
    assert answer["status"] == "ignored" and answer["reason"] == "unchanged", answer
    after = await env.ctx.db.run_read(jobs_store.get_job, job_id)
    assert dict(after) == dict(before)


@pytest_twisted.ensureDeferred
async def test_sync_active_is_for_operators_and_bounded_in_time(make_daemon, tmp_path):
    env = await start_env(make_daemon, tmp_path)
    for _ in range(3):
        response, body = await env.submit(hardware_profile="h100")
        assert response.code == 200, body
    viewer = await user_key(env.daemon, (await create_user(env.daemon, "vera", "viewer"))["id"], "viewer")
    operator = await user_key(env.daemon, (await create_user(env.daemon, "otto", "operator"))["id"], "operator")

    def provider_reads():
        return len(env.fake.state.requests_to("GET", "/v1/predictions/"))

    start = provider_reads()
    for _ in range(10):
        response, body = await env.call("GET", "/api/cloud/jobs?sync_active=1", key=viewer)
        assert response.code == 200, body
    assert provider_reads() == start, "a viewer's sync_active must not call the provider"

    for _ in range(5):
        response, body = await env.call("GET", "/api/cloud/jobs?sync_active=true", key=operator)
        assert response.code == 200, body
    # One refresh of the three active jobs, not one per request.
    assert provider_reads() - start == 3
