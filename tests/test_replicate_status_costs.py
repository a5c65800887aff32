"""Replicate status mapping, guarded transitions, costs and cost-limit periods."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from stdaemon.jobs import costs, status


def ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize("replicate,job", [
    ("starting", "queued"), ("processing", "running"), ("succeeded", "completed"),
    ("failed", "failed"), ("canceled", "cancelled"), ("bogus", None), (None, None),
])
def test_replicate_status_mapping(replicate, job):
    assert status.from_replicate(replicate) == job


def test_terminal_never_changes():
    for terminal in ("completed", "failed", "cancelled"):
        for new in status.STATUSES:
            if new != terminal:
                result = status.check_transition(terminal, new)
                assert not result.accepted and result.reason == "terminal"


def test_out_of_order_updates_are_ignored():
    assert status.check_transition("running", "queued").reason == "out_of_order"
    assert not status.check_transition("running", "queued").accepted
    assert status.check_transition("queued", "running").accepted
    assert status.check_transition("pending", "completed").accepted
    assert status.check_transition("running", "running").reason == "unchanged"
    assert status.check_transition("running", "bogus").reason == "unknown"


def test_every_profile_and_cost_formula():
    assert set(costs.HARDWARE_PROFILES) == {
        "h100", "h100-x2", "h100-x4", "h100-x8", "l40s", "l40s-x2", "l40s-x4", "l40s-x8"}
    assert costs.profile("l40s-x4").gpu_count == 4
    assert costs.job_cost(1000, "h100") == pytest.approx(1000 * 0.001525)
    assert costs.job_cost(1000, "h100-x8") == pytest.approx(1000 * 0.001525 * 8)
    assert costs.job_cost(100, "l40s-x2", {"l40s": 0.01}) == pytest.approx(2.0)
    assert costs.job_cost(100, "l40s-x2", {"l40s-x2": 0.02}) == pytest.approx(4.0)
    assert costs.job_cost(None, "h100") == 0.0
    assert costs.estimate_cost(120, "h100-x2") == pytest.approx(7200 * 0.001525 * 2)
    with pytest.raises(ValueError, match="unknown hardware profile"):
        costs.profile("a100")


def test_period_boundaries_are_utc_calendar():
    now = ts("2026-03-18T15:30:00")  # a Wednesday
    assert costs.period_start(now, "daily") == ts("2026-03-18T00:00:00")
    assert costs.period_start(now, "weekly") == ts("2026-03-16T00:00:00")
    assert costs.period_start(now, "monthly") == ts("2026-03-01T00:00:00")
    assert costs.period_end(now, "monthly") == ts("2026-04-01T00:00:00")
    assert costs.period_end(ts("2026-12-31T23:00:00"), "monthly") == ts("2027-01-01T00:00:00")
    with pytest.raises(ValueError):
        costs.period_start(now, "yearly")


def test_cost_limit_warn_and_block():
    off = costs.check_cost_limit(500, enabled=False, amount=100, action="block", period="daily")
    assert not off.blocked and off.warning is None
    low = costs.check_cost_limit(50, enabled=True, amount=100, action="block", period="daily")
    assert low.warning is None and not low.blocked and low.percent_used == 50
    near = costs.check_cost_limit(80, enabled=True, amount=100, action="block", period="daily")
    assert near.warning and "80%" in near.warning and not near.blocked
    over_warn = costs.check_cost_limit(100, enabled=True, amount=100, action="warn", period="weekly")
    assert "reached" in over_warn.warning and not over_warn.blocked
    over_block = costs.check_cost_limit(100, enabled=True, amount=100, action="block", period="weekly")
    assert over_block.blocked
    by_estimate = costs.check_cost_limit(90, enabled=True, amount=100, action="block",
                                         period="monthly", estimate=20)
    assert by_estimate.blocked and "estimated" in by_estimate.warning


def test_provider_file_values_from_ini_strings_are_normalised():
    from stdaemon.providers import settings as ps

    values, errors = ps.normalise_file_values({
        "ssl_verify": "false", "http_timeout": "45", "webhook_allowed_ips": "10.0.0.0/8, 1.2.3.4",
        "model_versions": "default=ver1, h100-x2=ver2", "gpu_prices": "h100=0.002",
        "cost_limit_amount": "0", "proxy_url": "", "bogus": "x", "cost_limit_period": "hourly"})
    assert values["ssl_verify"] is False and values["http_timeout"] == 45.0
    assert values["webhook_allowed_ips"] == ["10.0.0.0/8", "1.2.3.4/32"]
    assert values["model_versions"] == {"default": "ver1", "h100-x2": "ver2"}
    assert values["gpu_prices"] == {"h100": 0.002}
    assert values["proxy_url"] == ""
    assert sorted(e.field for e in errors) == ["bogus", "cost_limit_period"]


def test_effective_layering_default_file_env_api():
    from stdaemon.providers import settings as ps

    eff = ps.effective({"http_timeout": 10.0, "hardware_profile": "l40s"},
                       {"SIMPLETUNER_HTTP_TIMEOUT": "20", "HTTPS_PROXY": "http://p:1"},
                       {"hardware_profile": "h100-x4"})
    assert eff["http_timeout"] == (20.0, "env")
    assert eff["hardware_profile"] == ("h100-x4", "api")
    assert eff["proxy_url"] == ("http://p:1", "env")
    assert eff["ssl_verify"] == (True, "default")
    table = ps.config_validators()
    assert table["http_timeout"]("providers.replicate.http_timeout", "7") == 7.0
    from stdaemon.invalid import InvalidValue
    with pytest.raises(InvalidValue) as caught:
        table["http_timeout"]("providers.replicate.http_timeout", "-1")
    assert caught.value.path == "providers.replicate.http_timeout"
