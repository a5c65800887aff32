"""The benchmark command runs in its quick mode and writes its JSON (S17).

No timing is asserted: performance figures live in bench/, this only checks that
`python -m bench.run --quick` starts what it needs, finishes by itself and reports
every figure (a ratio, a memory delta, or an explicit n/a).
"""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

from tests.services import require_binary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED = {"get_live", "get_job", "webhook", "s3_put", "s3_multipart", "s3_rss", "metrics_scrape",
            "rate_limit_memory", "rate_limit_redis", "ready", "scale_out_get", "scale_out_webhook"}


def test_quick_bench_runs_and_writes_json(tmp_path):
    require_binary("wrk")
    require_binary("redis-server")
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        require_binary("initdb")  # the scale_out figure starts PostgreSQL
    out = tmp_path / "latest.json"
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    done = subprocess.run([sys.executable, "-m", "bench.run", "--quick", "--out", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "ratio" in done.stdout and str(out) in done.stdout
    result = json.loads(out.read_text())
    assert result["profile"] == "quick"
    assert result["machine"]["nproc"] >= 1
    figures = {f["key"]: f for f in result["figures"]}
    assert EXPECTED <= set(figures), sorted(figures)
    for key, figure in figures.items():
        assert figure["method"], key
        if figure["value"] is None:
            assert figure["shown"].startswith("n/a"), figure
        else:
            if figure["unit"] == "MiB":
                # A memory delta: flat memory is an honest 0.0.
                assert math.isfinite(figure["value"]) and figure["value"] >= 0, figure
            else:
                assert figure["value"] > 0, figure
            assert figure["figure"] in done.stdout
