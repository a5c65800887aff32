"""A real CONNECT proxy for tests: Debian's tinyproxy on a random loopback port.

``TinyProxy.log_text()`` returns tinyproxy's own log; it records every request
line, so ``"CONNECT 127.0.0.1:<port>"`` in it proves the tunnel was used.
"""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.services import free_port, require_binary


class TinyProxy:
    def __init__(self, binary: str, workdir: Path, basic_auth: tuple[str, str] | None = None):
        self.binary = binary
        self.workdir = workdir
        self.basic_auth = basic_auth
        self.log_path = workdir / "tinyproxy.log"
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        if self.basic_auth:
            user, password = self.basic_auth
            return f"http://{user}:{password}@127.0.0.1:{self.port}"
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "TinyProxy":
        last_error = ""
        for _attempt in range(3):  # the free port can be taken between probe and bind
            self.port = free_port()
            config = self.workdir / "tinyproxy.conf"
            lines = [
                f"Port {self.port}",
                "Listen 127.0.0.1",
                "Timeout 30",
                f'LogFile "{self.log_path}"',
                "LogLevel Connect",
                f'PidFile "{self.workdir / "tinyproxy.pid"}"',
                "MaxClients 50",
                "Allow 127.0.0.1",
                "DisableViaHeader Yes",
            ]
            if self.basic_auth:
                lines.append(f"BasicAuth {self.basic_auth[0]} {self.basic_auth[1]}")
            config.write_text("\n".join(lines) + "\n")
            self.process = subprocess.Popen(
                [self.binary, "-d", "-c", str(config)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    last_error = self.process.stderr.read().decode(errors="replace")
                    break
                try:
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                    return self
                except OSError:
                    time.sleep(0.05)
            self.stop()
        raise RuntimeError(f"tinyproxy did not start: {last_error}")

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        if self.process.stderr:
            self.process.stderr.close()
        self.process = None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


@pytest.fixture
def tinyproxy(tmp_path):
    proxy = TinyProxy(require_binary("tinyproxy"), tmp_path).start()
    yield proxy
    proxy.stop()


@pytest.fixture
def tinyproxy_with_auth(tmp_path):
    workdir = tmp_path / "authproxy"
    workdir.mkdir()
    proxy = TinyProxy(require_binary("tinyproxy"), workdir, ("stproxy", "s3cret-pw")).start()
    yield proxy
    proxy.stop()
