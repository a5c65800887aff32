"""Start-up imports only what serving needs: the AWS SDK (and its common runtime), Vault's client and
Redis's are imported on first use (a secrets lookup in AWS/Vault, the redis rate-limit backend, a
CRC64/NVME checksum, the cluster's Redis connections), not at start."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("boto3", "botocore", "awscrt", "hvac", "redis", "psycopg", "txredisapi")

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
