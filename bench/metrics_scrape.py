"""Scrape cost against job history size (S10: a scrape costs the same with
100 000 jobs as with 1 000).

Usage: ``python bench/metrics_scrape.py [--sizes 1000,100000] [--scrapes N]``

For each size, writes that many jobs (mixed statuses and costs) straight into
a fresh database, starts a daemon on it (loopback port, temp state dir,
metrics enabled with every category), checks that the scrape reports the
number of jobs, then times ``--scrapes`` sequential
``GET /api/cloud/metrics/prometheus`` over one keep-alive connection, and
``Metrics.render()`` in process.  Medians are printed with the ratio of each
size to the smallest (the issue's bound is 1.5×); nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import treq  # noqa: E402
import yaml  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

import stdaemon.service as service_module  # noqa: E402
from stdaemon.config import load_config  # noqa: E402
from stdaemon.metrics.settings import CATEGORIES  # noqa: E402
from stdaemon.store.database import connect  # noqa: E402
from stdaemon.store.schema import migrate  # noqa: E402

STATUSES = ("completed", "failed", "cancelled", "running", "queued", "pending")


def fill(db_path: str, count: int) -> None:
    os.makedirs(os.path.dirname(db_path), exist_ok=True)
    conn = connect(db_path)
    migrate(conn)
    now = time.time()
    rows = []
    for i in range(count):
        status = STATUSES[i % len(STATUSES)]
        started = now - 7200 if status in ("completed", "failed", "cancelled", "running") else None
        completed = now - 3600 + (i % 600) if status in ("completed", "failed", "cancelled") else None
        rows.append((f"bench{i:07d}", "replicate", status, now - 86400 * (i % 90), started, completed,
                     round((i % 97) * 0.37, 4), "h100"))
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO jobs (job_id, provider, status, created_at, started_at, completed_at, "
                     "cost_usd, hardware_type) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    conn.execute("COMMIT")
    conn.close()


async def start(reactor, base: str, count: int):
    directory = os.path.join(base, f"jobs{count}")
    os.makedirs(directory)
    state = os.path.join(directory, "state")
    fill(os.path.join(state, "config", "cloud", "jobs.db"), count)
    path = os.path.join(directory, "stdaemon.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"server": {"listen": ["tcp:0:interface=127.0.0.1"]},
                        "rate_limit": {"calls": 0},
                        "metrics": {"prometheus_enabled": True, "prometheus_categories": list(CATEGORIES)}}, fh)
    config = load_config(path, environ={"SIMPLETUNER_STATE_DIR": state}).config
    service = service_module.StdaemonService(config, reactor)
    service.startService()
    await service.started
    return service


async def time_scrapes(reactor, url: str, n: int) -> tuple[float, bytes]:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 1
    samples = []
    body = b""
    try:
        for _ in range(n):
            started = time.perf_counter()
            response = await treq.get(url, pool=pool)
            body = await response.content()
            samples.append(time.perf_counter() - started)
    finally:
        await pool.closeCachedConnections()
    return statistics.median(samples), body


def time_render(metrics, n: int) -> float:
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        metrics.render(CATEGORIES)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


async def main(reactor, args) -> None:
    sizes = [int(s) for s in args.sizes.split(",")]
    base = tempfile.mkdtemp(prefix="stdaemon-bench-metrics-")
    results = []
    try:
        for size in sizes:
            service = await start(reactor, base, size)
            try:
                url = f"http://127.0.0.1:{service.ports[0].getHost().port}/api/cloud/metrics/prometheus"
                await time_scrapes(reactor, url, 20)  # warm-up
                http_median, body = await time_scrapes(reactor, url, args.scrapes)
                line = [ln for ln in body.decode().splitlines() if ln.startswith("simpletuner_jobs_total ")]
                reported = float(line[0].split()[1]) if line else None
                render_median = time_render(service.ctx.metrics, args.scrapes)
                results.append((size, reported, http_median, render_median))
            finally:
                await service.stopService()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    smallest = results[0]
    print(f"{'jobs':>8} {'reported':>9} {'scrape ms':>10} {'ratio':>6} {'render ms':>10} {'ratio':>6}")
    for size, reported, http_median, render_median in results:
        print(f"{size:>8} {reported!s:>9} {http_median * 1000:>10.3f} {http_median / smallest[2]:>6.2f} "
              f"{render_median * 1000:>10.3f} {render_median / smallest[3]:>6.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,100000")
    parser.add_argument("--scrapes", type=int, default=300)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
