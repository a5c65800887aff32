"""SimpleTuner trainer events (issue 13 point 5): the raw events of SimpleTuner's
``WebhookHandler`` (``helpers/webhooks/events.py`` shapes), authenticated by the
per-job webhook token the trainer receives in the prediction input, on a real
daemon with Replicate signatures left on."""

from __future__ import annotations

import base64
import json

import pytest_twisted
import treq

from stdaemon.jobs import store
from tests.replicate_env import PUBLIC_URL, audit_events


async def submitted(env):
    """(job_id, the trainer's webhook config as handed over in the prediction input)."""
    response, body = await env.submit()
    assert response.code == 200, body
    sent = env.fake.state.requests_to("POST", "/v1/predictions")[-1]
    hooks = json.loads(sent.body["input"]["webhook_config"])
    return body["job_id"], hooks


async def post(env, event, token=None, path="/api/webhooks/simpletuner", bearer=False, raw=None):
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization" if bearer else "X-API-Key"] = f"Bearer {token}" if bearer else token
    response = await treq.post(env.url(path), data=raw if raw is not None else json.dumps(event).encode(),
                               headers=headers)
    text = await response.text()
    return response.code, (json.loads(text) if text.startswith("{") else text)


def status_event(job_id, status="running", step=50, loss=0.125, lr=1e-4, epoch=1, eta=120.0):
    # training_status_event(...) as the trainer builds it at every checkpoint/progress update.
    return {"type": "training.status", "job_id": job_id, "title": status.title(),
            "data": {"status": status, "global_step": step, "current_epoch": epoch,
                     "total_num_steps": 100, "final_epoch": 2},
            "progress": {"label": "Training", "current": step, "total": 100, "percent": step,
                         "eta_seconds": eta, "metrics": {"loss": loss, "learning_rate": lr, "epoch": epoch}},
            "severity": "info", "timestamp": "2026-12-04T18:00:00+00:00"}


async def job(env, job_id):
    response, body = await env.call("GET", f"/api/cloud/jobs/{job_id}")
    assert response.code == 200
    assert body["progress"] == body["job"]["progress"]  # also beside upload_progress
    return body["job"]


@pytest_twisted.ensureDeferred
async def test_trainer_gets_a_per_job_token_and_its_progress_is_kept(env):
    job_id, hooks = await submitted(env)
    assert hooks[0]["webhook_type"] == "raw"
    assert hooks[0]["callback_url"] == f"{PUBLIC_URL}/api/webhooks/simpletuner"
    token = hooks[0]["auth_token"]
    assert len(token) >= 32
    row = await env.ctx.db.run_read(store.get_job, job_id)
    assert token not in json.dumps(row, default=str)  # only a hash is stored
    assert "webhook_token_sha256" not in (await job(env, job_id))["metadata"]

    code, body = await post(env, status_event(job_id), token)
    assert code == 200 and body["status"] == "applied", body
    current = await job(env, job_id)
    assert current["status"] == "running"
    assert current["progress"] == {"step": 50, "total_steps": 100, "percent": 50, "epoch": 1,
                                   "loss": 0.125, "lr": 1e-4, "eta_seconds": 120,
                                   "timestamp": "2026-12-04T18:00:00+00:00"}
    # The latest progress is on the live event stream too.
    assert env.ctx.events.backlog[-1].data["progress"]["step"] == 50

    # A progress event without a status (Bearer this time) moves only the progress.
    progress_only = {"type": "training.progress", "job_id": job_id,
                     "progress": {"current": 75, "total": 100, "eta_seconds": 60,
                                  "metrics": {"loss": 0.09, "learning_rate": 5e-5, "epoch": 2}}}
    code, body = await post(env, progress_only, token, bearer=True)
    assert code == 200 and body["status"] == "applied", body
    current = await job(env, job_id)
    assert current["status"] == "running"
    assert (current["progress"]["step"], current["progress"]["loss"], current["progress"]["epoch"]) == (75, 0.09, 2)
    assert env.ctx.events.backlog[-1].data["progress"]["step"] == 75

    # Other lifecycle stages (cache building, a saved model) do not end the job.
    stage = {"type": "lifecycle.stage", "job_id": job_id, "severity": "info",
             "stage": {"key": "save_final_model", "label": "Saving Final Model", "status": "completed"}}
    code, body = await post(env, stage, token)
    assert code == 200 and (await job(env, job_id))["status"] == "running"

    # lifecycle.stage training_complete -> completed; upload credentials revoked.
    complete = {"type": "lifecycle.stage", "job_id": job_id, "severity": "info",
                "message": "Training run complete.", "title": "Training run complete.",
                "stage": {"key": "training_complete", "label": "Training Complete", "status": "completed",
                          "progress": {"label": "Training Complete", "percent": 100,
                                       "metrics": {"loss": 0.05, "learning_rate": 1e-5, "epoch": 2}}},
                "data": {"state": {"global_step": 100}, "final_epoch": 2}}
    code, body = await post(env, complete, token)
    assert code == 200 and body["job_status"] == "completed", body
    current = await job(env, job_id)
    assert current["status"] == "completed" and current["progress"]["loss"] == 0.05
    access_key = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]["s3_access_key"]
    assert await env.ctx.upload_credentials.lookup(access_key) is None or \
        not (await env.ctx.upload_credentials.lookup(access_key)).active(env.ctx.now())
    changes = [e for e in audit_events(env, "job.status_changed") if e["target"] == job_id]
    assert [e["action"] for e in changes][-2:] == ["running", "completed"]


@pytest_twisted.ensureDeferred
async def test_training_failed_maps_to_failed_with_the_error_text(env):
    job_id, hooks = await submitted(env)
    failure = {"status": "training_failed", "error": "CUDA out of memory. Tried to allocate 2.00 GiB",
               "traceback": "Traceback ...", "type": "training.status", "job_id": job_id,
               "severity": "error", "timestamp": "2026-12-04T18:05:00+00:00"}
    code, body = await post(env, failure, hooks[0]["auth_token"])
    assert code == 200 and body["job_status"] == "failed", body
    current = await job(env, job_id)
    assert current["status"] == "failed"
    assert current["error_message"] == "CUDA out of memory. Tried to allocate 2.00 GiB"
    # Terminal: later events change nothing.
    code, body = await post(env, status_event(job_id, step=99), hooks[0]["auth_token"])
    assert code == 200 and body["status"] == "ignored"
    assert (await job(env, job_id))["status"] == "failed"


@pytest_twisted.ensureDeferred
async def test_tokens_are_per_job_and_replicate_signatures_stay_on(env):
    job_a, hooks_a = await submitted(env)
    job_b, hooks_b = await submitted(env)
    token_a, token_b = hooks_a[0]["auth_token"], hooks_b[0]["auth_token"]
    assert token_a != token_b

    code, body = await post(env, status_event(job_b), token_a)  # A's token for B
    assert code == 401 and body["reason"] == "invalid_token"
    code, body = await post(env, status_event(job_b), None)
    assert code == 401 and body["reason"] == "missing_token"
    code, body = await post(env, status_event(job_b), "st_not-a-token")
    assert code == 401
    code, body = await post(env, status_event("no-such-job"), token_a)
    assert code == 401  # a token cannot probe for job ids
    assert (await job(env, job_b))["status"] == "queued"
    rejected = audit_events(env, "webhook_rejected")
    assert {e["details"]["reason"] for e in rejected} >= {"invalid_token", "missing_token"}

    # The trainer may use the Replicate path with its token (no signature headers) ...
    code, body = await post(env, status_event(job_b), token_b, path="/api/webhooks/replicate")
    assert code == 200 and body["status"] == "applied"
    # ... but without a token that path still demands Replicate's signature.
    code, body = await post(env, status_event(job_b, step=60), None, path="/api/webhooks/replicate")
    assert code == 401 and body["error"] == "invalid_signature"
    # ... and a prediction payload with a key but no signature is a Replicate delivery: signature needed.
    prediction = {"id": "fake-pred", "status": "succeeded"}
    code, body = await post(env, prediction, token_b, path="/api/webhooks/replicate")
    assert code == 401 and body["error"] == "invalid_signature"
    assert env.ctx.providers.values("replicate")["webhook_require_signature"] is True

    # Validation images make events large: over the 1 MiB cap is 413 before anything runs.
    big = status_event(job_b)
    big["images"] = [base64.b64encode(b"\x89PNG" * 300_000).decode()]
    code, _ = await post(env, big, token_b)
    assert code == 413
    code, body = await post(env, None, token_b, raw=b"{not json")
    assert code == 400
    code, body = await post(env, {"hello": "world"}, token_b)
    assert code == 400 and body["error"] == "invalid_payload"
