"""The Replicate client against the TLS fake (and a stub for clock-driven retries)."""

from __future__ import annotations

import pytest
import pytest_twisted
from twisted.internet import reactor, task
from twisted.internet.task import Clock
from twisted.web.http_headers import Headers

from stdaemon.outbound.http import HTTPClientFactory, OutboundResponse, OutboundTimeoutError
from stdaemon.outbound.settings import outbound_settings
from stdaemon.providers.replicate import (
    CircuitOpenError, ProviderAPIError, ProviderNotConfigured, ProviderUnavailable,
    ReplicateClient,
)
from stdaemon.outbound.breaker import CLOSED, HALF_OPEN, OPEN, BreakerSettings, CircuitBreaker
from stdaemon.outbound.retry import RetryPolicy
from tests.fake_replicate import FakeReplicate

FAST_RETRY = RetryPolicy(base_delay=0.01, max_delay=0.05, max_retry_after=0.5)


@pytest_twisted.async_yield_fixture
async def env(tmp_path):
    fake = await FakeReplicate(reactor).start()
    values = {"ssl_ca_bundle": fake.write_ca_bundle(tmp_path / "ca.pem"), "http_timeout": 5}
    factory = HTTPClientFactory(reactor, lambda p: outbound_settings(values, {}),
                                correlation_id=lambda: "corr-rep")
    breaker = CircuitBreaker("replicate", reactor, BreakerSettings(recovery_timeout=0.3))
    client = ReplicateClient(factory, breaker, reactor, token=lambda: fake.state.token,
                             api_base_url=lambda: fake.url, retry_policy=FAST_RETRY)
    yield fake, client, values
    breaker.stop()
    await factory.close()
    await fake.stop()


@pytest_twisted.ensureDeferred
async def test_create_get_logs_cancel(env):
    fake, client, _ = env
    prediction = await client.create_prediction(
        "abc123", {"config_json": "{}", "dataloader_json": "[]"},
        webhook="https://daemon.example/api/webhooks/replicate",
        webhook_events_filter=["start", "completed"])
    assert prediction["status"] == "starting"
    sent = fake.state.requests[-1]
    assert sent.method == "POST" and sent.path == "/v1/predictions"
    assert sent.headers["authorization"] == "Bearer r8_test_token"
    assert sent.headers["x-correlation-id"] == "corr-rep"
    assert sent.body == {"version": "abc123", "input": {"config_json": "{}", "dataloader_json": "[]"},
                         "webhook": "https://daemon.example/api/webhooks/replicate",
                         "webhook_events_filter": ["start", "completed"]}

    fake.state.set_status(prediction["id"], "processing", logs="step 1/100\n")
    got = await client.get_prediction(prediction["id"])
    assert got["status"] == "processing"
    assert await client.get_logs(prediction["id"]) == "step 1/100\n"

    cancelled = await client.cancel_prediction(prediction["id"])
    assert cancelled["status"] == "canceled"
    assert await client.cancel_prediction("does-not-exist") is None  # 404 = done


@pytest_twisted.ensureDeferred
async def test_account_and_provider_errors_carry_replicate_detail(env):
    fake, client, _ = env
    assert (await client.account())["username"] == "stdaemon-tests"
    assert (await client.webhook_secret()).startswith("whsec_")
    with pytest.raises(ProviderAPIError) as caught:
        await client.create_prediction("forbidden-version", {})
    assert caught.value.status == 403
    assert caught.value.message == "You do not have permission to use this model version"
    with pytest.raises(ProviderAPIError) as caught:
        await client.get_prediction("nope")
    assert caught.value.status == 404
    client._token = lambda: "r8_wrong_token"
    with pytest.raises(ProviderAPIError) as caught:
        await client.account()
    assert caught.value.status == 401 and "authentication token" in caught.value.message
    assert client.breaker.state == CLOSED  # 4xx answers are not provider failures


@pytest_twisted.ensureDeferred
async def test_missing_token_is_a_clear_error(env):
    fake, client, _ = env
    client._token = lambda: None
    with pytest.raises(ProviderNotConfigured, match="REPLICATE_API_TOKEN"):
        await client.account()
    assert fake.state.requests == []


@pytest_twisted.ensureDeferred
async def test_get_is_retried_three_times_post_never(env):
    fake, client, _ = env
    fake.state.mode = "fail"
    with pytest.raises(ProviderAPIError) as caught:
        await client.get_prediction("x")
    assert caught.value.status == 500
    assert len(fake.state.requests_to("GET", "/v1/predictions/x")) == 3
    with pytest.raises(ProviderAPIError):
        await client.create_prediction("v", {})
    assert len(fake.state.requests_to("POST", "/v1/predictions")) == 1


@pytest_twisted.ensureDeferred
async def test_timeout_surfaces_as_unavailable(env):
    fake, client, values = env
    fake.state.mode = "stall"
    values["http_timeout"] = 0.3
    with pytest.raises(ProviderUnavailable, match="http_timeout") as caught:
        await client.create_prediction("v", {})
    assert caught.value.kind == "timeout"
    assert client.breaker.consecutive_failures == 1


@pytest_twisted.ensureDeferred
async def test_failing_server_opens_breaker_fails_fast_and_half_opens_in_real_time(env):
    fake, client, _ = env
    fake.state.mode = "fail"
    for _ in range(5):
        with pytest.raises(ProviderAPIError):
            await client.create_prediction("v", {})
    assert client.breaker.state == OPEN
    assert len(fake.state.requests) == 5
    with pytest.raises(CircuitOpenError):
        await client.create_prediction("v", {})
    assert len(fake.state.requests) == 5  # rejected without touching the server
    # The real reactor timer moves it to half-open after the (short) cool-down.
    await task.deferLater(reactor, 0.4)
    assert client.breaker.state == HALF_OPEN
    fake.state.mode = "ok"
    await client.account()
    assert client.breaker.state == HALF_OPEN
    await client.account()
    assert client.breaker.state == CLOSED


# -- clock-driven retries with a stub transport ---------------------------

class StubHTTP:
    def __init__(self, answers):
        self.answers = list(answers)
        self.calls = []

    async def request(self, provider, method, url, **kwargs):
        self.calls.append((method, url))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers, body = answer
        return OutboundResponse(status, Headers({k: [v] for k, v in headers.items()}), body)


def test_retry_after_is_honoured_on_the_injected_clock():
    clock = Clock()
    stub = StubHTTP([(429, {"Retry-After": "7"}, b'{"detail": "throttled"}'),
                     (200, {}, b'{"id": "p1", "status": "processing"}')])
    client = ReplicateClient(stub, CircuitBreaker("replicate", clock), clock, token=lambda: "t",
                             api_base_url=lambda: "https://api.example", rand=lambda: 0.0)
    from twisted.internet import defer

    result = defer.ensureDeferred(client.get_prediction("p1"))
    assert len(stub.calls) == 1 and not result.called
    clock.advance(6.9)
    assert len(stub.calls) == 1
    clock.advance(0.1)
    assert len(stub.calls) == 2
    assert result.result["status"] == "processing"


def test_connection_errors_on_get_back_off_then_give_up():
    from twisted.internet import defer
    clock = Clock()
    stub = StubHTTP([OutboundTimeoutError("no response")] * 3)
    breaker = CircuitBreaker("replicate", clock)
    client = ReplicateClient(stub, breaker, clock, token=lambda: "t",
                             api_base_url=lambda: "https://api.example", rand=lambda: 0.0)
    result = defer.ensureDeferred(client.get_prediction("p1"))
    clock.advance(0.5)   # first backoff
    clock.advance(1.0)   # second backoff
    assert len(stub.calls) == 3
    failure = result.result
    assert isinstance(failure.value, ProviderUnavailable)
    result.addErrback(lambda _f: None)
    assert breaker.consecutive_failures == 3


def test_tls_and_proxy_auth_errors_do_not_trip_the_breaker():
    from twisted.internet import defer

    from stdaemon.outbound.http import OutboundProxyError, OutboundTLSError

    clock = Clock()
    stub = StubHTTP([OutboundTLSError("certificate verify failed")] * 5
                    + [OutboundProxyError("proxy refused CONNECT: 407", 407)] * 5)
    breaker = CircuitBreaker("replicate", clock)
    client = ReplicateClient(stub, breaker, clock, token=lambda: "t",
                             api_base_url=lambda: "https://api.example")
    kinds = []
    for _ in range(10):
        result = defer.ensureDeferred(client.create_prediction("v", {}))
        kinds.append(result.result.value.kind)
        result.addErrback(lambda _f: None)
    assert kinds == ["tls"] * 5 + ["proxy"] * 5
    assert breaker.state == CLOSED and breaker.consecutive_failures == 0
