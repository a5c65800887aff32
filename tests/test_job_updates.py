"""One job-update path (S4, S6): the pure mapping in stdaemon/jobs/updates.py, and proof that a
signed webhook and the poller, given the same sequence of provider updates, leave the same job row,
the same counters and metrics figures, the same audit trail and the same live events."""

from __future__ import annotations

import json
import uuid
from datetime import datetime, timezone

import pytest
import pytest_twisted
import treq
from standardwebhooks.webhooks import Webhook
from twisted.internet.task import Clock

from stdaemon.jobs import costs
from stdaemon.jobs import updates as ju
from stdaemon.jobs import store as jobs_store
from tests.replicate_env import audit_events, start_env
from tests.test_metrics import value

NOW = 1_800_000_000.0
LIMIT = 1000.0  # USD per month: the cost-limit percentage must follow both paths


def _job(**fields):
    job = {"job_id": "j1", "status": "queued", "hardware_type": "h100-x2", "started_at": None,
           "completed_at": None, "cost_usd": 0.0, "metadata": {}}
    job.update(fields)
    return job


# -- the pure mapping -------------------------------------------------------------------------

def test_prediction_success_sets_status_times_cost_and_output():
    plan = ju.plan(ju.PREDICTION, {"id": "p", "status": "succeeded", "metrics": {"predict_time": 100.0},
                                   "output": [{"url": "https://x.test/out.safetensors"}]},
                   _job(), {"h100": 0.002}, NOW)
    assert plan.accepted and plan.terminal and plan.reason == "changed" and plan.previous == "queued"
    assert plan.changes == {"status": "completed", "started_at": NOW, "completed_at": NOW,
                            "cost_usd": round(100.0 * 0.002 * 2, 6), "output_url": "https://x.test/out.safetensors"}


def test_cost_uses_the_profile_price_and_gpu_count_with_defaults():
    plan = ju.plan(ju.PREDICTION, {"id": "p", "status": "processing", "metrics": {"predict_time": 10}},
                   _job(hardware_type="l40s-x4"), {}, NOW)
    assert plan.changes["cost_usd"] == costs.job_cost(10, "l40s-x4") == round(10 * 0.000975 * 4, 6)
    unknown_profile = ju.plan(ju.PREDICTION, {"id": "p", "status": "processing", "metrics": {"predict_time": 10}},
                              _job(hardware_type="tpu"), {}, NOW)
    assert unknown_profile.changes["cost_usd"] == costs.job_cost(10, costs.DEFAULT_PROFILE)


@pytest.mark.parametrize("bad", [True, -1, "10", float("nan"), 1e12, None])
def test_implausible_predict_time_sets_no_cost(bad):
    plan = ju.plan(ju.PREDICTION, {"id": "p", "status": "processing", "metrics": {"predict_time": bad}},
                   _job(), {}, NOW)
    assert "cost_usd" not in plan.changes


def test_running_sets_started_at_once_and_repeats_change_nothing():
    first = ju.plan(ju.PREDICTION, {"id": "p", "status": "processing"}, _job(), {}, NOW)
    assert first.changes == {"status": "running", "started_at": NOW}
    # A repeat of the current status is ignored, and an ignored update changes nothing (it may be
    # a late delivery with older figures).
    again = ju.plan(ju.PREDICTION, {"id": "p", "status": "processing", "metrics": {"predict_time": 5}},
                    _job(status="running", started_at=NOW), {}, NOW + 5)
    assert not again.accepted and again.reason == "unchanged"
    assert dict(again.changes) == {}


def test_guards_terminal_out_of_order_and_unknown():
    done = _job(status="completed", started_at=NOW, completed_at=NOW + 1)
    late = ju.plan(ju.PREDICTION, {"id": "p", "status": "failed", "error": "x", "metrics": {"predict_time": 9}},
                   done, {}, NOW + 2)
    assert (late.accepted, late.reason, dict(late.changes)) == (False, "terminal", {})
    back = ju.plan(ju.PREDICTION, {"id": "p", "status": "starting"}, _job(status="running"), {}, NOW)
    assert (back.accepted, back.reason, dict(back.changes)) == (False, "out_of_order", {})
    odd = ju.plan(ju.PREDICTION, {"id": "p", "status": "exploded"}, _job(), {}, NOW)
    assert (odd.status, odd.reason, dict(odd.changes)) == (None, "unknown", {})


def test_failure_keeps_the_error_and_trainer_events_map_the_same_way():
    failed = ju.plan(ju.PREDICTION, {"id": "p", "status": "failed", "error": "CUDA out of memory"},
                     _job(status="running", started_at=NOW), {}, NOW + 3)
    assert failed.changes == {"status": "failed", "completed_at": NOW + 3, "error_message": "CUDA out of memory"}
    trainer = ju.plan(ju.TRAINER, {"job_id": "j1", "type": "status", "data": {"status": "error", "message": "boom"}},
                      _job(status="running", started_at=NOW), {}, NOW + 3)
    assert trainer.changes == {"status": "failed", "completed_at": NOW + 3, "error_message": "boom"}
    assert ju.classify({"job_id": "j1", "type": "x"}) == ju.TRAINER
    assert ju.classify({"id": "p", "status": "starting"}) == ju.PREDICTION
    assert ju.classify({"id": 3, "status": "starting"}) is None


def test_a_long_error_and_a_huge_url_are_bounded():
    plan = ju.plan(ju.PREDICTION, {"id": "p", "status": "failed", "error": "e" * 10_000,
                                   "output": "https://x.test/" + "a" * 5000}, _job(), {}, NOW)
    assert len(plan.changes["error_message"]) == ju.MAX_ERROR and "output_url" not in plan.changes


# -- webhook and poller give the same result ---------------------------------------------------

# One job's life as the provider reports it, including a stale update and late ones after the end.
SEQUENCE = [
    ("starting", {}),
    ("processing", {}),
    ("processing", {"predict_time": 30.0}),
    ("starting", {}),                                   # out of order: ignored
    ("succeeded", {"predict_time": 1234.5, "output": ["https://replicate.delivery/out/model.safetensors"]}),
    ("processing", {"predict_time": 9999.0}),           # after the end: ignored
    ("failed", {"error": "too late"}),                  # after the end: ignored
]
COMPARED = ("status", "config_name", "created_at", "started_at", "completed_at", "cost_usd", "hardware_type",
            "error_message", "output_url", "user_id", "provider")


def _signed(secret, payload, now):
    data = json.dumps(payload)
    msg_id = f"msg_{uuid.uuid4().hex}"
    moment = datetime.fromtimestamp(now, tz=timezone.utc)
    return data.encode(), {"webhook-id": msg_id, "webhook-timestamp": str(int(now)),
                           "webhook-signature": Webhook(secret).sign(msg_id, moment, data),
                           "Content-Type": "application/json"}


async def _jobs_scrape(env):
    response = await treq.get(env.url("/api/cloud/metrics/prometheus"))
    assert response.code == 200
    text = (await response.content()).decode()
    figures = {"total": value(text, "simpletuner_jobs_total"), "active": value(text, "simpletuner_jobs_active"),
               "cost": value(text, "simpletuner_cost_usd_total"),
               "avg": value(text, "simpletuner_job_duration_seconds_avg")}
    for status in ("queued", "running", "completed", "failed"):
        figures[status] = value(text, "simpletuner_jobs_by_status", status=status)
    # followed by the job hooks' cost deltas between refreshes (never reached here: see the clock)
    figures["limit_percent"] = value(text, "simpletuner_cost_limit_percent_used", provider="replicate")
    return figures


@pytest_twisted.ensureDeferred
async def test_webhook_and_poller_leave_identical_rows_counters_audit_and_events(make_daemon, tmp_path):
    envs = {}
    for path in ("webhook", "poller"):
        clock = Clock()
        clock.advance(NOW)
        (tmp_path / path).mkdir()

        async def make(subdir=path, **kwargs):
            return await make_daemon(subdir=subdir, **kwargs)

        envs[path] = await start_env(
            make, tmp_path / path, clock=clock,
            provider_settings={"cost_limit_enabled": True, "cost_limit_amount": LIMIT, "cost_limit_action": "warn"},
            settings={"metrics": {"prometheus_enabled": True, "prometheus_categories": ["jobs", "provider"]},
                      "jobs": {"poll_interval": 3600}})
    try:
        job_ids, externals, accepted_keys = {}, {}, {}
        for path, env in envs.items():
            response, body = await env.submit(hardware_profile="h100-x2")
            assert response.code == 200, body
            job_ids[path] = body["job_id"]
            externals[path] = (await env.ctx.db.run_read(jobs_store.get_job, body["job_id"]))["external_id"]
            accepted_keys[path] = env.fake.state.requests_to("POST", "/v1/predictions")[-1].body["input"]["s3_access_key"]
        answers = []
        for step, (status, extra) in enumerate(SEQUENCE):
            for path, env in envs.items():
                env.ctx.clock.advance(1)  # both daemons see the same time; < 60 s in all: no spend refresh
                prediction = env.fake.state.set_status(externals[path], status, **extra)
                if path == "webhook":
                    data, headers = _signed(env.fake.state.webhook_secret, prediction, env.ctx.now())
                    response = await treq.post(env.url("/api/webhooks/replicate"), data=data, headers=headers)
                    assert response.code == 200, await response.text()
                    answers.append((step, (await response.json())["reason"]))
                else:
                    assert await env.ctx.jobs.poll_once() == (1 if step < 5 else 0)  # a finished job is not polled
                    if step >= 5:  # the poller never sees the late updates; apply them as a poll would
                        await env.ctx.jobs.apply_prediction(prediction)
            rows = {p: await e.ctx.db.run_read(jobs_store.get_job, job_ids[p]) for p, e in envs.items()}
            assert {k: rows["webhook"][k] for k in COMPARED} == {k: rows["poller"][k] for k in COMPARED}, step
            figures = {p: e.ctx.jobs.metrics() for p, e in envs.items()}
            for name in ("jobs_total", "by_status", "active", "cost_usd_total", "job_duration_seconds_avg"):
                assert figures["webhook"][name] == figures["poller"][name], (step, name)
            for name in ("status_changes", "out_of_order_ignored", "terminal_ignored"):
                assert figures["webhook"]["counters"][name] == figures["poller"]["counters"][name], (step, name)
            scraped = [await _jobs_scrape(e) for e in envs.values()]
            assert scraped[0] == scraped[1], step

        assert [reason for _, reason in answers] == ["unchanged", "changed", "unchanged", "out_of_order",
                                                     "changed", "terminal", "terminal"]
        row = rows["poller"]
        assert row["status"] == "completed" and row["output_url"].endswith("model.safetensors")
        assert row["cost_usd"] == costs.job_cost(1234.5, "h100-x2") == round(1234.5 * 0.001525 * 2, 6)
        assert row["error_message"] is None
        assert scraped[0]["completed"] == 1 and scraped[0]["active"] == 0
        assert abs(scraped[0]["cost"] - row["cost_usd"]) < 1e-9
        assert scraped[0]["limit_percent"] == round(row["cost_usd"] / LIMIT * 100.0, 4)
        counters = envs["poller"].ctx.jobs.metrics()["counters"]
        assert (counters["status_changes"], counters["out_of_order_ignored"], counters["terminal_ignored"]) == (2, 1, 2)

        # The same audit trail (only the actor and the webhook id say where it came from) ...
        trails = {}
        for path, env in envs.items():
            entries = [e for e in audit_events(env, "job.status_changed") if e["target"] == job_ids[path]]
            trails[path] = [(e["action"], e["details"]["from"], e["details"]["to"], e["details"]["cost_usd"])
                            for e in entries]
            assert {e["details"]["source"] for e in entries} == {path}
        assert trails["webhook"] == trails["poller"] == [
            ("running", "queued", "running", 0.0),
            ("completed", "running", "completed", row["cost_usd"])]

        # ... the same live events ...
        events = {p: [(ev.data["status"], ev.data.get("cost_usd"), ev.data.get("previous_status"))
                      for ev in e.ctx.events.backlog if ev.data.get("job_id") == job_ids[p]]
                  for p, e in envs.items()}
        assert events["webhook"] == events["poller"]
        assert [status for status, _, _ in events["poller"]][-2:] == ["running", "completed"]

        # ... and the job's upload credentials are revoked either way.
        for path, env in envs.items():
            revoked = await env.ctx.db.run_read(lambda conn, key=accepted_keys[path]: conn.execute(
                "SELECT revoked_at FROM upload_credentials WHERE access_key_id = ?", (key,)).fetchone()[0])
            assert revoked is not None, path

        # A fresh count from the database agrees with the running figures.
        for env in envs.values():
            before = env.ctx.jobs.metrics()
            await env.ctx.jobs.load()
            after = env.ctx.jobs.metrics()
            assert (after["by_status"], after["cost_usd_total"]) == (before["by_status"], before["cost_usd_total"])
    finally:
        for env in envs.values():
            await env.fake.stop()
