"""The outbound HTTP client factory against real parts on loopback.

Real parts: a TLS server (the fake Replicate API) whose certificate comes
from a throwaway trustme CA, Debian's tinyproxy as the CONNECT proxy, and a
plain-HTTP twisted.web server for proxy forwarding.
"""

from __future__ import annotations

import pytest
import pytest_twisted
import trustme
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.logger import globalLogPublisher
from twisted.web import server
from twisted.web.resource import Resource

from stdaemon import __version__
from stdaemon.outbound.connect_proxy import parse_proxy_url
from stdaemon.outbound.http import (
    HTTPClientFactory, OutboundProxyError, OutboundTimeoutError, OutboundTLSError,
)
from stdaemon.outbound.settings import OutboundSettings, outbound_settings, proxy_bypassed, redact_url
from stdaemon.outbound.tls import split_pem_certificates
from tests.fake_replicate import FakeReplicate
from tests.tinyproxy_fixture import tinyproxy, tinyproxy_with_auth  # noqa: F401 (fixtures)

TOKEN = "r8_test_token"


@pytest_twisted.async_yield_fixture
async def fake():
    server_ = await FakeReplicate(reactor).start()
    yield server_
    await server_.stop()


class Settings:
    """Mutable per-provider values, as the provider configuration API keeps them."""

    def __init__(self, environ=None, **values):
        self.values = dict(values)
        self.environ = dict(environ or {})

    def __call__(self, provider):
        return outbound_settings(self.values, self.environ)


def make_factory(settings: Settings, correlation_id="corr-1234"):
    return HTTPClientFactory(reactor, settings, correlation_id=lambda: correlation_id)


async def account(factory, fake_server):
    return await factory.request("replicate", "GET", fake_server.url + "/v1/account",
                                 headers={"Authorization": f"Bearer {TOKEN}"})


# -- pure helpers ------------------------------------------------------------

def test_split_pem_finds_every_certificate():
    cas = [trustme.CA() for _ in range(3)]
    bundle = b"# corporate bundle\n" + b"\n".join(ca.cert_pem.bytes() for ca in cas)
    blocks = split_pem_certificates(bundle)
    assert blocks == [ca.cert_pem.bytes().strip() for ca in cas]


def test_environment_defaults_and_overrides():
    environ = {
        "HTTPS_PROXY": "http://envproxy:3128",
        "HTTP_PROXY": "http://plainproxy:3128",
        "NO_PROXY": "localhost, .internal",
        "SIMPLETUNER_CA_BUNDLE": "/etc/ssl/corp.pem",
        "SIMPLETUNER_SSL_VERIFY": "no",
        "SIMPLETUNER_HTTP_TIMEOUT": "12.5",
    }
    from_env = outbound_settings({}, environ)
    assert from_env == OutboundSettings(
        https_proxy="http://envproxy:3128", http_proxy="http://plainproxy:3128",
        no_proxy=("localhost", ".internal"), ssl_verify=False,
        ssl_ca_bundle="/etc/ssl/corp.pem", http_timeout=12.5)
    overridden = outbound_settings(
        {"proxy_url": "http://apiproxy:8080", "ssl_verify": True, "ssl_ca_bundle": "/x.pem",
         "http_timeout": 60}, environ)
    assert overridden.https_proxy == overridden.http_proxy == "http://apiproxy:8080"
    assert overridden.ssl_verify is True
    assert overridden.ssl_ca_bundle == "/x.pem"
    assert overridden.http_timeout == 60.0
    assert outbound_settings({}, {}).http_timeout == 30.0
    # An empty proxy_url saved through the API means "no proxy", even with HTTPS_PROXY set.
    assert outbound_settings({"proxy_url": ""}, environ).https_proxy == ""


@pytest.mark.parametrize("host,port,no_proxy,expected", [
    ("api.replicate.com", 443, ("*",), True),
    ("api.replicate.com", 443, ("replicate.com",), True),
    ("api.replicate.com", 443, (".replicate.com",), True),
    ("notreplicate.com", 443, ("replicate.com",), False),
    ("10.1.2.3", 443, ("10.0.0.0/8",), True),
    ("11.1.2.3", 443, ("10.0.0.0/8",), False),
    ("127.0.0.1", 8443, ("127.0.0.1:8443",), True),
    ("127.0.0.1", 9443, ("127.0.0.1:8443",), False),
    ("api.replicate.com", 443, (), False),
])
def test_no_proxy_matching(host, port, no_proxy, expected):
    assert proxy_bypassed(host, port, no_proxy) is expected


def test_proxy_url_parsing_and_redaction():
    target = parse_proxy_url("http://user%40corp:p%3Ass@proxy.corp:3128")
    assert (target.scheme, target.host, target.port) == ("http", "proxy.corp", 3128)
    assert target.authorization == b"Basic dXNlckBjb3JwOnA6c3M="
    assert parse_proxy_url("http://proxy").port == 80
    for bad in ("proxy:3128", "ftp://proxy", "http://"):
        with pytest.raises(ValueError):
            parse_proxy_url(bad)
    assert redact_url("http://u:secret@proxy:1") == "http://u:***@proxy:1"
    assert "secret" not in redact_url("http://u:secret@proxy:1")


# -- TLS trust -------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_tls_with_ca_bundle_sends_user_agent_and_correlation_id(fake, tmp_path):
    bundle = fake.write_ca_bundle(tmp_path / "ca.pem")
    factory = make_factory(Settings(ssl_ca_bundle=bundle))
    try:
        response = await account(factory, fake)
    finally:
        await factory.close()
    assert response.status == 200
    assert response.json()["username"] == "stdaemon-tests"
    seen = fake.state.requests[-1].headers
    assert seen["user-agent"] == f"stdaemon/{__version__}"
    assert seen["x-correlation-id"] == "corr-1234"


@pytest_twisted.ensureDeferred
async def test_tls_without_ca_bundle_fails_with_clear_error(fake):
    factory = make_factory(Settings())
    try:
        with pytest.raises(OutboundTLSError) as caught:
            await account(factory, fake)
    finally:
        await factory.close()
    message = str(caught.value)
    assert "certificate verify failed" in message
    assert "ssl_ca_bundle" in message
    assert fake.state.requests == []


@pytest_twisted.ensureDeferred
async def test_bundle_with_several_certificates_trusts_all(fake, tmp_path):
    other_cas = [trustme.CA() for _ in range(2)]
    # The server's CA is the LAST of three: loading only the first would fail.
    bundle = fake.write_ca_bundle(tmp_path / "bundle.pem", *(ca.cert_pem.bytes() for ca in other_cas))
    factory = make_factory(Settings(ssl_ca_bundle=bundle))
    try:
        response = await account(factory, fake)
        assert response.status == 200
        # And a second server whose CA is the FIRST certificate of that same bundle.
        second = FakeReplicate(reactor)
        second.ca = other_cas[0]
        second.cert = other_cas[0].issue_cert("127.0.0.1")
        await second.start()
        try:
            response = await account(factory, second)
        finally:
            await second.stop()
        assert response.status == 200
    finally:
        await factory.close()


@pytest_twisted.ensureDeferred
async def test_hostname_is_verified_even_with_trusted_ca(fake, tmp_path):
    # Certificate issued for another name by the trusted CA: must be refused.
    fake.cert = fake.ca.issue_cert("other.example")
    await fake.stop()
    await fake.start()
    bundle = fake.write_ca_bundle(tmp_path / "ca.pem")
    factory = make_factory(Settings(ssl_ca_bundle=bundle))
    try:
        with pytest.raises(OutboundTLSError, match="does not match the host name"):
            await account(factory, fake)
    finally:
        await factory.close()


@pytest_twisted.ensureDeferred
async def test_ssl_verify_false_connects_and_logs_a_warning(fake):
    events = []
    globalLogPublisher.addObserver(events.append)
    factory = make_factory(Settings(ssl_verify=False))
    try:
        response = await account(factory, fake)
    finally:
        globalLogPublisher.removeObserver(events.append)
        await factory.close()
    assert response.status == 200
    warnings = [e for e in events if e.get("log_namespace") == "stdaemon.clients.http"
                and "DISABLED" in e.get("log_format", "")]
    assert warnings and warnings[0]["log_level"].name == "warn"


@pytest_twisted.ensureDeferred
async def test_missing_ca_bundle_is_a_clear_error(fake, tmp_path):
    factory = make_factory(Settings(ssl_ca_bundle=str(tmp_path / "nope.pem")))
    try:
        with pytest.raises(OutboundTLSError, match="does not exist"):
            await account(factory, fake)
    finally:
        await factory.close()


# -- the CONNECT proxy -----------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_through_tinyproxy_works_only_with_ca_bundle(fake, tinyproxy, tmp_path):
    port = fake.port.getHost().port
    settings = Settings(proxy_url=tinyproxy.url)
    factory = make_factory(settings)
    try:
        with pytest.raises(OutboundTLSError, match="certificate verify failed"):
            await account(factory, fake)
        assert f"CONNECT 127.0.0.1:{port} HTTP/1.1" in tinyproxy.log_text()
        assert fake.state.requests == []

        settings.values["ssl_ca_bundle"] = fake.write_ca_bundle(tmp_path / "ca.pem")
        response = await account(factory, fake)  # the very next call uses the bundle
    finally:
        await factory.close()
    assert response.status == 200
    assert tinyproxy.log_text().count(f"CONNECT 127.0.0.1:{port} HTTP/1.1") == 2


@pytest_twisted.ensureDeferred
async def test_proxy_url_change_applies_to_next_call(fake, tinyproxy, tmp_path):
    port = fake.port.getHost().port
    settings = Settings(ssl_ca_bundle=fake.write_ca_bundle(tmp_path / "ca.pem"))
    factory = make_factory(settings)
    try:
        assert (await account(factory, fake)).status == 200
        assert "): CONNECT " not in tinyproxy.log_text()
        settings.values["proxy_url"] = tinyproxy.url
        assert (await account(factory, fake)).status == 200
        assert f"CONNECT 127.0.0.1:{port}" in tinyproxy.log_text()
    finally:
        await factory.close()


@pytest_twisted.ensureDeferred
async def test_https_proxy_environment_default_and_no_proxy(fake, tinyproxy, tmp_path):
    port = fake.port.getHost().port
    bundle = fake.write_ca_bundle(tmp_path / "ca.pem")
    settings = Settings(environ={"HTTPS_PROXY": tinyproxy.url, "SIMPLETUNER_CA_BUNDLE": bundle})
    factory = make_factory(settings)
    try:
        assert (await account(factory, fake)).status == 200
        assert tinyproxy.log_text().count(f"CONNECT 127.0.0.1:{port}") == 1
        settings.environ["NO_PROXY"] = "localhost,127.0.0.1"
        assert (await account(factory, fake)).status == 200
        assert tinyproxy.log_text().count(f"CONNECT 127.0.0.1:{port}") == 1
    finally:
        await factory.close()


@pytest_twisted.ensureDeferred
async def test_proxy_credentials(fake, tinyproxy_with_auth, tmp_path):
    proxy = tinyproxy_with_auth
    bundle = fake.write_ca_bundle(tmp_path / "ca.pem")
    settings = Settings(ssl_ca_bundle=bundle, proxy_url=f"http://127.0.0.1:{proxy.port}")
    factory = make_factory(settings)
    try:
        with pytest.raises(OutboundProxyError, match="407"):
            await account(factory, fake)
        settings.values["proxy_url"] = proxy.url  # with user:password
        assert (await account(factory, fake)).status == 200
    finally:
        await factory.close()
    assert "CONNECT 127.0.0.1:" in proxy.log_text()


class _Plain(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.seen = []

    def render_GET(self, request):
        self.seen.append(dict((k.decode().lower(), v[0].decode())
                              for k, v in request.requestHeaders.getAllRawHeaders()))
        return b'{"ok": true}'


@pytest_twisted.ensureDeferred
async def test_plain_http_is_forwarded_through_proxy(tinyproxy):
    resource = _Plain()
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(server.Site(resource))
    factory = make_factory(Settings(proxy_url=tinyproxy.url))
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/v1/ping"
        response = await factory.request("replicate", "GET", url)
    finally:
        await factory.close()
        await port.stopListening()
    assert response.json() == {"ok": True}
    log = tinyproxy.log_text()
    assert f"GET {url} HTTP/1.1" in log
    assert "): CONNECT " not in log
    assert resource.seen[0]["user-agent"] == f"stdaemon/{__version__}"


# -- timeouts ---------------------------------------------------------------

@pytest_twisted.ensureDeferred
async def test_stalling_server_times_out(fake, tmp_path):
    fake.state.mode = "stall"
    settings = Settings(ssl_ca_bundle=fake.write_ca_bundle(tmp_path / "ca.pem"), http_timeout=0.5)
    factory = make_factory(settings)
    try:
        with pytest.raises(OutboundTimeoutError, match="http_timeout"):
            await account(factory, fake)
    finally:
        await factory.close()
    assert len(fake.state.stalled) == 1  # the request did arrive; the answer never came


@pytest_twisted.ensureDeferred
async def test_stalling_server_times_out_through_the_tunnel(fake, tinyproxy, tmp_path):
    fake.state.mode = "stall"
    settings = Settings(ssl_ca_bundle=fake.write_ca_bundle(tmp_path / "ca.pem"),
                        proxy_url=tinyproxy.url, http_timeout=0.5)
    factory = make_factory(settings)
    try:
        with pytest.raises(OutboundTimeoutError):
            await account(factory, fake)
    finally:
        await factory.close()
    assert "CONNECT 127.0.0.1:" in tinyproxy.log_text()
