"""A round-robin TCP proxy on loopback for the several-instances tests, standing in for the nginx
``upstream`` block the README shows: each new client connection goes to the next backend in turn;
a backend that refuses the connection is skipped for that connection (nginx's default
``proxy_next_upstream error``), so a killed instance does not fail new requests.

Built on ``twisted.protocols.portforward``; only the choice of backend is ours. Bytes are relayed
unchanged in both directions (no HTTP parsing), so what the daemons see is what the client sent.
"""

from __future__ import annotations

from typing import Any, Sequence

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.protocols import portforward


class _Client(portforward.ProxyClient):
    pass


class _ClientFactory(portforward.ProxyClientFactory):
    protocol = _Client

    def __init__(self, server: "_Server", attempt: int):
        self.server = server
        self.attempt = attempt

    def setServer(self, server: Any) -> None:  # portforward's API
        self.server = server

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        self.server.try_next(self.attempt + 1)


class _Server(portforward.ProxyServer):
    def connectionMade(self) -> None:
        # Hold the client's bytes until a backend is connected (portforward buffers them).
        self.transport.pauseProducing()
        self.first = self.factory.choose()
        self.try_next(0)

    def try_next(self, attempt: int) -> None:
        backends = self.factory.backends
        if attempt >= len(backends):
            self.transport.loseConnection()
            return
        host, port = backends[(self.first + attempt) % len(backends)]
        client = _ClientFactory(self, attempt)
        self.reactor.connectTCP(host, port, client, timeout=5)

    @property
    def reactor(self) -> Any:
        return self.factory.reactor


class RoundRobinFactory(protocol.Factory):
    protocol = _Server

    def __init__(self, reactor: Any, backends: Sequence[tuple[str, int]]):
        self.reactor = reactor
        self.backends = list(backends)
        self._next = 0

    def choose(self) -> int:
        index = self._next
        self._next = (self._next + 1) % len(self.backends)
        return index


class RoundRobinProxy:
    """``await RoundRobinProxy(reactor, [(host, port), ...]).start()`` → ``url``; ``stop()``."""

    def __init__(self, reactor: Any, backends: Sequence[tuple[str, int]]):
        self.reactor = reactor
        self.factory = RoundRobinFactory(reactor, backends)
        self.port: Any = None
        self.url = ""

    async def start(self) -> "RoundRobinProxy":
        endpoint = TCP4ServerEndpoint(self.reactor, 0, interface="127.0.0.1")
        self.port = await endpoint.listen(self.factory)
        self.url = f"http://127.0.0.1:{self.port.getHost().port}"
        return self

    async def stop(self) -> None:
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
            self.port = None

