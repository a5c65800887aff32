"""The daemon as operators run it: ``twistd -n stdaemon`` in a real process."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.services import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
JSON_FIELDS = {"timestamp", "level", "logger", "message", "correlation_id", "source", "extra"}


class Daemon:
    def __init__(self, tmp_path, env=None, args=()):
        self.port = free_port()
        self.state = str(tmp_path / "state")
        self.log_path = str(tmp_path / f"stdout-{self.port}.log")
        environ = {k: v for k, v in os.environ.items() if not k.startswith("SIMPLETUNER_")}
        environ.update({"SIMPLETUNER_STATE_DIR": self.state, **(env or {})})
        self.out = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "stdaemon", "--listen",
             f"tcp:{self.port}:interface=127.0.0.1", *args],
            stdout=self.out, stderr=subprocess.STDOUT, env=environ, cwd=ROOT)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=30.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited early:\n{self.output()}")
            try:
                with urllib.request.urlopen(self.url + "/api/cloud/health/ready", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"daemon not ready within {timeout} s:\n{self.output()}")

    def output(self):
        if not self.out.closed:
            self.out.flush()
        with open(self.log_path) as fh:
            return fh.read()

    def stop(self, sig=signal.SIGTERM, timeout=15.0):
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


@pytest.fixture
def spawn(tmp_path):
    started = []

    def make(**kwargs):
        daemon = Daemon(tmp_path, **kwargs)
        started.append(daemon)
        return daemon

    yield make
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.stop(signal.SIGKILL)


def test_twistd_lists_the_plugin():
    result = subprocess.run([TWISTD, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "stdaemon" in result.stdout


def test_json_logs_carry_the_request_correlation_id_and_sigterm_exits_zero(spawn):
    daemon = spawn(env={"SIMPLETUNER_LOG_FORMAT": "json", "SIMPLETUNER_LOG_LEVEL": "DEBUG"})
    daemon.wait_ready()
    request = urllib.request.Request(daemon.url + "/api/cloud/health",
                                     headers={"X-Correlation-ID": "trace-4242"})
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["X-Correlation-ID"] == "trace-4242"
    started = time.monotonic()
    assert daemon.stop() == 0
    assert time.monotonic() - started < 10
    lines = [line for line in daemon.output().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]   # every line is one JSON object
    assert records
    for record in records:
        assert set(record) - {"exception"} == JSON_FIELDS, record
        assert record["timestamp"].endswith("Z") and len(record["timestamp"]) == 24
        assert set(record["source"]) == {"file", "line", "function"}
    tagged = [r for r in records if r["correlation_id"] == "trace-4242"]
    assert tagged, "no log line carries the request's correlation id"
    assert any(r["logger"] == "stdaemon.service" and "ready" in r["message"] for r in records)
    assert any("admin.key" in r["message"] for r in records)
    with open(os.path.join(daemon.state, "config", "cloud", "admin.key")) as fh:
        key = fh.read().strip()
    assert key not in daemon.output()


def test_kill_9_leaves_a_consistent_database_and_a_clean_restart(spawn, tmp_path):
    first = spawn()
    first.wait_ready()
    for _ in range(20):
        urllib.request.urlopen(first.url + "/api/cloud/health", timeout=5).read()
    first.stop(signal.SIGKILL)
    db_path = os.path.join(first.state, "config", "cloud", "jobs.db")
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()
    second = spawn()
    second.wait_ready()
    with urllib.request.urlopen(second.url + "/api/cloud/health", timeout=5) as response:
        body = json.loads(response.read())
        assert response.status == 200
        assert body["status"] in ("healthy", "degraded")
        assert next(c for c in body["components"] if c["name"] == "database")["status"] == "healthy"
    assert second.stop() == 0
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        # The first start's admin key survived; no second key was minted.
        assert conn.execute("SELECT count(*) FROM api_keys WHERE role='admin'").fetchone()[0] == 1
    finally:
        conn.close()


def test_port_in_use_stops_start_up_with_a_clear_message(spawn):
    first = spawn()
    first.wait_ready()
    clash = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "stdaemon", "--listen", f"tcp:{first.port}:interface=127.0.0.1"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "SIMPLETUNER_STATE_DIR": first.state + "-2"})
    assert clash.returncode != 0
    assert "cannot listen" in clash.stdout + clash.stderr


def test_log_file_is_reopened_on_sighup(spawn, tmp_path):
    log_file = str(tmp_path / "stdaemon.log")
    daemon = spawn(env={"SIMPLETUNER_LOG_FILE": log_file, "SIMPLETUNER_LOG_FORMAT": "json"})
    daemon.wait_ready()
    os.rename(log_file, log_file + ".1")             # logrotate moves the file away
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not os.path.exists(log_file) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.stop() == 0
    with open(log_file) as fh:
        rotated = [json.loads(line) for line in fh if line.strip()]
    assert any("Stopped" in r["message"] for r in rotated), rotated


def test_systemd_units_verify(tmp_path):
    from tests.services import require_binary

    analyze = require_binary("systemd-analyze")
    for name in ("stdaemon.service", "stdaemon.socket"):
        text = open(os.path.join(ROOT, "systemd", name)).read()
        # The unit names the install location; verify it against this install.
        text = text.replace("/opt/stdaemon/.venv/bin/twistd", TWISTD)
        (tmp_path / name).write_text(text)
    result = subprocess.run([analyze, "verify", str(tmp_path / "stdaemon.service"),
                             str(tmp_path / "stdaemon.socket")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    service = open(os.path.join(ROOT, "systemd", "stdaemon.service")).read()
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "PrivateTmp=yes",
                   "Restart=on-failure", "--nodaemon", "--pidfile= "):
        assert option in service
    assert "PIDFile" not in service and "Type=forking" not in service


def test_socket_activation_by_name(tmp_path):
    """systemd passes the socket as fd 3 with LISTEN_FDNAMES; the daemon adopts it."""
    import socket

    from tests.services import free_port as fp

    port = fp()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", port))
    listener.listen(16)
    state = str(tmp_path / "state")
    script = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); os.set_inheritable(3, True);"
        "os.environ['LISTEN_PID'] = str(os.getpid()); os.environ['LISTEN_FDS'] = '1';"
        "os.environ['LISTEN_FDNAMES'] = 'stdaemon-http';"
        f"os.execv({TWISTD!r}, [{TWISTD!r}, '-n', '--pidfile=', 'stdaemon', '--listen',"
        " 'systemd:domain=INET:name=stdaemon-http'])"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(listener.fileno())],
                            pass_fds=(listener.fileno(),), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, env={**os.environ, "SIMPLETUNER_STATE_DIR": state})
    listener.close()
    try:
        deadline = time.monotonic() + 30
        body = None
        while time.monotonic() < deadline and body is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/cloud/health/ready",
                                            timeout=1) as response:
                    body = json.loads(response.read())
            except OSError:
                if proc.poll() is not None:
                    break
                time.sleep(0.1)
        assert body == {"status": "ready"}, proc.stdout.read().decode() if proc.poll() is not None else ""
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
    assert proc.returncode == 0
