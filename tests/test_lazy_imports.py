"""Start-up imports only what serving needs: the AWS SDK, Vault's client, Redis's, PostgreSQL's and the
S3 backing store are imported on first use (a secrets lookup in AWS/Vault, the redis rate-limit
backend, the cluster's Redis connections, ``storage.backend: s3``), not at start.

Two libraries are loaded on purpose once the daemon is ready, off the reactor: the C CRC libraries
(``crc32c``, ``awscrt``) are imported in the S3 pool, because an upload's aws-chunked decoder runs on
the reactor and would otherwise import them in a request.  pyOpenSSL is not in the
list: Twisted's reactor imports it (``twisted.internet.posixbase``) whatever stdaemon does; the
configuration alone (``--check-config``) does not load it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("boto3", "botocore", "s3transfer", "hvac", "redis", "psycopg", "txredisapi",
         "stdaemon.s3.backing_store", "stdaemon.s3.backing_client")

SCRIPT = r"""
import json, os, sys
from twisted.internet import reactor
from stdaemon.config.loader import load_config
from stdaemon.service import StdaemonService

path = os.path.join(sys.argv[1], "stdaemon.yaml")
with open(path, "w") as fh:
    fh.write("server:\n  listen: ['tcp:0:interface=127.0.0.1']\n")
config = load_config(path, environ={"SIMPLETUNER_STATE_DIR": os.path.join(sys.argv[1], "state")}).config
service = StdaemonService(config, reactor)
service.privilegedStartService()
service.startService()
result = {}

def ready(_):
    result["loaded"] = sorted(m for m in json.loads(sys.argv[2]) if m in sys.modules)
    result["ready"] = service.ctx.health.phase
    service.stopService().addBoth(lambda _: reactor.stop())

def failed(failure):
    result["error"] = failure.getErrorMessage()
    reactor.stop()

service.started.addCallbacks(ready, failed)
reactor.callLater(60, reactor.stop)
reactor.run()
print("RESULT " + json.dumps(result))
"""


def test_heavy_clients_are_not_imported_to_serve(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_", "SIMPLETUNER_"))}
    env["PYTHONPATH"] = REPO
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), json.dumps(HEAVY)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert result.get("ready") == "ready", result
    assert result["loaded"] == [], result


CONFIG_ONLY = r"""
import sys
from stdaemon.tap import Options
options = Options()
options.parseOptions(["--config", sys.argv[1]])
print("RESULT " + ",".join(m for m in ("twisted.internet.ssl", "OpenSSL", "boto3", "pydantic") if m in sys.modules))
"""


def test_the_configuration_alone_loads_no_tls_or_aws(tmp_path):
    """``twistd stdaemon --check-config`` and the options twistd parses before the reactor: no
    TLS stack (no CA bundle configured), no AWS SDK, no request models."""
    path = tmp_path / "stdaemon.yaml"
    path.write_text("server:\n  listen: ['tcp:0:interface=127.0.0.1']\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "VAULT_", "SIMPLETUNER_"))}
    env.update(PYTHONPATH=REPO, SIMPLETUNER_STATE_DIR=str(tmp_path / "state"))
    done = subprocess.run([sys.executable, "-c", CONFIG_ONLY, str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, done.stdout[-2000:] + done.stderr[-3000:]
    assert line[0] == "RESULT ", line[0]
