"""Job submission takes REPLICATE_API_TOKEN from Vault or AWS Secrets Manager, rotation included.

Real parts: the daemon on a real port, the OpenBao dev server, moto's server,
and the TLS fake Replicate that checks the bearer token.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet.task import Clock

from stdaemon.secrets.service import REPLICATE_TOKEN
from tests.fake_replicate import FakeReplicateState
from tests.replicate_env import start_env
from tests.secret_stores import BaoServer, MotoServer

TTL = 120


@pytest.fixture(scope="module")
def bao():
    server = BaoServer().start()
    yield server
    server.close()


@pytest.fixture(scope="module")
def moto():
    server = MotoServer().start()
    yield server
    server.close()


async def _submit_and_check(environment, token):
    response, body = await environment.submit()
    assert response.code == 200, body
    sent = environment.fake.state.requests_to("POST", "/v1/predictions")[-1]
    assert sent.headers["authorization"] == f"Bearer {token}"
    return body


async def _rotation(environment, clock, put):
    fake = environment.fake.state
    await _submit_and_check(environment, fake.token)

    # Rotate at the provider and in the store: the daemon still holds the old token...
    fake.token = "r8_rotated_token"
    put(fake.token)
    clock.advance(TTL / 2)
    response, body = await environment.submit()
    assert response.code != 200
    assert environment.fake.state.requests_to("POST", "/v1/predictions")[-1].headers["authorization"] \
        != "Bearer r8_rotated_token"
    # ...until the TTL passes: no restart needed.
    clock.advance(TTL)
    await _submit_and_check(environment, "r8_rotated_token")


@pytest_twisted.ensureDeferred
async def test_token_only_in_vault_is_used_and_rotation_applies_after_ttl(make_daemon, tmp_path, bao,
                                                                          monkeypatch):
    monkeypatch.delenv(REPLICATE_TOKEN, raising=False)
    monkeypatch.setenv("VAULT_TOKEN", bao.root_token)
    bao.put_v2("jobs-e2e", {REPLICATE_TOKEN: FakeReplicateState.token})
    clock = Clock()
    clock.advance(1_700_000_000)
    environment = await start_env(
        make_daemon, tmp_path, clock=clock,
        settings={"secrets": {"file": "", "vault_addr": bao.url, "vault_path": "jobs-e2e", "cache_ttl": TTL}},
    )
    try:
        await _rotation(environment, clock, lambda token: bao.put_v2("jobs-e2e", {REPLICATE_TOKEN: token}))
        assert environment.ctx.secrets.source(REPLICATE_TOKEN) == "vault"
    finally:
        await environment.fake.stop()


@pytest_twisted.ensureDeferred
async def test_token_only_in_aws_secrets_manager_is_used_and_rotates(make_daemon, tmp_path, moto, monkeypatch):
    monkeypatch.delenv(REPLICATE_TOKEN, raising=False)
    for name, value in MotoServer.credentials.items():
        monkeypatch.setenv(name, value)
    moto.put_json("stdaemon/jobs-e2e", {REPLICATE_TOKEN: FakeReplicateState.token})
    clock = Clock()
    clock.advance(1_700_000_000)
    environment = await start_env(
        make_daemon, tmp_path, clock=clock,
        env={"AWS_ENDPOINT_URL_SECRETS_MANAGER": moto.url, "AWS_DEFAULT_REGION": moto.region},
        settings={"secrets": {"file": "", "aws_secret_name": "stdaemon/jobs-e2e", "cache_ttl": TTL}},
    )
    try:
        await _rotation(environment, clock,
                        lambda token: moto.put_json("stdaemon/jobs-e2e", {REPLICATE_TOKEN: token}))
        assert environment.ctx.secrets.source(REPLICATE_TOKEN) == "aws"
    finally:
        await environment.fake.stop()
