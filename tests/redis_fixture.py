"""A real ``redis-server`` on a random loopback port with a temp dir, for tests.

``RedisServer.stop()`` / ``start()`` restart it on the same port (outage
tests); ``pause()`` / ``resume()`` freeze it with SIGSTOP/SIGCONT (a server
that accepts but never answers).  Everything is bounded and cleaned up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
from twisted.internet import defer, task

from tests.services import free_port, require_binary


class RedisServer:
    def __init__(self, binary: str, directory: str):
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen | None = None
        self.log_path = os.path.join(directory, "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def start(self) -> None:
        assert self.proc is None
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", self.directory, "--save", "", "--appendonly", "no",
                 "--daemonize", "no", "--protected-mode", "yes", "--loglevel", "warning"],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.directory)
        deadline = time.monotonic() + 15
        while not self._ping():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                with open(self.log_path, "rb") as fh:
                    raise RuntimeError(f"redis-server did not start: {fh.read()[-2000:]!r}")
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)

    def cli(self, *args: str) -> str:
        """A command through redis-cli (a second, independent client)."""
        cli = require_binary("redis-cli")
        return subprocess.check_output([cli, "-p", str(self.port), *args], timeout=10).decode().strip()


@pytest.fixture
def redis_server(tmp_path):
    binary = require_binary("redis-server")
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(binary, str(directory))
    server.start()
    yield server
    server.stop()


async def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05):
    """Poll ``predicate`` (sync or async) on the reactor until true; bounded."""
    from twisted.internet import reactor

    deadline = reactor.seconds() + timeout
    while True:
        result = predicate()
        if isinstance(result, defer.Deferred) or hasattr(result, "__await__"):
            result = await result
        if result:
            return result
        if reactor.seconds() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await task.deferLater(reactor, interval, lambda: None)


__all__ = ["RedisServer", "redis_server", "wait_until"]
