"""The rate-limit middleware through a real daemon on a loopback port: one test per row
of the guide's table, exclusions, headers with true reset times, 429 body, spoofed
X-Forwarded-For, loopback exemption, custom rules, sampled audit, metrics, health."""

import json
import math

import pytest
import pytest_twisted
import treq
from twisted.internet.task import Clock

from stdaemon.invalid import InvalidValue
from tests.conftest import build_config
from tests.rate_probe import FakeAudit, probed  # noqa: F401 (fixture)

T0 = 1_800_000_000.0


def limited(**extra):
    settings = {"rate_limit": {"exempt_loopback": False}}
    settings["rate_limit"].update(extra)
    return settings


async def call(daemon, method, path, headers=None):
    response = await treq.request(method, daemon.url + path, headers=headers or {})
    body = await response.content()
    return response, body


def header(response, name):
    return response.headers.getRawHeaders(name, [None])[0]


# one row per line of the guide's table: (method, path, limit)
ROWS = [
    ("POST", "/api/auth/login", 5),
    ("POST", "/api/auth/register", 3),
    ("POST", "/api/auth/api-keys", 10),
    ("POST", "/api/cloud/jobs/submit", 20),
    ("POST", "/api/cloud/jobs", 20),
    ("POST", "/api/cloud/jobs/job-42/cancel", 30),
    ("POST", "/api/webhooks/replicate", 100),
    ("PUT", "/api/cloud/storage/outputs/job-42/model.safetensors", 50),
    ("GET", "/api/quotas/users/7", 30),
    ("GET", "/api/probe/other", 100),
]


@pytest.mark.parametrize("method,path,limit", ROWS, ids=[f"{m} {p}" for m, p, _ in ROWS])
@pytest_twisted.ensureDeferred
async def test_default_table_row(make_daemon, probed, method, path, limit):
    clock = Clock()
    clock.advance(T0)
    daemon = await make_daemon(limited(), clock=clock)
    for i in range(limit):
        response, _ = await call(daemon, method, path)
        assert response.code == 200, (i, response.code)
        assert header(response, "X-RateLimit-Limit") == str(limit)
        assert header(response, "X-RateLimit-Remaining") == str(limit - i - 1)
        assert header(response, "X-RateLimit-Reset") == str(int(T0) + 60)
    clock.advance(12.5)
    response, body = await call(daemon, method, path)
    assert response.code == 429
    assert json.loads(body) == {"detail": "Rate limit exceeded. Please try again later.",
                                "error": "rate_limited"}
    assert header(response, "Retry-After") == str(math.ceil(60 - 12.5))
    assert header(response, "X-RateLimit-Limit") == str(limit)
    assert header(response, "X-RateLimit-Remaining") == "0"
    assert header(response, "X-RateLimit-Reset") == str(int(T0) + 60)
    clock.advance(47.5)  # the requests made at T0 leave the window together
    response, _ = await call(daemon, method, path)
    assert response.code == 200
    assert header(response, "X-RateLimit-Remaining") == str(limit - 1)
    assert header(response, "X-RateLimit-Reset") == str(int(T0) + 120)


@pytest_twisted.ensureDeferred
async def test_rules_use_separate_buckets_and_methods(make_daemon, probed):
    daemon = await make_daemon(limited(calls=3))
    for _ in range(5):
        assert (await call(daemon, "POST", "/api/auth/login"))[0].code == 200
    assert (await call(daemon, "POST", "/api/auth/login"))[0].code == 429
    # GET on the login path is not the login rule: it falls back to the default (3)
    codes = [(await call(daemon, "GET", "/api/auth/login"))[0].code for _ in range(4)]
    assert codes == [200, 200, 200, 429]
    # the default bucket is shared by every unmatched endpoint
    assert (await call(daemon, "GET", "/api/cloud/jobs"))[0].code == 429


@pytest.mark.parametrize("method,path", [
    ("GET", "/health"), ("GET", "/api/cloud/health/live"), ("GET", "/api/cloud/health/ready"),
    ("GET", "/api/events/stream"), ("GET", "/static/app.js"), ("GET", "/api/cloud/hints"),
    ("GET", "/api/users/me"), ("GET", "/api/cloud/providers"),
])
@pytest_twisted.ensureDeferred
async def test_excluded_paths_are_never_limited(make_daemon, probed, method, path):
    daemon = await make_daemon(limited(calls=1))
    for _ in range(4):
        response, _ = await call(daemon, method, path)
        assert response.code == 200
        assert header(response, "X-RateLimit-Limit") is None


@pytest_twisted.ensureDeferred
async def test_provider_changes_are_limited(make_daemon, probed):
    daemon = await make_daemon(limited(calls=1))
    codes = [(await call(daemon, "PUT", "/api/cloud/providers"))[0].code for _ in range(2)]
    assert codes == [200, 429]


@pytest_twisted.ensureDeferred
async def test_path_tricks_do_not_dodge_the_login_rule(make_daemon, probed):
    daemon = await make_daemon(limited())
    for _ in range(5):
        assert (await call(daemon, "POST", "/api/auth/login"))[0].code == 200
    response, _ = await call(daemon, "POST", "/api/auth/%6Cogin")
    assert response.code == 429


@pytest_twisted.ensureDeferred
async def test_spoofed_forwarded_for_from_untrusted_peer_does_not_change_the_key(make_daemon,
                                                                                 probed):
    daemon = await make_daemon(limited())
    codes = []
    for i in range(8):
        response, _ = await call(daemon, "POST", "/api/auth/login", headers={
            "X-Forwarded-For": f"198.51.100.{i}", "X-Real-IP": f"203.0.113.{i}"})
        codes.append(response.code)
    assert codes == [200] * 5 + [429] * 3


@pytest_twisted.ensureDeferred
async def test_forwarded_for_from_a_trusted_proxy_names_the_client(make_daemon, probed):
    settings = limited()
    settings["server"] = {"trusted_proxies": ["127.0.0.1/32"]}
    daemon = await make_daemon(settings)
    for _ in range(5):
        headers = {"X-Forwarded-For": "198.51.100.1"}
        assert (await call(daemon, "POST", "/api/auth/login", headers))[0].code == 200
    assert (await call(daemon, "POST", "/api/auth/login",
                       {"X-Forwarded-For": "198.51.100.1"}))[0].code == 429
    # another client behind the same proxy has its own window; a spoofed left-most
    # entry does not help the first one
    assert (await call(daemon, "POST", "/api/auth/login",
                       {"X-Forwarded-For": "198.51.100.2"}))[0].code == 200
    assert (await call(daemon, "POST", "/api/auth/login",
                       {"X-Forwarded-For": "10.9.9.9, 198.51.100.1"}))[0].code == 429


@pytest_twisted.ensureDeferred
async def test_loopback_is_exempt_by_default(make_daemon, probed):
    daemon = await make_daemon()
    for _ in range(8):
        response, _ = await call(daemon, "POST", "/api/auth/login")
        assert response.code == 200
        assert header(response, "X-RateLimit-Limit") is None


@pytest_twisted.ensureDeferred
async def test_rate_limit_calls_zero_disables(make_daemon, probed):
    daemon = await make_daemon(limited(), env={"RATE_LIMIT_CALLS": "0"})
    for _ in range(8):
        response, _ = await call(daemon, "POST", "/api/auth/login")
        assert response.code == 200
        assert header(response, "X-RateLimit-Limit") is None


@pytest_twisted.ensureDeferred
async def test_rate_limit_calls_and_period_from_env(make_daemon, probed):
    clock = Clock()
    clock.advance(T0)
    daemon = await make_daemon(limited(), env={"RATE_LIMIT_CALLS": "2", "RATE_LIMIT_PERIOD": "30"},
                               clock=clock)
    codes = [(await call(daemon, "GET", "/api/probe/other"))[0].code for _ in range(3)]
    assert codes == [200, 200, 429]
    response, _ = await call(daemon, "GET", "/api/probe/other")
    assert header(response, "Retry-After") == "30"
    assert header(response, "X-RateLimit-Reset") == str(int(T0) + 30)


@pytest_twisted.ensureDeferred
async def test_custom_rules_from_config(make_daemon, probed):
    daemon = await make_daemon(limited(rules=[
        {"pattern": r"^/api/probe/other$", "calls": 2, "period": 300, "methods": ["POST"]},
        [r"^/api/quotas/", 1000, 60, None],
    ]))
    codes = [(await call(daemon, "POST", "/api/probe/other"))[0].code for _ in range(3)]
    assert codes == [200, 200, 429]
    response, _ = await call(daemon, "POST", "/api/probe/other")
    assert 295 <= int(header(response, "Retry-After")) <= 300
    # the custom rule is for POST only: GET falls back to the default
    response, _ = await call(daemon, "GET", "/api/probe/other")
    assert header(response, "X-RateLimit-Limit") == "100"
    response, _ = await call(daemon, "GET", "/api/quotas/x")
    assert header(response, "X-RateLimit-Limit") == "1000"


@pytest.mark.parametrize("rules,path", [
    ([{"pattern": "(", "calls": 1, "period": 1}], "rate_limit.rules[0].pattern"),
    ([{"pattern": "^/x$", "calls": -1, "period": 1}], "rate_limit.rules[0].calls"),
    ([{"pattern": "^/x$", "calls": 1, "period": 60}, {"pattern": "^/y$", "calls": 1}],
     "rate_limit.rules[1].period"),
    ([{"pattern": "^/x$", "calls": 10**7, "period": 60}], "rate_limit.rules[0].calls"),
])
def test_malformed_rules_are_rejected_at_start_with_the_key_path(tmp_path, rules, path):
    with pytest.raises(InvalidValue) as excinfo:
        config = build_config(tmp_path, {"rate_limit": {"rules": rules}})
        from stdaemon.ratelimit.rules import rule_set_from_config

        rule_set_from_config(config.rate_limit)  # reached only if the loader let the rule through
    assert excinfo.value.path == path


@pytest_twisted.ensureDeferred
async def test_violations_are_counted_and_audited_sampled(make_daemon, probed):
    settings = limited()
    settings["server"] = {"trusted_proxies": ["127.0.0.1/32"]}
    daemon = await make_daemon(settings)
    audit = daemon.ctx.rate_limit_middleware.audit = FakeAudit()
    headers = {"X-Forwarded-For": "198.51.100.77", "User-Agent": "flood/1.0"}
    for _ in range(205):
        await call(daemon, "POST", "/api/auth/login", headers)
    assert daemon.ctx.metrics.rate_limit_violations == 200
    assert len(audit.entries) == 1  # one entry per client per minute
    entry = audit.entries[0]
    assert entry["event_type"] == "rate_limited"
    assert entry["ip"] == "198.51.100.77"
    assert entry["details"]["endpoint"] == "/api/auth/login"
    assert entry["details"]["method"] == "POST"
    assert entry["details"]["user_agent"] == "flood/1.0"
    # many clients: the audit log gets at most 60 entries a minute in all
    for i in range(80):
        xff = {"X-Forwarded-For": f"203.0.113.{i}"}
        for _ in range(4):
            await call(daemon, "POST", "/api/auth/register", xff)
    assert daemon.ctx.metrics.rate_limit_violations == 280
    assert len(audit.entries) == 60
    assert daemon.ctx.metrics.rate_limit_tracked_clients() == 81


@pytest_twisted.ensureDeferred
async def test_health_reports_the_rate_limiter(make_daemon, probed):
    daemon = await make_daemon(limited())
    response, body = await call(daemon, "GET", "/api/cloud/health")
    component = next(c for c in json.loads(body)["components"] if c["name"] == "rate_limiter")
    assert component["status"] == "healthy" and component["message"].startswith("memory")
    assert daemon.ctx.rate_limiter.backend_name == "memory"


@pytest_twisted.ensureDeferred
async def test_real_login_route_is_limited_before_authentication(make_daemon):
    daemon = await make_daemon(limited())
    codes = []
    for _ in range(7):
        response = await treq.post(daemon.url + "/api/auth/login",
                                   json={"username": "nobody", "password": "wrong"})
        await response.content()
        codes.append(response.code)
    assert codes[5:] == [429, 429]
    assert all(code != 429 and code < 500 for code in codes[:5])


@pytest_twisted.ensureDeferred
async def test_ipv6_clients_count_per_64(make_daemon, probed):
    settings = limited()
    settings["server"] = {"trusted_proxies": ["127.0.0.1/32"]}
    daemon = await make_daemon(settings)
    codes = []
    for i in range(7):  # rotating addresses inside one /64 does not help
        xff = {"X-Forwarded-For": f"2001:db8:7:7::{i + 1:x}"}
        codes.append((await call(daemon, "POST", "/api/auth/login", xff))[0].code)
    assert codes == [200] * 5 + [429] * 2
    other = {"X-Forwarded-For": "2001:db8:7:8::1"}
    assert (await call(daemon, "POST", "/api/auth/login", other))[0].code == 200


@pytest_twisted.ensureDeferred
async def test_audited_text_is_bounded_and_printable(make_daemon, probed):
    clock = Clock()
    clock.advance(T0)
    daemon = await make_daemon(limited(calls=1), clock=clock)
    audit = daemon.ctx.rate_limit_middleware.audit = FakeAudit()
    agent = "\x1b[31mevil" + "x" * 5000
    for _ in range(2):
        await call(daemon, "GET", "/api/probe/other", {"User-Agent": agent})
    assert audit.entries[-1]["details"]["user_agent"] == "?[31mevil" + "x" * 247
    clock.advance(61)  # past the per-client sampling interval
    codes = [(await call(daemon, "GET", "/api/cloud/storage/a%0Ab%1B"))[0].code
             for _ in range(51)]
    # the storage rule (50), newline or not; whichever surface answers the first 50
    assert 429 not in codes[:50] and codes[50] == 429
    assert len(audit.entries) == 2
    assert audit.entries[-1]["details"]["endpoint"] == "/api/cloud/storage/a?b?"
    assert audit.entries[-1]["target"] == "/api/cloud/storage/a?b?"
