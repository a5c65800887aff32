"""Processes the benchmark starts on loopback: stdaemon daemons (``twistd``),
the bare peer server, the streaming sink, ``redis-server`` and ``moto_server``.

Everything here is blocking and runs in the bench driver (a plain script, not
the daemon), so ``time.sleep``/``time.monotonic`` are fine.  Every wait is
bounded; every process started is stopped by :class:`Processes.close`.
"""

from __future__ import annotations

import base64
import compileall
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import yaml

BIN = os.path.dirname(sys.executable)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATUSES = ("completed", "failed", "cancelled", "running", "queued", "pending")
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"stdaemon-bench-webhook-secret-32").decode("ascii")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def binary(name: str) -> Optional[str]:
    """``name`` next to this interpreter (the venv), else on PATH."""
    local = os.path.join(BIN, name)
    if os.path.exists(local):
        return local
    return shutil.which(name)


def http_get(port: int, path: str, headers: Optional[dict] = None, timeout: float = 5.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rss_kib(pid: int) -> dict:
    """``VmRSS``/``VmHWM`` of a process in KiB (empty when it is gone)."""
    figures = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    name, value = line.split(":", 1)
                    figures[name] = int(value.split()[0])
    except OSError:
        pass
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) from ``/proc/<pid>/stat``."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    # after the command name: state is field 3, utime field 14, stime field 15 (1-based)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compile_bytecode(base: str) -> list[str]:
    """Compile the bytecode of the stdaemon the daemons will import (resolved as they resolve it:
    this interpreter, from a directory outside the checkout) and of the bench's peer, as an
    installed package has it (pip and ``scripts/setup`` compile it).  Without it, a checkout run
    with ``PYTHONDONTWRITEBYTECODE`` (or read-only) compiles every module from source at each
    start, and the start-to-ready figure measures the compiler.  Returns the directories."""
    probe = ("import compileall, os, stdaemon; d = os.path.dirname(stdaemon.__file__); "
             "compileall.compile_dir(d, quiet=1); print(d)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=base, capture_output=True, text=True,
                         timeout=300, check=True).stdout.strip()
    bench_dir = os.path.join(REPO, "bench")
    compileall.compile_dir(bench_dir, quiet=1)
    return [out, bench_dir]


# ------------------------------------------------------------------ state seeding (before start)


def state_paths(state: str) -> dict:
    cloud = os.path.join(state, "config", "cloud")
    return {"db": os.path.join(cloud, "jobs.db"), "admin_key": os.path.join(cloud, "admin.key"),
            "upload_key": os.path.join(cloud, "upload_credentials.key")}


def seed_state(state: str, *, filler_jobs: int = 0, webhook_jobs: int = 0,
               get_job: Optional[str] = None, upload_job: Optional[str] = None) -> dict:
    """Create the daemon's database before its first start and insert rows directly:
    ``filler_jobs`` mixed-status jobs (metrics scrape), ``webhook_jobs`` running jobs with
    external ids ``benchpred<n>`` (webhook ingestion), one job for ``GET /api/cloud/jobs/{id}``
    and one running job with S3 upload credentials.  Returns what the bench needs to know."""
    from stdaemon.store.database import connect
    from stdaemon.store.schema import migrate

    paths = state_paths(state)
    os.makedirs(os.path.dirname(paths["db"]), mode=0o700, exist_ok=True)
    conn = connect(paths["db"])
    try:
        migrate(conn)
        now = time.time()
        rows = []
        for i in range(filler_jobs):
            status = STATUSES[i % len(STATUSES)]
            started = now - 7200 if status in ("completed", "failed", "cancelled", "running") else None
            completed = now - 3600 + (i % 600) if status in ("completed", "failed", "cancelled") else None
            rows.append((f"fill{i:07d}", "replicate", status, now - 86400 * (i % 90), started, completed,
                         round((i % 97) * 0.37, 4), "h100", None))
        for i in range(webhook_jobs):
            rows.append((f"hook{i:07d}", "replicate", "running", now - 600, now - 300, None, 0.0, "h100",
                         f"benchpred{i}"))
        for job_id in (get_job, upload_job):
            if job_id:
                rows.append((job_id, "replicate", "running", now - 600, now - 300, None, 1.25, "h100", None))
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO jobs (job_id, provider, status, created_at, started_at, completed_at, "
                         "cost_usd, hardware_type, external_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        info: dict = {"jobs": len(rows)}
        if upload_job:
            info["s3"] = _insert_credential(conn, paths["upload_key"], upload_job, now)
        conn.execute("COMMIT")
    finally:
        conn.close()
    return info


def _insert_credential(conn, key_path: str, job_id: str, now: float) -> dict:
    import secrets as pysecrets

    from cryptography.fernet import Fernet

    from stdaemon.s3 import credentials, store as s3_store

    fernet = Fernet(credentials.load_or_create_key(key_path))
    access_key = credentials.ACCESS_KEY_PREFIX + pysecrets.token_hex(8).upper()
    secret = pysecrets.token_urlsafe(30)
    prefix = credentials.upload_prefix(job_id)
    s3_store.insert(conn, access_key, job_id, credentials.UPLOAD_BUCKET, prefix,
                       fernet.encrypt(secret.encode()), credentials.secret_hash(secret), now, now + 86400)
    return {"access_key": access_key, "secret": secret, "bucket": credentials.UPLOAD_BUCKET, "prefix": prefix}


# ------------------------------------------------------------------ processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    port: int
    log_path: str
    started_at: float
    ready_seconds: Optional[float] = None
    extra: dict = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def url(self, path: str = "") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()[-chars:].decode("utf-8", "replace")
        except OSError:
            return ""


class StartError(RuntimeError):
    pass


class Processes:
    """Starts processes under ``base`` and stops them all (SIGTERM, then SIGKILL) on close."""

    def __init__(self, base: str):
        self.base = base
        self.procs: list[Proc] = []

    def _spawn(self, name: str, argv: list, port: int, env: Optional[dict] = None, cwd: Optional[str] = None) -> Proc:
        directory = os.path.join(self.base, name)
        os.makedirs(directory, exist_ok=True)
        log_path = os.path.join(directory, "output.log")
        log = open(log_path, "wb")
        started = time.monotonic()
        popen = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 env=env, cwd=cwd or directory)
        log.close()
        proc = Proc(name, popen, port, log_path, started)
        self.procs.append(proc)
        return proc

    def wait_http(self, proc: Proc, path: str, timeout: float = 60.0, interval: float = 0.02) -> float:
        """Seconds from spawn to the first 200 on ``path`` (poll every ``interval``)."""
        deadline = proc.started_at + timeout
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise StartError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log_tail()}")
            try:
                status, _ = http_get(proc.port, path, timeout=1.0)
                if status == 200:
                    proc.ready_seconds = time.monotonic() - proc.started_at
                    return proc.ready_seconds
            except OSError:
                pass
            time.sleep(interval)
        raise StartError(f"{proc.name} not ready on {path} after {timeout:.0f} s:\n{proc.log_tail()}")

    def daemon(self, name: str, config: dict, *, state: Optional[str] = None, env: Optional[dict] = None,
               wait: bool = True) -> Proc:
        """``twistd -n --pidfile= stdaemon --config <yaml>`` on a loopback port with its own state dir
        (seed it first with :func:`seed_state`).  The port is picked free just before the start; if
        another process took it meanwhile, the start is tried once more on a new port."""
        try:
            return self._daemon(name, config, state=state, env=env, wait=wait)
        except StartError as exc:
            if "cannot listen" not in str(exc):
                raise
            return self._daemon(name, config, state=state, env=env, wait=wait)

    def _daemon(self, name: str, config: dict, *, state: Optional[str], env: Optional[dict],
                wait: bool) -> Proc:
        twistd = binary("twistd")
        if twistd is None:
            raise StartError("twistd not found next to the interpreter or on PATH")
        directory = os.path.join(self.base, name)
        os.makedirs(directory, exist_ok=True)
        state = state or os.path.join(directory, "state")
        port = free_port()
        config = dict(config)
        config.setdefault("server", {})
        config["server"] = dict(config["server"], listen=[f"tcp:{port}:interface=127.0.0.1"])
        config.setdefault("logging", {"level": "WARNING"})
        config.setdefault("jobs", {"poll_interval": 86400})
        path = os.path.join(directory, "stdaemon.yaml")
        with open(path, "w") as fh:
            yaml.safe_dump(config, fh)
        environ = {k: v for k, v in os.environ.items()
                   if not k.startswith(("REPLICATE_", "AWS_", "VAULT_", "RATE_LIMIT_", "SIMPLETUNER_"))}
        environ.update({"SIMPLETUNER_STATE_DIR": state, "PYTHONUNBUFFERED": "1",
                        "REPLICATE_WEBHOOK_SECRET": WEBHOOK_SECRET})
        environ.update(env or {})
        proc = self._spawn(name, [twistd, "-n", "--pidfile=", "stdaemon", "--config", path], port, environ,
                           cwd=directory)
        proc.extra["state"] = state
        if wait:
            try:
                self.wait_http(proc, "/api/cloud/health/ready")
            except StartError:
                self.stop(proc)
                raise
        return proc

    def admin_key(self, proc: Proc) -> str:
        with open(state_paths(proc.extra["state"])["admin_key"]) as fh:
            return fh.read().strip()

    def peer(self, db: Optional[str] = None, job_body: Optional[str] = None,
             key_hash: Optional[str] = None, name: str = "peer") -> Proc:
        """The bare twisted.web peer (``bench/peer.py``); with ``job_body``/``key_hash`` it also
        serves ``/keyjob/<id>`` (key check + those bytes)."""
        port = free_port()
        argv = [sys.executable, "-m", "bench.peer", "--port", str(port)]
        if db:
            argv += ["--db", db]
        if job_body and key_hash:
            argv += ["--job-body", job_body, "--key-hash", key_hash]
        proc = self._spawn(name, argv, port, dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
        self.wait_http(proc, "/ready")
        return proc

    def sink(self, directory: str) -> Proc:
        """The minimal streaming HTTP PUT sink (``bench/sink.py``)."""
        port = free_port()
        proc = self._spawn("sink", [sys.executable, "-m", "bench.sink", "--port", str(port), "--dir", directory],
                           port, dict(os.environ, PYTHONPATH=REPO), cwd=REPO)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return proc
            except OSError:
                if proc.popen.poll() is not None:
                    raise StartError(f"sink exited:\n{proc.log_tail()}")
                time.sleep(0.02)
        raise StartError("sink did not listen")

    def redis(self) -> Optional[Proc]:
        path = binary("redis-server")
        if path is None:
            return None
        port = free_port()
        directory = os.path.join(self.base, "redis")
        os.makedirs(directory, exist_ok=True)
        proc = self._spawn("redis", [path, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                                     "--save", "", "--appendonly", "no"], port)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        return proc
            except OSError:
                time.sleep(0.05)
        raise StartError(f"redis-server did not answer:\n{proc.log_tail()}")

    def moto(self) -> Optional[Proc]:
        path = binary("moto_server")
        if path is None:
            return None
        port = free_port()
        proc = self._spawn("moto", [path, "-H", "127.0.0.1", "-p", str(port)], port)
        self.wait_http(proc, "/moto-api/", timeout=60)
        return proc

    def stop(self, proc: Proc, timeout: float = 20.0) -> None:
        if proc.popen.poll() is None:
            proc.popen.send_signal(signal.SIGTERM)
            try:
                proc.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.procs)):
            self.stop(proc)


def loads(body: bytes) -> dict:
    try:
        return json.loads(body)
    except ValueError:
        return {}
