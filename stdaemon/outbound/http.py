"""The one outbound HTTP client factory (S3).

Every call stdaemon makes to a provider goes through :class:`HTTPClientFactory`.
For each provider it builds a treq ``HTTPClient`` from the provider's
*effective* outbound settings (:class:`OutboundSettings`):

* ``https://`` targets through a proxy use an HTTP ``CONNECT`` tunnel
  (:mod:`stdaemon.outbound.connect_proxy`) with TLS end to end inside it;
  ``http://`` targets through a proxy are forwarded plainly (absolute URI on
  the request line, Twisted's ``ProxyAgent``).  Proxy credentials from the
  proxy URL are sent as ``Proxy-Authorization: Basic``.  ``NO_PROXY`` entries
  (``*``, host names, ``.suffix``, IPs, CIDRs, optional ``:port``) bypass it.
* TLS: hostname verification always, against the platform trust store or,
  when ``ssl_ca_bundle`` is set, against *every* certificate in that PEM file
  (``Certificate.loadPEM`` reads only the first one, so the bundle is split).
  ``ssl_verify=False`` turns verification off and logs a warning.
* ``http_timeout`` bounds every call: connecting (through the proxy and the
  tunnel), sending, and reading the whole response body.
* Every request carries ``User-Agent: stdaemon/<version>`` and the current
  ``X-Correlation-ID``.

The settings (:mod:`stdaemon.outbound.settings`), the CA bundle
(:mod:`stdaemon.outbound.tls`) and the CONNECT tunnel
(:mod:`stdaemon.outbound.connect_proxy`) have their own modules.

Settings are looked up on every call; when they differ from those the cached
client was built with, a new client (and connection pool) is built, so a
change saved through the API applies to the very next call without a restart.
"""

from __future__ import annotations

import json as _json
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping
from urllib.parse import urlsplit

from OpenSSL import SSL
from service_identity import VerificationError
from twisted.internet import defer, ssl, threads
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import (
    ConnectError,
    ConnectingCancelledError,
    DNSLookupError,
    TimeoutError as ConnectTimeoutError,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    ProxyAgent,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgent, IAgentEndpointFactory
from twisted.web.http_headers import Headers
from zope.interface import implementer

import treq
from treq.client import HTTPClient

from stdaemon import __version__
from stdaemon.logs import correlation_id_var
from stdaemon.outbound.connect_proxy import (
    HTTPConnectTunnelEndpoint, ProxyConnectError, ProxyTarget, parse_proxy_url,
)
from stdaemon.outbound.settings import OutboundSettings, proxy_bypassed
from stdaemon.outbound.tls import CABundleError, load_ca_bundle

log = Logger(namespace="stdaemon.clients.http")

MAX_RESPONSE_BYTES = 16 * 1024 * 1024


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------
class OutboundError(Exception):
    """A provider call failed before an HTTP response arrived."""

    kind = "connection"


class OutboundConnectionError(OutboundError):
    kind = "connection"


class OutboundTimeoutError(OutboundError):
    kind = "timeout"


class OutboundTLSError(OutboundError):
    kind = "tls"


class OutboundProxyError(OutboundError):
    kind = "proxy"

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status  # the proxy's answer to CONNECT, when it gave one


# ---------------------------------------------------------------------------
# Failures
# ---------------------------------------------------------------------------
def describe_failure(failure: Failure, host: str, settings: OutboundSettings) -> OutboundError:
    """Turn a Twisted failure of a request into one clear :class:`OutboundError`."""
    exc = failure.value
    reasons = [exc]
    if isinstance(exc, (ResponseNeverReceived, ResponseFailed)) or hasattr(exc, "reasons"):
        reasons = [r.value if isinstance(r, Failure) else r for r in getattr(exc, "reasons", [])] or [exc]
    for reason in reasons:
        if isinstance(reason, SSL.Error):
            detail = _ssl_error_text(reason)
            hint = ("the server's certificate is not trusted; set ssl_ca_bundle to a PEM file "
                    "containing the issuing CA" if "certificate verify failed" in detail
                    else "check ssl_ca_bundle, the proxy and the server's TLS setup")
            return OutboundTLSError(f"TLS handshake with {host} failed: {detail} ({hint})")
        if isinstance(reason, VerificationError):
            return OutboundTLSError(
                f"TLS certificate of {host} does not match the host name "
                f"(hostname verification failed: {reason})")
        if isinstance(reason, ProxyConnectError):
            return OutboundProxyError(reason.message, reason.status)
        if isinstance(reason, (defer.TimeoutError, defer.CancelledError, ConnectTimeoutError,
                               ConnectingCancelledError)):
            return OutboundTimeoutError(
                f"no response from {host} within {settings.http_timeout:g} s (http_timeout)")
        if isinstance(reason, DNSLookupError):
            return OutboundConnectionError(f"cannot resolve {host}")
        if isinstance(reason, ConnectError):
            return OutboundConnectionError(f"cannot connect to {host}: {reason}")
    return OutboundConnectionError(f"request to {host} failed: {reasons[0]!r}")


def _ssl_error_text(error: SSL.Error) -> str:
    try:
        items = error.args[0]
        texts = [item[2] for item in items if isinstance(item, tuple) and len(item) >= 3]
        if texts:
            return "; ".join(texts)
    except (IndexError, TypeError):
        pass
    return str(error) or "TLS error"


# ---------------------------------------------------------------------------
# TLS connection creators
# ---------------------------------------------------------------------------
@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLSCreator:
    """TLS without certificate verification (``ssl_verify=False``), SNI kept."""

    def __init__(self, hostname: str):
        self._hostname = hostname.encode("idna")
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tlsProtocol):
        connection = SSL.Connection(self._context, None)
        connection.set_app_data(tlsProtocol)
        connection.set_tlsext_host_name(self._hostname)
        return connection


# ---------------------------------------------------------------------------
# Agents
# ---------------------------------------------------------------------------
@implementer(IAgentEndpointFactory)
class _EndpointFactory:
    """Endpoints for direct and CONNECT-tunnelled connections."""

    def __init__(self, reactor, settings: OutboundSettings, trust_root, https_proxy: ProxyTarget | None):
        self._reactor = reactor
        self._settings = settings
        self._trust_root = trust_root
        self._https_proxy = https_proxy

    def tls_creator(self, host: str):
        if not self._settings.ssl_verify:
            return _UnverifiedTLSCreator(host)
        if self._trust_root is not None:
            return ssl.optionsForClientTLS(host, trustRoot=self._trust_root)
        return ssl.optionsForClientTLS(host)

    def endpointForURI(self, uri: URI):
        host = uri.host.decode("ascii")
        timeout = self._settings.http_timeout
        if uri.scheme == b"https":
            proxy = self._https_proxy
            if proxy is not None and not proxy_bypassed(host, uri.port, self._settings.no_proxy):
                proxy_endpoint = HostnameEndpoint(self._reactor, proxy.host, proxy.port, timeout=timeout)
                if proxy.scheme == "https":
                    proxy_endpoint = wrapClientTLS(self.tls_creator(proxy.host), proxy_endpoint)
                inner = HTTPConnectTunnelEndpoint(proxy_endpoint, host, uri.port, proxy.authorization)
            else:
                inner = HostnameEndpoint(self._reactor, host, uri.port, timeout=timeout)
            return wrapClientTLS(self.tls_creator(host), inner)
        return HostnameEndpoint(self._reactor, host, uri.port, timeout=timeout)


@implementer(IAgent)
class _RoutingAgent:
    """Sends plain-http requests through the forwarding proxy, the rest direct/tunnelled."""

    def __init__(self, direct: IAgent, forwarding: IAgent | None,
                 http_proxy: ProxyTarget | None, no_proxy: tuple[str, ...]):
        self._direct = direct
        self._forwarding = forwarding
        self._http_proxy = http_proxy
        self._no_proxy = no_proxy

    def request(self, method, uri, headers=None, bodyProducer=None):
        parsed = URI.fromBytes(uri)
        if (parsed.scheme == b"http" and self._forwarding is not None
                and not proxy_bypassed(parsed.host.decode("ascii"), parsed.port, self._no_proxy)):
            if self._http_proxy.authorization:
                headers = headers.copy() if headers is not None else Headers()
                headers.setRawHeaders(b"Proxy-Authorization", [self._http_proxy.authorization])
            return self._forwarding.request(method, uri, headers, bodyProducer)
        return self._direct.request(method, uri, headers, bodyProducer)


@dataclass
class OutboundResponse:
    status: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode("ascii"))
        return values[0].decode("latin-1") if values else None

    def json(self) -> Any:
        return _json.loads(self.body.decode("utf-8"))


class _BodyCollector:
    def __init__(self, limit: int):
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def __call__(self, data: bytes) -> None:
        self.size += len(data)
        if self.size > self.limit:
            raise ValueError(f"response body larger than {self.limit} bytes")
        self.parts.append(data)


class ProviderHTTPClient:
    """One provider's outbound client, built for one set of settings."""

    def __init__(self, reactor, provider: str, settings: OutboundSettings,
                 correlation_id: Callable[[], str | None], user_agent: str,
                 ca_certificates: list | None = None):
        self.provider = provider
        self.settings = settings
        self._reactor = reactor
        self._correlation_id = correlation_id
        self._user_agent = user_agent.encode("ascii")
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 4
        self._pool.cachedConnectionTimeout = 60

        trust_root = None
        if settings.ssl_verify and settings.ssl_ca_bundle:
            if ca_certificates is None:
                ca_certificates = load_ca_bundle(settings.ssl_ca_bundle)
            trust_root = ssl.trustRootFromCertificates(ca_certificates)
        if not settings.ssl_verify:
            log.warn("TLS certificate verification is DISABLED for provider {provider} "
                     "(ssl_verify=false); connections can be intercepted", provider=provider)

        https_proxy = parse_proxy_url(settings.https_proxy) if settings.https_proxy else None
        http_proxy = parse_proxy_url(settings.http_proxy) if settings.http_proxy else None
        self._endpoints = _EndpointFactory(reactor, settings, trust_root, https_proxy)
        direct = Agent.usingEndpointFactory(reactor, self._endpoints, pool=self._pool)
        forwarding = None
        if http_proxy is not None:
            proxy_endpoint = HostnameEndpoint(reactor, http_proxy.host, http_proxy.port,
                                              timeout=settings.http_timeout)
            if http_proxy.scheme == "https":
                proxy_endpoint = wrapClientTLS(self._endpoints.tls_creator(http_proxy.host), proxy_endpoint)
            forwarding = ProxyAgent(proxy_endpoint, reactor, pool=self._pool)
        self.agent = _RoutingAgent(direct, forwarding, http_proxy, settings.no_proxy)
        #: The treq client for callers that want treq's API directly.
        self.treq = HTTPClient(self.agent)

    def headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": self._user_agent.decode("ascii"), "Accept": "application/json"}
        correlation_id = self._correlation_id()
        if correlation_id:
            headers["X-Correlation-ID"] = correlation_id
        if extra:
            headers.update(extra)
        return headers

    async def request(self, method: str, url: str, *, json: Any = None,
                      headers: Mapping[str, str] | None = None,
                      max_body: int = MAX_RESPONSE_BYTES) -> OutboundResponse:
        """One HTTP exchange bounded by ``http_timeout`` (connect + send + whole body)."""
        host = urlsplit(url).hostname or url
        timeout = self.settings.http_timeout
        kwargs: dict[str, Any] = {"headers": self.headers(headers)}
        if json is not None:
            kwargs["json"] = json

        async def exchange() -> OutboundResponse:
            response = await self.treq.request(method, url, **kwargs)
            collector = _BodyCollector(max_body)
            await treq.collect(response, collector)
            return OutboundResponse(response.code, response.headers, b"".join(collector.parts))

        d = defer.ensureDeferred(exchange())
        d.addTimeout(timeout, self._reactor)
        try:
            return await d
        except OutboundError:
            raise
        except ValueError as exc:
            raise OutboundConnectionError(f"bad response from {host}: {exc}") from None
        except Exception:
            raise describe_failure(Failure(), host, self.settings) from None

    def close(self) -> defer.Deferred:
        return self._pool.closeCachedConnections()


def _default_correlation_id() -> str | None:
    # The request's correlation id flows through coroutines in a contextvar
    # (stdaemon.logs, S16).
    return correlation_id_var.get() or None


class HTTPClientFactory:
    """Builds and caches one :class:`ProviderHTTPClient` per provider.

    ``settings_for(provider)`` returns the provider's current
    :class:`OutboundSettings`; it is consulted on every :meth:`client_for`, and
    a changed result (or a replaced CA bundle file) builds a fresh client.
    """

    def __init__(self, reactor, settings_for: Callable[[str], OutboundSettings],
                 correlation_id: Callable[[], str | None] | None = None,
                 version: str = __version__):
        self._reactor = reactor
        self._settings_for = settings_for
        self._correlation_id = correlation_id or _default_correlation_id
        self.user_agent = f"stdaemon/{version}"
        self._clients: dict[str, ProviderHTTPClient] = {}

    def settings(self, provider: str) -> OutboundSettings:
        settings = self._settings_for(provider)
        if settings.ssl_verify and settings.ssl_ca_bundle:
            try:
                stat = os.stat(settings.ssl_ca_bundle)
                stamp = (stat.st_mtime_ns, stat.st_size)
            except OSError:
                stamp = ("missing",)
            settings = replace(settings, ca_bundle_stamp=stamp)
        return settings

    def client_for(self, provider: str) -> ProviderHTTPClient:
        """The client for ``provider`` built from its settings as they are now.

        Reads a changed CA bundle on the calling thread (a small file);
        :meth:`request` reads it on a worker thread instead.  Raises
        :class:`CABundleError` when the configured bundle is unusable and
        ``ValueError`` for an unusable proxy URL.
        """
        settings = self.settings(provider)
        current = self._clients.get(provider)
        if current is not None and current.settings == settings:
            return current
        return self._install(provider, settings, None)

    async def client(self, provider: str) -> ProviderHTTPClient:
        """Like :meth:`client_for`, with the CA bundle read off the reactor thread."""
        settings = self.settings(provider)
        current = self._clients.get(provider)
        if current is not None and current.settings == settings:
            return current
        certificates = None
        if settings.ssl_verify and settings.ssl_ca_bundle:
            certificates = await threads.deferToThreadPool(
                self._reactor, self._reactor.getThreadPool(), load_ca_bundle, settings.ssl_ca_bundle)
            current = self._clients.get(provider)
            if current is not None and current.settings == settings:
                return current  # built by a concurrent call meanwhile
        return self._install(provider, settings, certificates)

    def _install(self, provider: str, settings: OutboundSettings, certificates) -> ProviderHTTPClient:
        client = ProviderHTTPClient(self._reactor, provider, settings, self._correlation_id,
                                    self.user_agent, certificates)
        current = self._clients.get(provider)
        self._clients[provider] = client
        if current is not None:
            current.close()
        return client

    async def request(self, provider: str, method: str, url: str, **kwargs) -> OutboundResponse:
        try:
            client = await self.client(provider)
        except CABundleError as exc:
            raise OutboundTLSError(str(exc)) from None
        except ValueError as exc:
            raise OutboundProxyError(f"invalid proxy configuration: {exc}") from None
        return await client.request(method, url, **kwargs)

    def close(self) -> defer.Deferred:
        clients, self._clients = list(self._clients.values()), {}
        return defer.DeferredList([c.close() for c in clients], consumeErrors=True)
