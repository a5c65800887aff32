"""Shared fixtures: a real daemon on a loopback port with a temp state dir.

Also turns two classic silent failures into errors: an ``async def`` test that
pytest would never await, and a coroutine that was never awaited.
"""

from __future__ import annotations

import inspect
import os
import warnings

import pytest
import pytest_twisted
import yaml

from stdaemon.config import load_config
from tests.postgres_fixture import engine_conn, make_database, postgres_server, postgres_url  # noqa: F401

warnings.filterwarnings("error", message=".*was never awaited", category=RuntimeWarning)


def pytest_collection_modifyitems(config, items):
    for item in items:
        function = getattr(item, "function", None)
        if function is None:
            continue
        original = inspect.unwrap(function)
        if inspect.iscoroutinefunction(function) and inspect.iscoroutinefunction(original) \
                and not getattr(function, "_pytest_twisted_mark", None) \
                and function is original:
            item.add_marker(pytest.mark.usefixtures("_refuse_unawaited_async"))


@pytest.fixture
def _refuse_unawaited_async(request):
    pytest.fail(f"{request.node.nodeid} is an async test without @pytest_twisted.ensureDeferred: "
                "it would never run")


class RunningDaemon:
    def __init__(self, service, tmp_path):
        self.service = service
        self.ctx = service.ctx
        self.tmp_path = tmp_path
        port = service.ports[0].getHost().port
        self.port = port
        scheme = "https" if service.config.server.ssl_cert else "http"
        self.url = f"{scheme}://127.0.0.1:{port}"
        with open(self.ctx.path("config", "cloud", "admin.key")) as fh:
            self.admin_key = fh.read().strip()

    @property
    def admin_headers(self) -> dict:
        return {"X-API-Key": self.admin_key}


def build_config(tmp_path, settings: dict | None = None, env: dict | None = None):
    """A config with a temp state dir, an ephemeral loopback port and
    ``settings`` (nested dict as in the YAML file) on top."""
    data = {"server": {"listen": ["tcp:0:interface=127.0.0.1"]}}
    for section, values in (settings or {}).items():
        data.setdefault(section, {}).update(values)
    path = os.path.join(str(tmp_path), "stdaemon-test.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh)
    environ = {"SIMPLETUNER_STATE_DIR": os.path.join(str(tmp_path), "state")}
    environ.update(env or {})
    return load_config(path, environ=environ).config


@pytest.fixture
def make_daemon(tmp_path):
    """``await make_daemon(settings=None, env=None)`` → RunningDaemon (stopped at teardown)."""
    from twisted.internet import reactor

    from stdaemon.service import StdaemonService

    started = []

    async def make(settings: dict | None = None, env: dict | None = None, clock=None,
                   subdir: str | None = None):
        base = tmp_path / subdir if subdir else tmp_path
        base.mkdir(parents=True, exist_ok=True)
        config = build_config(base, settings, env)
        service = StdaemonService(config, reactor, clock)
        service.startService()
        started.append(service)
        await service.started
        return RunningDaemon(service, base)

    yield make

    for service in reversed(started):
        if service.running:
            pytest_twisted.blockon(service.stopService())


@pytest.fixture
def daemon(make_daemon):
    """A daemon on embedded defaults (plus a temp state dir and port 0)."""
    from twisted.internet import defer

    return pytest_twisted.blockon(defer.ensureDeferred(make_daemon()))


@pytest_twisted.async_yield_fixture
async def env(make_daemon, tmp_path):
    """A daemon wired to the TLS fake Replicate (tests/replicate_env.py), stopped afterwards.
    A test module that needs other settings defines its own ``env``."""
    from tests.replicate_env import start_env

    environment = await start_env(make_daemon, tmp_path)
    yield environment
    await environment.fake.stop()
