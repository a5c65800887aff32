"""Real secret stores for tests: moto's server (AWS Secrets Manager) and the OpenBao dev server.

Each runs on 127.0.0.1 with a random port and a temp HOME, and is stopped
afterwards.  A missing binary fails under CI=true and skips otherwise
(``tests.services.require_binary``).  Setup waits are bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from tests.services import free_port, require_binary

VENV_BIN = os.path.dirname(sys.executable)


def _binary(name: str) -> str:
    candidate = os.path.join(VENV_BIN, name)
    if os.access(candidate, os.X_OK):
        return candidate
    return require_binary(name)


def _wait_http(url: str, proc: subprocess.Popen, log_path: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path, errors="replace") as fh:
                raise RuntimeError(f"{proc.args[0]} exited early:\n{fh.read()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=1.0):
                return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


class _Process:
    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.tmp = tempfile.mkdtemp(prefix=f"stdaemon-{type(self).__name__.lower()}-")
        self.log_path = os.path.join(self.tmp, "server.log")
        self.port = 0

    def _spawn(self, argv: list[str]) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": self.tmp,
            "NO_PROXY": "127.0.0.1,localhost",
        }
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=self.tmp
            )
        finally:
            log.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class MotoServer(_Process):
    """``moto_server`` speaking AWS Secrets Manager over HTTP."""

    region = "us-east-1"
    credentials = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def start(self) -> "MotoServer":
        binary = _binary("moto_server")
        self.port = free_port()
        self._spawn([binary, "-H", "127.0.0.1", "-p", str(self.port)])
        _wait_http(self.url + "/moto-api/", self.proc, self.log_path)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id="testing", aws_secret_access_key="testing", region_name=self.region
        ).client("secretsmanager", endpoint_url=self.url)

    def put_json(self, name: str, data: dict) -> None:
        client = self.client()
        try:
            client.create_secret(Name=name, SecretString=json.dumps(data))
        except client.exceptions.ResourceExistsException:
            client.put_secret_value(SecretId=name, SecretString=json.dumps(data))


class BaoServer(_Process):
    """The OpenBao dev server (Vault API): KV v2 at ``secret/``, in memory."""

    root_token = "stdaemon-test-root"

    def start(self) -> "BaoServer":
        binary = _binary("bao")
        self.port = free_port()
        self._spawn(
            [
                binary,
                "server",
                "-dev",
                f"-dev-root-token-id={self.root_token}",
                f"-dev-listen-address=127.0.0.1:{self.port}",
            ]
        )
        _wait_http(self.url + "/v1/sys/health", self.proc, self.log_path)
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import hvac

        return hvac.Client(url=self.url, token=self.root_token, timeout=5)

    def put_v2(self, path: str, data: dict, mount: str = "secret") -> None:
        self.client().secrets.kv.v2.create_or_update_secret(path=path, secret=data, mount_point=mount)

    def enable_kv_v1(self, mount: str) -> None:
        self.client().sys.enable_secrets_engine("kv", path=mount, options={"version": "1"})

    def put_v1(self, path: str, data: dict, mount: str) -> None:
        self.client().secrets.kv.v1.create_or_update_secret(path=path, secret=data, mount_point=mount)

    def approle(self, mount: str, path: str, kv_version: int = 2) -> tuple[str, str]:
        """Enable AppRole with a read-only policy on ``mount/path``; return (role_id, secret_id)."""
        client = self.client()
        if "approle/" not in client.sys.list_auth_methods()["data"]:
            client.sys.enable_auth_method("approle")
        api_path = f"{mount}/data/{path}" if kv_version == 2 else f"{mount}/{path}"
        client.sys.create_or_update_policy(
            name="stdaemon-read", policy=f'path "{api_path}" {{ capabilities = ["read"] }}'
        )
        client.auth.approle.create_or_update_approle(
            role_name="stdaemon", token_policies=["stdaemon-read"], token_ttl="1h"
        )
        role_id = client.auth.approle.read_role_id(role_name="stdaemon")["data"]["role_id"]
        secret_id = client.auth.approle.generate_secret_id(role_name="stdaemon")["data"]["secret_id"]
        return role_id, secret_id
