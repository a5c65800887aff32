"""Configuration: YAML/INI parity, layering, errors with key paths, examples."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from stdaemon.config import load_config
from stdaemon.invalid import InvalidValue
from stdaemon.config.schema import SECTIONS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = [os.path.join(ROOT, "config", "stdaemon.yaml"), os.path.join(ROOT, "config", "stdaemon.ini")]


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_embedded_defaults():
    config = load_config(None, environ={}).config
    assert config.server.listen == ("tcp:8080:interface=127.0.0.1",)
    assert config.server.state_dir == "~/.simpletuner"
    assert config.rate_limit.backend == "memory"
    assert config.metrics.prometheus_enabled is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.public_url = "x"  # type: ignore[misc]


@pytest.mark.parametrize("path", EXAMPLES)
def test_example_files_document_every_key_with_its_default(path):
    text = open(path).read()
    defaults = load_config(None, environ={}).config
    loaded = load_config(path, environ={})
    assert loaded.warnings == []
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            assert f"{field.name}" in text, f"{section}.{field.name} is not documented in {path}"
        assert getattr(loaded.config, section) == getattr(defaults, section), section


def test_yaml_and_ini_give_the_same_config(tmp_path):
    yaml_path = write(tmp_path, "a.yaml", """
server:
  listen: ["tcp:9000:interface=127.0.0.1", "tcp:9001"]
  trusted_proxies: ["10.0.0.0/8"]
rate_limit:
  calls: 7
  rules:
    - {pattern: "^/x$", calls: 5, period: 300, methods: [POST]}
metrics:
  prometheus_categories: [jobs, audit]
backup:
  interval: 6h
""")
    ini_path = write(tmp_path, "a.ini", """
[server]
listen = tcp:9000:interface=127.0.0.1, tcp:9001
trusted_proxies = 10.0.0.0/8
[rate_limit]
calls = 7
rules = ^/x$|5|300|POST
[metrics]
prometheus_categories = jobs, audit
[backup]
interval = 21600
""")
    a = load_config(yaml_path, environ={}).config
    b = load_config(ini_path, environ={}).config
    for section in SECTIONS:
        assert getattr(a, section) == getattr(b, section), section
    assert a.backup.interval == 21600.0
    assert a.rate_limit.rules[0]["methods"] == ("POST",)


def test_environment_overrides_file_and_cli_overrides_both(tmp_path):
    path = write(tmp_path, "c.yaml", "logging: {level: INFO, format: text}\nrate_limit: {calls: 10}\n")
    env = {"SIMPLETUNER_LOG_FORMAT": "json", "RATE_LIMIT_CALLS": "0",
           "SIMPLETUNER_STATE_DIR": "/srv/st", "SIMPLETUNER_PUBLIC_URL": "https://st.example.com/"}
    result = load_config(path, environ=env, overrides={"server.listen": ["tcp:1234"]})
    config = result.config
    assert config.logging.format == "json"
    assert config.rate_limit.calls == 0
    assert config.server.state_dir == "/srv/st"
    assert config.server.public_url == "https://st.example.com"
    assert config.server.listen == ("tcp:1234",)
    assert config.sources["logging.format"] == "env"
    assert config.sources["logging.level"] == "file"
    assert config.sources["server.listen"] == "cli"


@pytest.mark.parametrize("text, path", [
    ("rate_limit: {backend: memcached}", "rate_limit.backend"),
    ("server: {trusted_proxies: ['10.0.0.0/8', 'not-a-cidr']}", "server.trusted_proxies[1]"),
    ("server: {listen: ['http://0.0.0.0']}", "server.listen[0]"),
    ("server: {listen: []}", "server.listen"),
    ("server: {max_body_bytes: -1}", "server.max_body_bytes"),
    ("rate_limit: {calls: lots}", "rate_limit.calls"),
    ("rate_limit: {rules: [{pattern: '(', calls: 1, period: 1}]}", "rate_limit.rules[0].pattern"),
    ("rate_limit: {rules: [{pattern: 'x', calls: 1, period: 0}]}", "rate_limit.rules[0].period"),
    ("metrics: {prometheus_categories: [jobs, bogus]}", "metrics.prometheus_categories"),
    ("logging: {level: LOUD}", "logging.level"),
    ("server: {public_url: 'example.com'}", "server.public_url"),
    ("server: {ssl_cert: /x.pem}", "server.ssl_key"),
    ("jobs: {poll_interval: 0}", "jobs.poll_interval"),
    ("server: [1, 2]", "server"),
    ("providers: {replicate: {http_timeout: 0}}", "providers.replicate.http_timeout"),
    ("providers: {replicate: {webhook_allowed_ips: ['10.0.0.0/33']}}",
     "providers.replicate.webhook_allowed_ips"),
    ("providers: {replicate: {proxy_url: 'proxy:8080'}}", "providers.replicate.proxy_url"),
    ("providers: {replicate: {ssl_ca_bundle: /nonexistent/ca.pem}}", "providers.replicate.ssl_ca_bundle"),
    ("rate_limit: {rules: [{pattern: 'x', calls: 10000000, period: 1}]}",
     "rate_limit.rules[0].calls"),
])
def test_errors_name_the_key_path(tmp_path, text, path):
    config_path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(InvalidValue) as info:
        load_config(config_path, environ={})
    assert info.value.path == path


def test_environment_errors_name_the_key(tmp_path):
    with pytest.raises(InvalidValue) as info:
        load_config(None, environ={"RATE_LIMIT_PERIOD": "soon"})
    assert info.value.path == "rate_limit.period"


def test_unknown_keys_are_warned_about(tmp_path):
    path = write(tmp_path, "u.yaml", "server: {listen: ['tcp:1'], colour: blue}\nfrobnicate: {}\n")
    result = load_config(path, environ={})
    assert any("server.colour" in w for w in result.warnings)
    assert any("frobnicate" in w for w in result.warnings)


def test_broken_files_are_reported(tmp_path):
    with pytest.raises(InvalidValue):
        load_config(write(tmp_path, "b.yaml", "server: [unclosed"), environ={})
    with pytest.raises(InvalidValue):
        load_config(write(tmp_path, "b.ini", "no section header"), environ={})
    with pytest.raises(InvalidValue):
        load_config(write(tmp_path, "b.toml", ""), environ={})
    with pytest.raises(InvalidValue):
        load_config(str(tmp_path / "missing.yaml"), environ={})


def twistd(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "twisted", "--help"] if args == ("--help",) else
        [os.path.join(os.path.dirname(sys.executable), "twistd"), "-n", "--pidfile=", "stdaemon", *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_check_config_exits_zero_on_a_good_file_and_nonzero_naming_the_key(tmp_path):
    good = twistd("--config", EXAMPLES[0], "--check-config")
    assert good.returncode == 0, good.stderr
    assert "configuration OK" in good.stdout
    bad = twistd("--config", write(tmp_path, "bad.yaml", "rate_limit: {backend: memcached}"),
                 "--check-config")
    assert bad.returncode != 0
    assert "rate_limit.backend" in bad.stdout + bad.stderr
    assert "Traceback" not in bad.stdout + bad.stderr
