"""Secrets (S14): env -> file -> AWS Secrets Manager (moto server) -> Vault (OpenBao dev server)."""

from __future__ import annotations

import json
import os

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.logger import formatEvent, globalLogPublisher
from stdaemon.threads import BlockingPool

from stdaemon.secrets.base import ABSENT, DOWN, NOT_FOUND, OK, REFUSED
from stdaemon.secrets.service import REPLICATE_TOKEN, SecretsManager, SecretsService
from stdaemon.config.schema import Config, SecretsConfig, ServerConfig
from tests.secret_stores import BaoServer, MotoServer

TTL = 300.0


@pytest.fixture
def pool():
    from twisted.internet import reactor

    blocking = BlockingPool(reactor, "test-secrets", maxthreads=2)
    blocking.start()
    yield blocking
    pytest_twisted.blockon(blocking.stop())


@pytest.fixture
def state_dir(tmp_path):
    d = tmp_path / "state"
    d.mkdir()
    return d


@pytest.fixture
def logged():
    """Every log event text emitted while the test runs."""
    texts: list[str] = []

    def observer(event):
        try:
            texts.append(formatEvent(event))
        except Exception:  # pragma: no cover - a bad format is still a record
            texts.append(repr(event))
        texts.append(repr({k: v for k, v in event.items() if not k.startswith("log_")}))

    globalLogPublisher.addObserver(observer)
    yield texts
    globalLogPublisher.removeObserver(observer)


@pytest.fixture(scope="module")
def moto():
    server = MotoServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def bao():
    server = BaoServer().start()
    yield server
    server.close()


def make(state_dir, pool, clock, *, environ=None, snapshot=None, **secrets):
    config = Config(
        server=ServerConfig(state_dir=str(state_dir)),
        secrets=SecretsConfig(cache_ttl=TTL, **secrets),
        environ=snapshot or {},
    )
    return SecretsManager(config, clock, pool, environ=environ or {})


def aws_snapshot(moto):
    return {"AWS_ENDPOINT_URL_SECRETS_MANAGER": moto.url, "AWS_DEFAULT_REGION": moto.region}


def write_secrets(path, data, mode=0o600):
    path.write_text(json.dumps(data))
    os.chmod(path, mode)


def store(manager, name):
    return next(s for s in manager.status()["stores"] if s["name"] == name)


# --------------------------------------------------------------------- env + file


@pytest_twisted.ensureDeferred
async def test_environment_wins_over_file(state_dir, pool):
    write_secrets(state_dir / "secrets.json", {REPLICATE_TOKEN: "r8_from_file", "OTHER": "o"})
    m = make(state_dir, pool, task.Clock(), environ={REPLICATE_TOKEN: "r8_from_env"})
    assert await m.get(REPLICATE_TOKEN) == "r8_from_env"
    assert await m.get("OTHER") == "o"
    assert await m.get("MISSING") is None


@pytest_twisted.ensureDeferred
async def test_yaml_file_and_rotation_after_ttl(state_dir, pool):
    path = state_dir / "secrets.yaml"
    path.write_text(f"{REPLICATE_TOKEN}: r8_one\nNUMBER: 42\n")
    os.chmod(path, 0o600)
    clock = task.Clock()
    m = make(state_dir, pool, clock)
    assert await m.get(REPLICATE_TOKEN) == "r8_one"
    assert await m.get("NUMBER") == "42"
    path.write_text(f"{REPLICATE_TOKEN}: r8_two\n")
    clock.advance(TTL - 1)
    assert await m.get(REPLICATE_TOKEN) == "r8_one"  # still cached
    clock.advance(2)
    assert await m.get(REPLICATE_TOKEN) == "r8_two"  # picked up without restart


@pytest_twisted.ensureDeferred
async def test_world_readable_file_is_refused_loudly(state_dir, pool, logged):
    write_secrets(state_dir / "secrets.json", {REPLICATE_TOKEN: "r8_leaky_value"}, mode=0o644)
    m = make(state_dir, pool, task.Clock())
    assert await m.get(REPLICATE_TOKEN) is None
    entry = store(m, "file")
    assert entry["state"] == REFUSED
    assert "chmod 600" in entry["message"]
    report = m.status()
    assert report["status"] == "degraded" and report["token_present"] is False
    assert any("refusing" in t for t in logged)
    assert not any("r8_leaky_value" in t for t in logged)


@pytest_twisted.ensureDeferred
async def test_no_secrets_file_is_not_an_error(state_dir, pool):
    m = make(state_dir, pool, task.Clock(), environ={REPLICATE_TOKEN: "r8_env"})
    assert await m.get("ANYTHING") is None
    assert store(m, "file")["state"] == ABSENT
    report = await m.health()
    assert report["name"] == "secrets"
    assert report["status"] == "healthy", report
    assert report["message"] == "API token configured"


@pytest_twisted.ensureDeferred
async def test_configured_file_missing_is_degraded(state_dir, pool):
    m = make(state_dir, pool, task.Clock(), file=str(state_dir / "nope.json"))
    assert await m.get(REPLICATE_TOKEN) is None
    assert store(m, "file")["state"] == NOT_FOUND
    report = await m.health()
    assert report["status"] == "degraded"
    assert REPLICATE_TOKEN in report["message"]


@pytest_twisted.ensureDeferred
async def test_concurrent_gets_share_one_load(state_dir, pool):
    write_secrets(state_dir / "secrets.json", {"A": "1", "B": "2"})
    m = make(state_dir, pool, task.Clock())
    file_store = m._states[0].store
    calls = []
    original = file_store.load

    def counting():
        calls.append(1)
        return original()

    file_store.load = counting
    from twisted.internet import defer

    values = await defer.gatherResults([m.get("A"), m.get("B"), m.get("A")])
    assert values == ["1", "2", "1"]
    assert len(calls) == 1


# --------------------------------------------------------------------- AWS (moto)


@pytest_twisted.ensureDeferred
async def test_aws_secret_resolves_and_rotates_after_ttl(state_dir, pool, moto):
    moto.put_json("stdaemon/rotate", {REPLICATE_TOKEN: "r8_aws_v1"})
    clock = task.Clock()
    m = make(
        state_dir,
        pool,
        clock,
        environ=dict(MotoServer.credentials),
        snapshot=aws_snapshot(moto),
        aws_secret_name="stdaemon/rotate",
    )
    assert await m.get(REPLICATE_TOKEN) == "r8_aws_v1"
    assert store(m, "aws")["state"] == OK
    assert store(m, "aws")["reachable"] is True
    moto.put_json("stdaemon/rotate", {REPLICATE_TOKEN: "r8_aws_v2"})
    clock.advance(TTL / 2)
    assert await m.get(REPLICATE_TOKEN) == "r8_aws_v1"
    clock.advance(TTL)
    assert await m.get(REPLICATE_TOKEN) == "r8_aws_v2"
    health = await m.health()
    assert health["status"] == "healthy"
    assert "r8_aws" not in json.dumps(m.status())


@pytest_twisted.ensureDeferred
async def test_aws_region_from_config_and_missing_secret(state_dir, pool, moto):
    m = make(
        state_dir,
        pool,
        task.Clock(),
        environ=dict(MotoServer.credentials),
        snapshot={"AWS_ENDPOINT_URL_SECRETS_MANAGER": moto.url},
        aws_secret_name="stdaemon/does-not-exist",
        aws_region=moto.region,
    )
    assert await m.get(REPLICATE_TOKEN) is None
    entry = store(m, "aws")
    assert entry["state"] == NOT_FOUND and entry["reachable"] is True
    assert m.status()["status"] == "degraded"


@pytest_twisted.ensureDeferred
async def test_aws_secret_deleted_is_not_served_any_more(state_dir, pool, moto):
    moto.put_json("stdaemon/deleted", {REPLICATE_TOKEN: "r8_revoked"})
    clock = task.Clock()
    m = make(
        state_dir,
        pool,
        clock,
        environ=dict(MotoServer.credentials),
        snapshot=aws_snapshot(moto),
        aws_secret_name="stdaemon/deleted",
    )
    assert await m.get(REPLICATE_TOKEN) == "r8_revoked"
    moto.client().delete_secret(SecretId="stdaemon/deleted", ForceDeleteWithoutRecovery=True)
    clock.advance(TTL + 1)
    assert await m.get(REPLICATE_TOKEN) is None  # an answer, not an outage: dropped
    assert store(m, "aws")["state"] == NOT_FOUND


@pytest_twisted.ensureDeferred
async def test_aws_secret_that_is_not_json_is_an_error_without_leaking(state_dir, pool, moto, logged):
    moto.client().create_secret(Name="stdaemon/plain", SecretString="r8_plain_secret_value")
    m = make(
        state_dir,
        pool,
        task.Clock(),
        environ=dict(MotoServer.credentials),
        snapshot=aws_snapshot(moto),
        aws_secret_name="stdaemon/plain",
    )
    assert await m.get(REPLICATE_TOKEN) is None
    assert store(m, "aws")["state"] == "error"
    assert "r8_plain_secret_value" not in json.dumps(m.status())
    assert not any("r8_plain_secret_value" in t for t in logged)


@pytest_twisted.ensureDeferred
async def test_aws_down_keeps_last_value_and_degrades(state_dir, pool, logged):
    server = MotoServer().start()
    try:
        server.put_json("stdaemon/down", {REPLICATE_TOKEN: "r8_kept"})
        clock = task.Clock()
        m = make(
            state_dir,
            pool,
            clock,
            environ=dict(MotoServer.credentials),
            snapshot=aws_snapshot(server),
            aws_secret_name="stdaemon/down",
        )
        assert await m.get(REPLICATE_TOKEN) == "r8_kept"
        server.stop()
        clock.advance(TTL + 1)
        assert await m.get(REPLICATE_TOKEN) == "r8_kept"  # keeps what it has
        entry = store(m, "aws")
        assert entry["state"] == DOWN and entry["reachable"] is False and entry["serving_stale"]
        health = await m.health()
        assert health["status"] == "degraded"
        assert "aws" in health["message"]
        assert any("secrets store aws degraded" in t for t in logged)
        assert not any("r8_kept" in t for t in logged)
    finally:
        server.close()


# --------------------------------------------------------------------- Vault (OpenBao)


def vault_env(bao, **extra):
    env = {"VAULT_TOKEN": bao.root_token}
    env.update(extra)
    return env


@pytest_twisted.ensureDeferred
async def test_vault_kv2_token_and_rotation(state_dir, pool, bao):
    bao.put_v2("stdaemon-rot", {REPLICATE_TOKEN: "r8_vault_v1"})
    clock = task.Clock()
    m = make(state_dir, pool, clock, environ=vault_env(bao), vault_addr=bao.url, vault_path="stdaemon-rot")
    assert await m.get(REPLICATE_TOKEN) == "r8_vault_v1"
    entry = store(m, "vault")
    assert entry["state"] == OK and entry["kv_version"] == 2 and entry["auth"] == "token"
    bao.put_v2("stdaemon-rot", {REPLICATE_TOKEN: "r8_vault_v2"})
    clock.advance(TTL - 10)
    assert await m.get(REPLICATE_TOKEN) == "r8_vault_v1"
    clock.advance(11)
    assert await m.get(REPLICATE_TOKEN) == "r8_vault_v2"
    assert "r8_vault" not in json.dumps(m.status())


@pytest_twisted.ensureDeferred
async def test_vault_addr_from_environment_snapshot_and_kv1_fallback(state_dir, pool, bao):
    bao.enable_kv_v1("kvone")
    bao.put_v1("app/simpletuner", {REPLICATE_TOKEN: "r8_kv_one"}, mount="kvone")
    m = make(
        state_dir,
        pool,
        task.Clock(),
        environ=vault_env(bao),
        snapshot={"VAULT_ADDR": bao.url},
        vault_mount="kvone",
        vault_path="app/simpletuner",
    )
    assert await m.get(REPLICATE_TOKEN) == "r8_kv_one"
    assert store(m, "vault")["kv_version"] == 1


@pytest_twisted.ensureDeferred
async def test_vault_approle_login(state_dir, pool, bao):
    bao.put_v2("approle-app", {REPLICATE_TOKEN: "r8_approle"})
    role_id, secret_id = bao.approle("secret", "approle-app")
    clock = task.Clock()
    m = make(
        state_dir,
        pool,
        clock,
        environ={"VAULT_ROLE_ID": role_id, "VAULT_SECRET_ID": secret_id},
        vault_addr=bao.url,
        vault_path="approle-app",
    )
    assert await m.get(REPLICATE_TOKEN) == "r8_approle"
    assert store(m, "vault")["auth"] == "approle"

    # The AppRole token is revoked (or expires): the next refresh logs in again.
    vault_store = m._states[2].store
    bao.client().auth.token.revoke(vault_store._client.token)
    bao.put_v2("approle-app", {REPLICATE_TOKEN: "r8_approle_rotated"})
    clock.advance(TTL + 1)
    assert await m.get(REPLICATE_TOKEN) == "r8_approle_rotated"
    assert store(m, "vault")["state"] == OK


@pytest_twisted.ensureDeferred
async def test_vault_bad_token_is_degraded(state_dir, pool, bao):
    bao.put_v2("simpletuner", {REPLICATE_TOKEN: "r8_default_path"})
    m = make(state_dir, pool, task.Clock(), environ={"VAULT_TOKEN": "not-a-token"}, vault_addr=bao.url)
    assert await m.get(REPLICATE_TOKEN) is None
    entry = store(m, "vault")
    assert entry["state"] == "error" and entry["reachable"] is True
    good = make(state_dir, pool, task.Clock(), environ=vault_env(bao), vault_addr=bao.url)
    assert await good.get(REPLICATE_TOKEN) == "r8_default_path"  # default mount/path


@pytest_twisted.ensureDeferred
async def test_vault_stopped_keeps_value_and_store_down_falls_through(state_dir, pool, moto):
    server = BaoServer().start()
    try:
        server.put_v2("simpletuner", {REPLICATE_TOKEN: "r8_vault_kept", "ONLY_VAULT": "v"})
        clock = task.Clock()
        m = make(state_dir, pool, clock, environ=vault_env(server), vault_addr=server.url)
        assert await m.get(REPLICATE_TOKEN) == "r8_vault_kept"
        server.stop()
        clock.advance(TTL + 1)
        assert await m.get(REPLICATE_TOKEN) == "r8_vault_kept"
        assert store(m, "vault")["state"] == DOWN
        assert (await m.health())["status"] == "degraded"

        # A manager that never reached Vault falls through to AWS for what AWS has.
        moto.put_json("stdaemon/fallthrough", {REPLICATE_TOKEN: "r8_from_aws"})
        cold = make(
            state_dir,
            pool,
            clock,
            environ=dict(MotoServer.credentials, **vault_env(server)),
            snapshot=aws_snapshot(moto),
            aws_secret_name="stdaemon/fallthrough",
            vault_addr=server.url,
        )
        assert await cold.get(REPLICATE_TOKEN) == "r8_from_aws"
        assert await cold.get("ONLY_VAULT") is None
        assert store(cold, "vault")["state"] == DOWN
    finally:
        server.close()


def test_blocking_resolution_for_tools(state_dir):
    from stdaemon.secrets.service import resolve_blocking

    server = BaoServer().start()
    try:
        server.put_v2("tool", {"AUDIT_HMAC_KEY": "k-from-vault"})
        config = Config(
            server=ServerConfig(state_dir=str(state_dir)),
            secrets=SecretsConfig(vault_addr=server.url, vault_path="tool"),
        )
        env = vault_env(server)
        assert resolve_blocking(config, "AUDIT_HMAC_KEY", env) == ("k-from-vault", [])
        assert resolve_blocking(config, "NOT_THERE", env) == (None, [])
        assert resolve_blocking(config, "AUDIT_HMAC_KEY", dict(env, AUDIT_HMAC_KEY="k-env")) == ("k-env", [])
        server.stop()
        value, problems = resolve_blocking(config, "AUDIT_HMAC_KEY", env)
        assert value is None and problems and problems[0].startswith("vault:")
        assert "k-from-vault" not in " ".join(problems)
    finally:
        server.close()


@pytest_twisted.ensureDeferred
async def test_resolution_order_file_then_aws_then_vault(state_dir, pool, moto, bao):
    write_secrets(state_dir / "secrets.json", {"A": "file"})
    moto.put_json("stdaemon/order", {"A": "aws", "B": "aws"})
    bao.put_v2("order", {"A": "vault", "B": "vault", "C": "vault"})
    m = make(
        state_dir,
        pool,
        task.Clock(),
        environ=dict(MotoServer.credentials, **vault_env(bao)),
        snapshot=aws_snapshot(moto),
        aws_secret_name="stdaemon/order",
        vault_addr=bao.url,
        vault_path="order",
    )
    assert [await m.get(k) for k in "ABC"] == ["file", "aws", "vault"]
    assert m.status()["status"] == "degraded"  # no provider token anywhere
    assert [s["state"] for s in m.status()["stores"]] == [OK, OK, OK, OK]


# --------------------------------------------------------------------- the service


@pytest_twisted.ensureDeferred
async def test_service_owns_and_stops_its_thread_pool(state_dir):
    write_secrets(state_dir / "secrets.json", {REPLICATE_TOKEN: "r8_svc"})
    config = Config(server=ServerConfig(state_dir=str(state_dir)))
    svc = SecretsService(config, task.Clock(), reactor=reactor, environ={})
    svc.startService()
    assert svc.pool.started
    assert await svc.manager.get(REPLICATE_TOKEN) == "r8_svc"
    assert svc.pool.maxthreads <= 4
    threads = svc.pool._pool.threads
    assert threads, "the lookup ran in the secrets pool"
    await svc.stopService()
    assert not svc.pool.started
    assert not any(t.is_alive() for t in threads)


# --------------------------------------------------------------------- in the daemon


@pytest_twisted.ensureDeferred
async def test_daemon_uses_token_only_in_vault_and_reports_health(make_daemon, bao, monkeypatch):
    import treq

    monkeypatch.delenv(REPLICATE_TOKEN, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    bao.put_v2("daemon-app", {REPLICATE_TOKEN: "r8_daemon_vault"})
    clock = task.Clock()
    d = await make_daemon(
        settings={"secrets": {"vault_addr": bao.url, "vault_path": "daemon-app", "cache_ttl": 60}},
        clock=clock,
    )
    assert await d.ctx.secrets.get(REPLICATE_TOKEN) == "r8_daemon_vault"
    response = await treq.get(d.url + "/api/cloud/health")
    body = await response.json()
    component = next(c for c in body["components"] if c["name"] == "secrets")
    assert component["status"] == "healthy", component
    assert component["message"] == "API token configured"
    assert "r8_daemon_vault" not in json.dumps(body)

    response = await treq.get(d.url + "/api/admin/secrets")
    assert response.code == 401
    response = await treq.get(d.url + "/api/admin/secrets", headers=d.admin_headers)
    report = await response.json()
    assert response.code == 200
    assert report["token_present"] is True and report["token_source"] == "vault"
    assert next(s for s in report["stores"] if s["name"] == "vault")["reachable"] is True
    assert "r8_daemon_vault" not in json.dumps(report)

    # Rotation in Vault reaches the daemon after the TTL, without a restart.
    bao.put_v2("daemon-app", {REPLICATE_TOKEN: "r8_daemon_rotated"})
    clock.advance(30)
    assert await d.ctx.secrets.get(REPLICATE_TOKEN) == "r8_daemon_vault"
    clock.advance(31)
    assert await d.ctx.secrets.get(REPLICATE_TOKEN) == "r8_daemon_rotated"
