"""Two instances against one on the same machine (S20): ``GET /api/cloud/jobs/{id}`` with an API key
and signed webhook ingestion, each instance on one shared PostgreSQL (and Redis, as the README's
"Running several instances" deploys them).

One instance: wrk ``-c16`` against it. Two instances: two wrk processes at once, ``-c8`` each, one
per instance (the same 16 connections in all; no proxy in between, so the figure is the daemons'
and not a proxy's). Best of the interleaved rounds; the ratio is two-instance throughput over
one-instance throughput. On a 2-core machine PostgreSQL, Redis, wrk and the daemons share the
same two cores: the figure says what a second process buys there, not what a second host would.

PostgreSQL is started by the tests' fixture code (``tests/postgres_fixture.py``: ``initdb`` in a temp
dir, run as the ``postgres`` user when root) with its defaults for durability (fsync on), so a
committed webhook is on disk as it is in production.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from typing import Any, Callable

from cryptography.fernet import Fernet

from bench import procs as P
from bench import wrk

JOB = "scalejob"
#: Signed deliveries prepared per webhook run (each completes its own job); also that run's bound.
DELIVERIES = {"full": 6000, "quick": 100}


def _postgres(base: str) -> Any:
    """A started PostgreSQL with fsync on (the tests' fixture turns it off for speed)."""
    from tests.postgres_fixture import PostgresServer, _bindir

    bindir = _bindir()
    if bindir is None:
        raise P.StartError("PostgreSQL is not installed (Debian package postgresql)")

    class DurablePostgres(PostgresServer):
        def start(self) -> None:
            super().start()
            self.admin("ALTER SYSTEM SET fsync = on")
            self.admin("ALTER SYSTEM SET full_page_writes = on")
            self.admin("SELECT pg_reload_conf()")

    server = DurablePostgres(bindir)
    server.start()
    return server


def _seed(url: str, jobs: int) -> None:
    """The job to GET and ``jobs`` running jobs with external ids ``scalepred<n>`` (one per delivery)."""
    import psycopg

    now = time.time()
    rows = [(JOB, "replicate", "running", now - 600, now - 300, None, 1.25, "h100", None)]
    rows += [(f"scale{i:07d}", "replicate", "running", now - 600, now - 300, None, 0.0, "h100", f"scalepred{i}")
             for i in range(jobs)]
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO jobs (job_id, provider, status, created_at, started_at, completed_at, "
                            "cost_usd, hardware_type, external_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                            rows)


def figure(bench: Any, row: Callable[..., Any], na: Callable[..., Any],
           webhook_requests: Callable[..., list]) -> list:
    """The ``scale_out`` rows (``row``/``na`` build bench.run's rows; ``webhook_requests`` is its
    signed-delivery maker)."""
    profile = bench.profile
    deliveries = DELIVERIES["quick" if profile.name == "quick" else "full"]
    method = (f"one instance: wrk -t1 -c16 against it; two instances: two wrk -t1 -c8 at once, one per "
              f"instance; best of {profile.rounds} interleaved rounds each bounded by {profile.wrk_seconds} s; "
              f"shared PostgreSQL (fsync on) and Redis on the same 2-core machine; webhooks: "
              f"{deliveries} signed deliveries per run, each completing its own job")
    figure_get = "GET /api/cloud/jobs/{id} (API key), two instances vs one, shared PostgreSQL"
    figure_hook = "signed webhook ingestion (committed), two instances vs one, shared PostgreSQL"
    if not wrk.available():
        return [na("scale_out_get", figure_get, method, "n/a (wrk not installed)")]
    if not all(os.path.exists(os.path.join(P.REPO, *p.split("/")))
               for p in ("stdaemon/store/engines.py", "stdaemon/cluster/relay.py")):
        return [na("scale_out_get", figure_get, method)]
    server = _postgres(bench.base)
    try:
        url = server.new_database()
        redis_proc = bench.procs.redis()
        config: dict = {"database": {"url": url}, "rate_limit": {"enabled": False}}
        if redis_proc is not None:
            config["cluster"] = {"redis_url": f"redis://127.0.0.1:{redis_proc.port}/0"}
        rounds = profile.rounds
        jobs_needed = deliveries * 3 * rounds + 10
        # The two keys every instance on one database must share (README: Running several instances).
        shared = {"AUDIT_HMAC_KEY": os.urandom(32).hex(), "UPLOAD_CREDENTIALS_KEY": Fernet.generate_key().decode()}
        first = bench.procs.daemon("scale-a", config, env=shared)
        _seed(url, jobs_needed)
        second = bench.procs.daemon("scale-b", config, env=shared)
        key = bench.procs.admin_key(first)
        headers = {"X-API-Key": key}
        path = f"/api/cloud/jobs/{JOB}"

        def one(proc: Any) -> float:
            return wrk.run(proc.url(path), seconds=profile.wrk_seconds, max_requests=profile.wrk_requests,
                           connections=16, headers=headers, workdir=bench.base).rate

        def two() -> float:
            with concurrent.futures.ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(wrk.run, proc.url(path), seconds=profile.wrk_seconds,
                                    max_requests=profile.wrk_requests, connections=8, headers=headers,
                                    workdir=os.path.join(bench.base, proc.name)) for proc in (first, second)]
                return sum(r.result().rate for r in runs)

        offset = [0]

        def hooks(targets: list) -> float:
            per = deliveries // len(targets)
            runs = []
            with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
                for proc in targets:
                    lua = os.path.join(bench.base, f"scale-{proc.name}-{offset[0]}.lua")
                    wrk.write_requests(lua, webhook_requests(proc.port, per, offset[0], "scalepred"))
                    offset[0] += per
                    runs.append(pool.submit(wrk.run, proc.url("/api/webhooks/replicate"),
                                            seconds=profile.wrk_seconds, max_requests=per,
                                            connections=16 // len(targets), requests_lua=lua,
                                            workdir=os.path.join(bench.base, proc.name)))
                return sum(r.result().rate for r in runs)

        best = {"get1": 0.0, "get2": 0.0, "hook1": 0.0, "hook2": 0.0}
        if profile.warmup:
            one(first)
            two()
        for _ in range(rounds):
            best["get1"] = max(best["get1"], one(first))
            best["get2"] = max(best["get2"], two())
            best["hook1"] = max(best["hook1"], hooks([first]))
            best["hook2"] = max(best["hook2"], hooks([first, second]))
    finally:
        server.stop()
    return [row("scale_out_get", figure_get, best["get2"] / best["get1"],
                detail=f"two instances {best['get2']:,.0f} req/s, one {best['get1']:,.0f} req/s",
                method=method, data=best),
            row("scale_out_webhook", figure_hook, best["hook2"] / best["hook1"],
                detail=f"two instances {best['hook2']:,.0f} deliveries/s, one {best['hook1']:,.0f} deliveries/s",
                method=method)]
