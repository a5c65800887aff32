"""The guide's default rule table, exclusions, path normalisation and custom rule validation."""

import pytest

from stdaemon.ratelimit.rules import DEFAULT_RULES, build_rule_set, normalize_path, parse_rules
from stdaemon.invalid import InvalidValue

RULES = build_rule_set()

# One row per line of the guide's table: (method, path, rule name, calls, period)
TABLE = [
    ("POST", "/api/auth/login", "login", 5, 60),
    ("POST", "/api/auth/register", "register", 3, 60),
    ("POST", "/api/auth/api-keys", "api_keys", 10, 60),
    ("POST", "/api/cloud/jobs/submit", "job_submit", 20, 60),
    ("POST", "/api/cloud/jobs", "job_submit", 20, 60),
    ("POST", "/api/cloud/jobs/abc123/cancel", "job_cancel", 30, 60),
    ("POST", "/api/webhooks/replicate", "webhooks", 100, 60),
    ("GET", "/api/webhooks/replicate", "webhooks", 100, 60),
    ("PUT", "/api/cloud/storage/outputs/job1/model.bin", "storage", 50, 60),
    ("GET", "/api/cloud/storage", "storage", 50, 60),
    ("GET", "/api/quotas/user/1", "quotas", 30, 60),
    ("DELETE", "/api/quotas/x", "quotas", 30, 60),
    ("GET", "/api/cloud/jobs", "default", 100, 60),
    ("GET", "/api/auth/login", "default", 100, 60),
    ("POST", "/api/cloud/jobs/abc/retry", "default", 100, 60),
    ("GET", "/api/audit", "default", 100, 60),
]


@pytest.mark.parametrize("method,path,name,calls,period", TABLE)
def test_default_table(method, path, name, calls, period):
    rule = RULES.match(method, normalize_path(path))
    assert (rule.name, rule.calls, rule.period) == (name, calls, period)


EXCLUDED = [
    ("GET", "/health"),
    ("GET", "/api/cloud/health"),
    ("GET", "/api/cloud/health/live"),
    ("GET", "/api/cloud/health/ready"),
    ("GET", "/api/events/stream"),
    ("GET", "/static/app.js"),
    ("GET", "/api/cloud/hints"),
    ("GET", "/api/users/me"),
    ("GET", "/api/cloud/providers"),
]


@pytest.mark.parametrize("method,path", EXCLUDED)
def test_exclusions(method, path):
    assert RULES.match(method, normalize_path(path)) is None


def test_provider_list_is_excluded_for_get_only():
    assert RULES.match("PUT", "/api/cloud/providers").name == "default"
    assert RULES.match("PUT", "/api/cloud/providers/replicate/config").name == "default"
    assert RULES.match("GET", "/api/cloud/providers/replicate").name == "default"


@pytest.mark.parametrize("raw", [
    "/api/auth//login", "/api/auth/%6Cogin", "/api/auth/./login", "/health/../api/auth/login",
    "/api/auth/login/", "/api/auth/login?x=1", b"/api/auth/login",
])
def test_normalisation_defeats_rule_dodging(raw):
    assert RULES.match("POST", normalize_path(raw)).name == "login"


def test_decoded_newlines_do_not_fall_through_to_a_looser_rule():
    assert RULES.match("PUT", normalize_path("/api/cloud/storage/a%0Ab")).name == "storage"
    assert RULES.match("GET", normalize_path("/api/quotas/%0A")).name == "quotas"


def test_dot_segments_cannot_escape_root():
    assert normalize_path("/../../etc/passwd") == "/etc/passwd"
    assert normalize_path("") == "/"


def test_zero_calls_disables_everything():
    off = build_rule_set(calls=0)
    assert not off.enabled
    assert off.match("POST", "/api/auth/login") is None
    assert build_rule_set(enabled=False).match("POST", "/api/auth/login") is None


def test_default_calls_and_period_from_config():
    rules = build_rule_set(calls="7", period=30)
    rule = rules.match("GET", "/api/audit")
    assert (rule.calls, rule.period) == (7, 30)
    # the guide's table is unchanged
    assert rules.match("POST", "/api/auth/login").calls == 5


def test_custom_rules_come_first_in_all_forms():
    rules = build_rule_set(rules=[
        {"pattern": r"^/api/cloud/expensive$", "calls": 5, "period": 300, "methods": ["post"]},
        (r"^/api/cloud/public$", 1000, 60, None),
        r"^/api/auth/login$ 2 10 POST",
        {"pattern": r"^/api/free$", "calls": 0, "period": 60},
    ])
    assert RULES.match("POST", "/api/cloud/expensive").name == "default"
    r = rules.match("POST", "/api/cloud/expensive")
    assert (r.calls, r.period, r.methods) == (5, 300, frozenset({"POST"}))
    assert rules.match("GET", "/api/cloud/expensive").name == "default"
    assert rules.match("DELETE", "/api/cloud/public").calls == 1000
    assert rules.match("POST", "/api/auth/login").calls == 2
    assert rules.match("GET", "/api/free") is None


@pytest.mark.parametrize("raw,path", [
    ([{"pattern": "(", "calls": 1, "period": 1}], "rate_limit.rules[0].pattern"),
    ([{"calls": 1, "period": 1}], "rate_limit.rules[0].pattern"),
    ([{"pattern": "x", "period": 1}], "rate_limit.rules[0].calls"),
    ([{"pattern": "x", "calls": 1, "period": 1}, {"pattern": "x", "calls": -1, "period": 1}],
     "rate_limit.rules[1].calls"),
    ([{"pattern": "x", "calls": "many", "period": 1}], "rate_limit.rules[0].calls"),
    ([{"pattern": "x", "calls": 1, "period": 0}], "rate_limit.rules[0].period"),
    ([{"pattern": "x", "calls": 10**9, "period": 1}], "rate_limit.rules[0].calls"),
    ([{"pattern": "x", "calls": True, "period": 1}], "rate_limit.rules[0].calls"),
    ([{"pattern": "x", "calls": 1, "period": 1, "methods": ["GE T"]}],
     "rate_limit.rules[0].methods[0]"),
    ([{"pattern": "x", "calls": 1, "period": 1, "methods": 5}], "rate_limit.rules[0].methods"),
    ([{"pattern": "x", "calls": 1, "period": 1, "burst": 3}], "rate_limit.rules[0].burst"),
    ([("x", 1)], "rate_limit.rules[0]"),
    (["just-a-pattern"], "rate_limit.rules[0]"),
    ([42], "rate_limit.rules[0]"),
    ("^/x$ 1 1", "rate_limit.rules"),
])
def test_malformed_rules_name_the_key_path(raw, path):
    with pytest.raises(InvalidValue) as excinfo:
        parse_rules(raw)
    assert excinfo.value.path == path
    assert str(excinfo.value).startswith(path + ":")


def test_malformed_defaults_name_the_key_path():
    with pytest.raises(InvalidValue, match=r"^rate_limit.calls:"):
        build_rule_set(calls=-5)
    with pytest.raises(InvalidValue, match=r"^rate_limit.period:"):
        build_rule_set(period="soon")


def test_every_default_rule_has_a_distinct_bucket_name():
    names = [r.name for r in DEFAULT_RULES]
    assert len(names) == len(set(names))
    assert RULES.bucket(RULES.match("POST", "/api/auth/login"), "203.0.113.9") == "login:203.0.113.9"


def test_client_key_groups_ipv6_by_64():
    from stdaemon.ratelimit.rules import client_key

    assert client_key("203.0.113.9") == "203.0.113.9"
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:ffff::9") == \
        "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:198.51.100.4") == "198.51.100.4"
    assert client_key("unknown") == "unknown"
