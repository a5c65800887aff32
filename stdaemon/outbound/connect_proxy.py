"""HTTPS through an HTTP proxy: a small HTTP CONNECT client endpoint.

Twisted's ``ProxyAgent`` only forwards plain ``http://`` requests (it writes
the absolute URI on the request line); it never sends ``CONNECT``, so it
cannot reach an ``https://`` target through a proxy.  This module is the
small piece Twisted lacks: :class:`HTTPConnectTunnelEndpoint` connects to the
proxy, asks it for a tunnel with ``CONNECT host:port``, waits for a 2xx answer
and only then hands the raw tunnelled byte stream to the protocol it was asked
to connect.  The HTTP client factory wraps this endpoint with
``twisted.internet.endpoints.wrapClientTLS`` so the TLS handshake (and
certificate + hostname verification) happens end to end with the target,
inside the tunnel, exactly as with a direct connection.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from twisted.internet import defer
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

# A proxy's CONNECT answer is a status line and a few headers; anything
# bigger is not a proxy we should talk to.
MAX_RESPONSE_HEAD = 64 * 1024


class ProxyConnectError(ConnectError):
    """The proxy refused or broke the CONNECT tunnel."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        self.message = message
        super().__init__(string=message)


def basic_proxy_authorization(username: str, password: str) -> bytes:
    token = base64.b64encode(f"{username}:{password}".encode("utf-8"))
    return b"Basic " + token


class _TunnelProtocol(Protocol):
    """Speaks CONNECT to the proxy, then relays bytes to the wrapped protocol."""

    def __init__(self, target: bytes, proxy_authorization: bytes | None,
                 wrapped_factory, ready: defer.Deferred):
        self._target = target
        self._proxy_authorization = proxy_authorization
        self._wrapped_factory = wrapped_factory
        self._ready = ready
        self._buffer = b""
        self.wrapped: Protocol | None = None

    def connectionMade(self) -> None:
        lines = [
            b"CONNECT " + self._target + b" HTTP/1.1",
            b"Host: " + self._target,
        ]
        if self._proxy_authorization:
            lines.append(b"Proxy-Authorization: " + self._proxy_authorization)
        self.transport.write(b"\r\n".join(lines) + b"\r\n\r\n")

    def dataReceived(self, data: bytes) -> None:
        if self.wrapped is not None:
            self.wrapped.dataReceived(data)
            return
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_RESPONSE_HEAD:
                self._fail(ProxyConnectError("proxy sent an oversized CONNECT response"))
            return
        head, rest = self._buffer[:end], self._buffer[end + 4:]
        self._buffer = b""
        status_line = head.split(b"\r\n", 1)[0]
        parts = status_line.split(None, 2)
        try:
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
                raise ValueError
            status = int(parts[1])
        except ValueError:
            self._fail(ProxyConnectError(
                f"proxy sent a malformed CONNECT response: {status_line[:80]!r}"))
            return
        if not 200 <= status < 300:
            reason = parts[2].decode("latin-1") if len(parts) > 2 else ""
            hint = " (proxy authentication required)" if status == 407 else ""
            self._fail(ProxyConnectError(
                f"proxy refused CONNECT {self._target.decode('ascii')}: "
                f"{status} {reason}{hint}".rstrip(), status))
            return
        wrapped = self._wrapped_factory.buildProtocol(self.transport.getPeer())
        if wrapped is None:
            self._fail(ProxyConnectError("tunnel protocol factory declined the connection"))
            return
        self.wrapped = wrapped
        wrapped.makeConnection(self.transport)
        ready, self._ready = self._ready, None
        ready.callback(wrapped)
        if rest:
            wrapped.dataReceived(rest)

    def connectionLost(self, reason) -> None:
        if self.wrapped is not None:
            self.wrapped.connectionLost(reason)
        elif self._ready is not None:
            ready, self._ready = self._ready, None
            ready.errback(ProxyConnectError(
                "proxy closed the connection before the CONNECT tunnel was established"))

    def _fail(self, error: Exception) -> None:
        if self._ready is not None:
            ready, self._ready = self._ready, None
            ready.errback(error)
        self.transport.abortConnection()


class _TunnelFactory(Factory):
    def __init__(self, target: bytes, proxy_authorization, wrapped_factory):
        self._target = target
        self._proxy_authorization = proxy_authorization
        self._wrapped_factory = wrapped_factory
        self._protocol: _TunnelProtocol | None = None
        self.ready: defer.Deferred = defer.Deferred(self._cancel)

    def buildProtocol(self, addr):
        self._protocol = _TunnelProtocol(self._target, self._proxy_authorization,
                                         self._wrapped_factory, self.ready)
        return self._protocol

    def _cancel(self, _d) -> None:
        # A timeout cancelled the connect while waiting for the proxy's
        # answer: drop the half-made tunnel.
        protocol = self._protocol
        if protocol is not None:
            protocol._ready = None
            if protocol.transport is not None:
                protocol.transport.abortConnection()


@implementer(IStreamClientEndpoint)
class HTTPConnectTunnelEndpoint:
    """Connects to ``host:port`` through the proxy reached by ``proxy_endpoint``.

    ``connect(factory)`` fires with the wrapped protocol once the proxy has
    answered 2xx to ``CONNECT``; it fails with :class:`ProxyConnectError` if
    the proxy refuses (e.g. 403, 407) or hangs up first.
    """

    def __init__(self, proxy_endpoint, host: str, port: int,
                 proxy_authorization: bytes | None = None):
        self._proxy_endpoint = proxy_endpoint
        host_bytes = host.encode("idna")
        if b":" in host_bytes:  # IPv6 literal
            host_bytes = b"[" + host_bytes + b"]"
        self._target = host_bytes + b":" + str(port).encode("ascii")
        self._proxy_authorization = proxy_authorization

    def connect(self, protocolFactory):
        factory = _TunnelFactory(self._target, self._proxy_authorization, protocolFactory)
        d = self._proxy_endpoint.connect(factory)
        d.addCallback(lambda _proto: factory.ready)
        return d


@dataclass(frozen=True)
class ProxyTarget:
    scheme: str
    host: str
    port: int
    authorization: bytes | None


def parse_proxy_url(url: str) -> ProxyTarget:
    """``http://[user:pass@]host[:port]`` → :class:`ProxyTarget` (ValueError if bad)."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https"):
        raise ValueError("proxy URL must start with http:// or https://")
    if not parts.hostname:
        raise ValueError("proxy URL has no host")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("proxy URL has an invalid port") from None
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    authorization = None
    if parts.username is not None:
        authorization = basic_proxy_authorization(
            unquote(parts.username), unquote(parts.password or "")
        )
    return ProxyTarget(parts.scheme, parts.hostname, port, authorization)
