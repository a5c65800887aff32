"""stdaemon benchmarks (S17): every figure is a ratio against a peer or a limit measured
in the same run (or a memory delta), with its method stated.

Usage: ``python -m bench.run [--quick] [--only NAME,...] [--out PATH]``
(``make bench`` / ``scripts/bench`` install what is needed first).

Starts on loopback, each in a temp dir, stopped at the end: stdaemon daemons
(``twistd -n --pidfile= stdaemon --config <yaml>``, ``SIMPLETUNER_STATE_DIR`` in the temp
dir, rows inserted straight into their SQLite database before the first start), the bare
``twisted.web`` peer (``bench/peer.py``), a raw streaming sink (``bench/sink.py``),
``moto_server`` and ``redis-server``.  Loads are bounded in requests and seconds.
Prints a table and writes ``bench/results/latest.json`` (``--out``).  A figure whose
feature is not in the tree prints ``n/a (feature not present)``; a figure whose tool is
missing says which.  Nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import hashlib
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from bench import procs as P
from bench import scale_out
from bench import sink as sink_mod
from bench import wrk

MIB = 1024 * 1024
GET_JOB = "benchget"
UPLOAD_JOB = "benchs3"
NA_FEATURE = "n/a (feature not present)"


@dataclass(frozen=True)
class Profile:
    name: str
    rounds: int               # interleaved wrk rounds (best of)
    wrk_seconds: int          # each wrk run is bounded by this many seconds ...
    wrk_requests: int         # ... and by this many responses
    warmup: bool
    webhook_deliveries: int   # signed deliveries prepared (one job each); also the request bound
    webhook_seconds: int
    put_objects: int          # PutObject 4 KiB, in all, over 16 threads
    put_seconds: float
    multipart_mib: int
    rss_mib: int
    scrape_sizes: tuple
    scrape_requests: int
    scrape_seconds: int
    ready_starts: int


FULL = Profile("full", rounds=4, wrk_seconds=3, wrk_requests=200_000, warmup=True,
               webhook_deliveries=20_000, webhook_seconds=5, put_objects=3000, put_seconds=20.0,
               multipart_mib=1024, rss_mib=2048, scrape_sizes=(1_000, 100_000), scrape_requests=400,
               scrape_seconds=4, ready_starts=5)
QUICK = Profile("quick", rounds=1, wrk_seconds=1, wrk_requests=400, warmup=False,
                webhook_deliveries=150, webhook_seconds=1, put_objects=48, put_seconds=5.0,
                multipart_mib=24, rss_mib=40, scrape_sizes=(1_000, 10_000), scrape_requests=30,
                scrape_seconds=1, ready_starts=1)


# The goal of each figure (issue 16's table): key → (">=" or "<=", bound). Shown beside the figure.
GOALS: dict = {
    "get_live": (">=", 0.7),           # live vs bare twisted.web
    "get_live_klein": (">=", 1.2),     # live vs a minimal Klein app
    "health_full": (">=", 0.8),        # full health vs its own live
    "get_job": (">=", 0.5),            # job GET vs bare twisted.web checking the key, same bytes
    "webhook": (">=", 0.5),            # committed webhook ingestion vs bare GET
    "s3_put": (">=", 3.0),
    "s3_multipart": (">=", 0.6),
    "s3_rss": ("<=", 64.0),
    "metrics_scrape": ("<=", 1.1),
    "ready": ("<=", 1.5),
}


@dataclass
class Row:
    key: str
    figure: str
    value: Optional[float] = None      # the ratio (or MiB for memory deltas)
    unit: str = "x"
    text: Optional[str] = None         # shown instead of the value (n/a ...)
    detail: str = ""
    method: str = ""
    data: dict = field(default_factory=dict)

    def goal(self) -> str:
        if self.key not in GOALS:
            return ""
        op, bound = GOALS[self.key]
        sign = "≥" if op == ">=" else "≤"
        return f"{sign} {bound:g}{'x' if self.unit == 'x' else ' ' + self.unit}"

    def met(self) -> Optional[bool]:
        if self.key not in GOALS or self.value is None or self.text is not None:
            return None
        op, bound = GOALS[self.key]
        return self.value >= bound if op == ">=" else self.value <= bound

    def shown(self) -> str:
        if self.text is not None:
            return self.text
        if self.unit == "x":
            return f"{self.value:.2f}x"
        return f"{self.value:.1f} {self.unit}"

    def as_dict(self) -> dict:
        return {"key": self.key, "figure": self.figure, "value": self.value, "unit": self.unit,
                "shown": self.shown(), "goal": self.goal(), "met": self.met(), "detail": self.detail,
                "method": self.method, "data": self.data}


def feature(*relative: str) -> bool:
    """Is this capability in the tree (all of these files exist)?"""
    return all(os.path.exists(os.path.join(P.REPO, *path.split("/"))) for path in relative)


def na(key: str, figure: str, method: str, text: str = NA_FEATURE) -> Row:
    return Row(key, figure, text=text, method=method)


class Bench:
    """What the figures share: the processes, the main daemon, the peer, results so far."""

    def __init__(self, profile: Profile, base: str, log: Callable[[str], None]):
        self.profile = profile
        self.base = base
        self.procs = P.Processes(base)
        self.log = log
        self._main: Optional[P.Proc] = None
        self._main_error: Optional[str] = None
        self._peer: Optional[P.Proc] = None
        self.seed: dict = {}
        self.rates: dict = {}
        self.ready_with_jobs: dict = {}   # jobs in the database -> seconds to ready (metrics figure)

    # -- shared processes ----------------------------------------------------------------------------

    def main(self) -> P.Proc:
        """The main daemon: rate limiting off, one job to GET, jobs for the webhook figure, one
        running job with S3 upload credentials."""
        if self._main_error is not None:
            raise P.StartError(f"the main daemon did not start (see the first failed figure): {self._main_error}")
        if self._main is None:
            try:
                state = os.path.join(self.base, "main", "state")
                self.seed = P.seed_state(state, webhook_jobs=self.profile.webhook_deliveries if
                                         feature("stdaemon/webhooks/http.py") else 0,
                                         get_job=GET_JOB, upload_job=UPLOAD_JOB)
                main = self.procs.daemon("main", {"rate_limit": {"enabled": False}}, state=state)
                main.extra["key"] = self.procs.admin_key(main)
            except Exception as exc:
                self._main_error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                raise
            self._main = main
            self.log(f"main daemon ready in {main.ready_seconds:.2f} s on port {main.port}")
        return self._main

    def peer(self) -> P.Proc:
        """The bare peer; it also serves ``/keyjob/<id>``: the main daemon's key checked and the
        main daemon's own answer to the job GET (fetched once here), the same bytes."""
        if self._peer is None:
            state = os.path.join(self.base, "peer", "state")
            if not os.path.exists(P.state_paths(state)["db"]):
                P.seed_state(state, get_job=GET_JOB)
            job_body = key_hash = None
            main = self._main
            if main is not None and feature("stdaemon/jobs/http.py"):
                status, body = P.http_get(main.port, f"/api/cloud/jobs/{GET_JOB}",
                                          {"X-API-Key": main.extra["key"]})
                if status == 200:
                    job_body = os.path.join(self.base, "job-answer.json")
                    with open(job_body, "wb") as fh:
                        fh.write(body)
                    key_hash = hashlib.sha256(main.extra["key"].encode()).hexdigest()
            self._peer = self.procs.peer(P.state_paths(state)["db"], job_body=job_body, key_hash=key_hash)
            self._peer.extra["keyjob"] = job_body is not None
        return self._peer

    def wrk(self, url: str, headers: Optional[dict] = None, seconds: Optional[int] = None,
            max_requests: Optional[int] = None, connections: int = 16, requests_lua: Optional[str] = None):
        return wrk.run(url, seconds=seconds or self.profile.wrk_seconds,
                       max_requests=max_requests or self.profile.wrk_requests, connections=connections,
                       headers=headers, requests_lua=requests_lua, workdir=self.base)

    def interleaved(self, targets: dict) -> dict:
        """Best req/s of each target over ``rounds`` interleaved rounds (order and warm-up effects
        cancel out).  ``targets``: name → (url, headers)."""
        if self.profile.warmup:
            for url, headers in targets.values():
                self.wrk(url, headers, seconds=1, max_requests=2000)
        best: dict = {}
        for _ in range(self.profile.rounds):
            for name, (url, headers) in targets.items():
                result = self.wrk(url, headers)
                if name not in best or result.rate > best[name].rate:
                    best[name] = result
        return best


# ------------------------------------------------------------------------------------------ figures

GET_METHOD = ("wrk -t1 -c16, best of {rounds} interleaved runs each bounded by {seconds} s and {requests} "
              "responses; peer: bench/peer.py, plain twisted.web resources doing the same work "
              "(same JSON; for the job, the row read from SQLite on a thread) without routing, "
              "middleware, auth or metrics")


def fig_small_get(b: Bench) -> list[Row]:
    p = b.profile
    method = GET_METHOD.format(rounds=p.rounds, seconds=p.wrk_seconds, requests=p.wrk_requests)
    if not wrk.available():
        return [na("get_live", "small JSON GET /api/cloud/health/live vs bare twisted.web", method,
                   "n/a (wrk not installed)")]
    main, peer = b.main(), b.peer()
    jobs = feature("stdaemon/jobs/http.py")
    targets = {"live": (main.url("/api/cloud/health/live"), None), "peer_live": (peer.url("/live"), None),
               "klein_live": (peer.url("/klein/live"), None), "health": (main.url("/api/cloud/health"), None)}
    if jobs:
        targets["job"] = (main.url(f"/api/cloud/jobs/{GET_JOB}"), {"X-API-Key": main.extra["key"]})
        targets["peer_job"] = (peer.url(f"/jobs/{GET_JOB}"), None)
        if peer.extra.get("keyjob"):
            targets["peer_keyjob"] = (peer.url(f"/keyjob/{GET_JOB}"), {"X-API-Key": main.extra["key"]})
    best = b.interleaved(targets)
    b.rates.update({name: r.rate for name, r in best.items()})
    live, rate = best["live"].rate, (lambda name: best[name].rate)
    rows = [Row("get_live", "small JSON GET /api/cloud/health/live vs bare twisted.web",
                live / rate("peer_live"),
                detail=f"stdaemon {live:,.0f} req/s, peer {rate('peer_live'):,.0f} req/s",
                method=method, data={n: r.as_dict() for n, r in best.items()}),
            Row("get_live_klein", "small JSON GET /api/cloud/health/live vs a minimal Klein app",
                live / rate("klein_live"),
                detail=f"stdaemon {live:,.0f} req/s, minimal Klein {rate('klein_live'):,.0f} req/s",
                method=method + "; the Klein peer is one @route returning the same bytes"),
            Row("health_full", "full GET /api/cloud/health vs its own live", rate("health") / live,
                detail=f"full report {rate('health'):,.0f} req/s, live {live:,.0f} req/s",
                method=method + "; every default component (database, disk, secrets, rate_limiter, "
                                "audit, circuit breaker)")]
    if jobs and "peer_keyjob" in best:
        rows.append(Row("get_job", "GET /api/cloud/jobs/{id} (admin key) vs bare twisted.web checking the "
                                   "key, same bytes",
                        best["job"].rate / rate("peer_keyjob"),
                        detail=f"stdaemon {best['job'].rate:,.0f} req/s, peer {rate('peer_keyjob'):,.0f} req/s",
                        method=method + "; stdaemon authenticates X-API-Key (admin); the peer compares the "
                                        "key's SHA-256 and answers stdaemon's own answer bytes",
                        data={"job": best["job"].as_dict(), "peer_keyjob": best["peer_keyjob"].as_dict()}))
    elif jobs:
        rows.append(na("get_job", "GET /api/cloud/jobs/{id} vs bare twisted.web checking the key", method,
                       "n/a (the job answer could not be fetched for the peer)"))
    else:
        rows.append(na("get_job", "GET /api/cloud/jobs/{id} vs bare twisted.web checking the key", method))
    if jobs:
        rows.append(Row("get_job_sqlite", "GET /api/cloud/jobs/{id} (admin key) vs bare twisted.web + SQLite",
                        best["job"].rate / rate("peer_job"),
                        detail=f"stdaemon {best['job'].rate:,.0f} req/s, peer {rate('peer_job'):,.0f} req/s",
                        method=method + "; the peer reads the row from SQLite on a thread, no key check",
                        data={"peer_job": best["peer_job"].as_dict()}))
    for name, result in best.items():
        if result.status_errors or result.socket_errors:
            rows[0].detail += f"; {name}: {result.status_errors} non-2xx, {result.socket_errors} socket errors"
    return rows


def _webhook_requests(port: int, count: int, first: int = 0, prediction_prefix: str = "benchpred") -> list[bytes]:
    """``count`` signed "succeeded" deliveries for predictions ``<prefix><first>`` onwards."""
    from stdaemon.webhooks.signature import decode_secret, sign

    key = decode_secret(P.WEBHOOK_SECRET)
    now = int(time.time())
    out = []
    for i in range(first, first + count):
        body = json.dumps({"id": f"{prediction_prefix}{i}", "status": "succeeded", "output": ["https://example.invalid/o.bin"],
                           "metrics": {"predict_time": 12.5}}).encode()
        webhook_id = f"msg_bench{uuid.uuid4().hex}"
        headers = (f"POST /api/webhooks/replicate HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                   f"webhook-id: {webhook_id}\r\nwebhook-timestamp: {now}\r\n"
                   f"webhook-signature: {sign(key, webhook_id, now, body)}\r\n\r\n").encode()
        out.append(headers + body)
    return out


def fig_webhook(b: Bench) -> list[Row]:
    p = b.profile
    method = (f"wrk -t1 -c16 POST /api/webhooks/replicate, {p.webhook_deliveries} distinct Standard-Webhooks-"
              f"signed Replicate deliveries prepared in advance (each moves its own running job to completed: "
              f"replay record, transition, cost, credential revocation, audit entry, one committed "
              f"transaction with synchronous=FULL), bounded by {p.webhook_seconds} s and that many "
              f"deliveries; compared with the small GETs measured above in the same run")
    figure = "signed webhook ingestion (commit included) vs bare GET"
    if not feature("stdaemon/webhooks/http.py", "stdaemon/webhooks/signature.py"):
        return [na("webhook", figure, method)]
    if not wrk.available():
        return [na("webhook", figure, method, "n/a (wrk not installed)")]
    main = b.main()
    if "live" not in b.rates:
        b.rates["live"] = b.wrk(main.url("/api/cloud/health/live")).rate
    lua = os.path.join(b.base, "webhooks.lua")
    wrk.write_requests(lua, _webhook_requests(main.port, p.webhook_deliveries))
    result = b.wrk(main.url("/api/webhooks/replicate"), seconds=p.webhook_seconds,
                   max_requests=p.webhook_deliveries, requests_lua=lua)
    conn = sqlite3.connect(P.state_paths(main.extra["state"])["db"], timeout=10)
    try:
        outcomes = dict(conn.execute("SELECT outcome, COUNT(*) FROM webhook_deliveries GROUP BY outcome").fetchall())
    finally:
        conn.close()
    detail = (f"{result.rate:,.0f} deliveries/s ({result.requests} sent, outcomes {outcomes}, "
              f"{result.status_errors} non-2xx); stdaemon live GET {b.rates['live']:,.0f} req/s")
    rows = [Row("webhook", figure + " (stdaemon /health/live)", result.rate / b.rates["live"], detail=detail,
                method=method, data={"webhook": result.as_dict(), "outcomes": outcomes, "live_rate": b.rates["live"]})]
    if "klein_live" in b.rates:
        rows.append(Row("webhook_vs_klein", figure + " (bare Klein endpoint)", result.rate / b.rates["klein_live"],
                        detail=f"{result.rate:,.0f} deliveries/s vs bare Klein GET {b.rates['klein_live']:,.0f} req/s",
                        method=method, data={"klein_rate": b.rates["klein_live"]}))
    return rows


def _boto3_client(endpoint: str, key: str, secret: str):
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                        region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1},
                                      max_pool_connections=32))


def _client_cpu() -> float:
    times = os.times()
    return times.user + times.system


def _put_load(endpoint: str, key: str, secret: str, bucket: str, prefix: str, total: int,
              seconds: float, server_pid: int, threads: int = 16) -> dict:
    """PutObject of 4 KiB bodies from ``threads`` boto3 clients until ``total`` objects or ``seconds``."""
    body = os.urandom(4096)
    remaining = [total]
    lock = threading.Lock()
    errors: list = []
    clients = [_boto3_client(endpoint, key, secret) for _ in range(threads)]
    for client in clients[:1]:
        client.put_object(Bucket=bucket, Key=f"{prefix}warm", Body=body)
    deadline = time.monotonic() + seconds

    def worker(index: int) -> int:
        client, done = clients[index], 0
        while time.monotonic() < deadline:
            with lock:
                if remaining[0] <= 0:
                    break
                remaining[0] -= 1
            try:
                client.put_object(Bucket=bucket, Key=f"{prefix}put/{index}/{done}", Body=body)
                done += 1
            except Exception as exc:  # counted, shown in the detail
                errors.append(repr(exc)[:200])
        return done

    server_cpu, client_cpu = P.cpu_seconds(server_pid), _client_cpu()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        count = sum(pool.map(worker, range(threads)))
    elapsed = time.monotonic() - started
    server_cpu, client_cpu = P.cpu_seconds(server_pid) - server_cpu, _client_cpu() - client_cpu
    return {"objects": count, "seconds": round(elapsed, 3), "ops_per_s": count / elapsed if elapsed else 0.0,
            "errors": len(errors), "first_error": errors[0] if errors else None,
            "server_cpu_s": round(server_cpu, 2), "client_cpu_s": round(client_cpu, 2),
            "server_cpu_ms_per_op": round(server_cpu * 1000 / count, 3) if count else None}


def _s3_endpoint(main: P.Proc) -> str:
    return main.url("/api/cloud/storage")


def fig_s3_put(b: Bench) -> list[Row]:
    p = b.profile
    method = (f"boto3 PutObject of 4 KiB bodies from 16 threads (one client each), {p.put_objects} objects or "
              f"{p.put_seconds:.0f} s, whichever first; stdaemon with a job's SigV4 upload credentials vs "
              f"moto_server (in-memory, no durability) with the same client code")
    figure = "S3 PutObject 4 KiB, concurrency 16, vs moto_server"
    if not feature("stdaemon/s3/http.py"):
        return [na("s3_put", figure, method)]
    moto = b.procs.moto()
    if moto is None:
        return [na("s3_put", figure, method, "n/a (moto_server not installed)")]
    main = b.main()
    s3 = b.seed["s3"]
    _boto3_client(moto.url(), "testing", "testing").create_bucket(Bucket="outputs")
    ours = _put_load(_s3_endpoint(main), s3["access_key"], s3["secret"], s3["bucket"], s3["prefix"],
                     p.put_objects, p.put_seconds, main.pid)
    theirs = _put_load(moto.url(), "testing", "testing", "outputs", "bench/", p.put_objects, p.put_seconds,
                       moto.pid)
    b.procs.stop(moto)
    detail = (f"stdaemon {ours['ops_per_s']:,.0f} PUT/s ({ours['objects']} objects, {ours['errors']} errors, "
              f"{ours['server_cpu_ms_per_op']} ms server CPU/PUT), moto_server {theirs['ops_per_s']:,.0f} PUT/s "
              f"({theirs['objects']} objects, {theirs['errors']} errors, {theirs['server_cpu_ms_per_op']} ms "
              f"server CPU/PUT); client CPU {ours['client_cpu_s']} s / {theirs['client_cpu_s']} s")
    value = ours["ops_per_s"] / theirs["ops_per_s"] if theirs["ops_per_s"] else None
    if value is None or ours["objects"] == 0:
        return [Row("s3_put", figure, text="n/a (no successful PUT)", detail=detail + f" {ours['first_error']}",
                    method=method, data={"stdaemon": ours, "moto": theirs})]
    return [Row("s3_put", figure, value, detail=detail, method=method, data={"stdaemon": ours, "moto": theirs})]


def _make_file(path: str, size_mib: int, append: bool = False) -> None:
    block = os.urandom(MIB)
    with open(path, "ab" if append else "wb") as fh:
        for index in range(size_mib):
            rotate = index % 4093
            fh.write(block[rotate:] + block[:rotate])


def _upload_file(main: P.Proc, s3: dict, path: str, key: str, cpu: Optional[dict] = None) -> float:
    client = _boto3_client(_s3_endpoint(main), s3["access_key"], s3["secret"])
    server_cpu, client_cpu = P.cpu_seconds(main.pid), _client_cpu()
    started = time.monotonic()
    client.upload_file(path, s3["bucket"], s3["prefix"] + key)  # boto3 defaults: 8 MiB parts, 10 threads
    elapsed = time.monotonic() - started
    if cpu is not None:
        cpu["server_cpu_s"] = round(P.cpu_seconds(main.pid) - server_cpu, 2)
        cpu["client_cpu_s"] = round(_client_cpu() - client_cpu, 2)
    client.delete_object(Bucket=s3["bucket"], Key=s3["prefix"] + key)
    return elapsed


def fig_s3_large(b: Bench) -> list[Row]:
    p = b.profile
    m_method = (f"boto3 upload_file of a {p.multipart_mib} MiB file (defaults: multipart, 8 MiB parts, 10 "
                "threads; stdaemon writes, fsyncs and assembles the parts) vs the same file PUT once over "
                "loopback to bench/sink.py (reads the socket, writes, fsyncs; no parsing, hashing or "
                "assembly), the raw loopback+disk limit")
    r_method = (f"VmRSS of the daemon process sampled every 50 ms from /proc/<pid>/status during a "
                f"{p.rss_mib} MiB boto3 multipart upload; growth = peak - value before; VmHWM reported too")
    m_fig = f"S3 multipart upload {p.multipart_mib} MiB (boto3) vs raw loopback+disk"
    r_fig = f"daemon RSS growth during a {p.rss_mib} MiB upload"
    if not feature("stdaemon/s3/http.py"):
        return [na("s3_multipart", m_fig, m_method), na("s3_rss", r_fig, r_method)]
    main = b.main()
    s3 = b.seed["s3"]
    data_dir = os.path.join(b.base, "data")
    os.makedirs(data_dir, exist_ok=True)
    source = os.path.join(data_dir, "source.bin")
    _make_file(source, p.multipart_mib)
    sink = b.procs.sink(os.path.join(data_dir, "sink"))
    sink_mod.send(sink.port, source)  # warm-up (and the file into the page cache)
    raw = min(sink_mod.send(sink.port, source) for _ in range(2))
    b.procs.stop(sink)
    cpu: dict = {}
    ours = _upload_file(main, s3, source, "multipart.bin", cpu)
    ours_mibs, raw_mibs = p.multipart_mib / ours, p.multipart_mib / raw
    rows = [Row("s3_multipart", m_fig, ours_mibs / raw_mibs,
                detail=(f"stdaemon {ours_mibs:,.0f} MiB/s (daemon CPU {cpu['server_cpu_s']} s, boto3 client CPU "
                        f"{cpu['client_cpu_s']} s over {ours:.1f} s), raw sink {raw_mibs:,.0f} MiB/s"),
                method=m_method, data=dict(cpu, stdaemon_seconds=ours, raw_seconds=raw, mib=p.multipart_mib))]

    _make_file(source, p.rss_mib - p.multipart_mib, append=True)
    samples: list = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            rss = P.rss_kib(main.pid).get("VmRSS")
            if rss:
                samples.append(rss)
            stop.wait(0.05)

    before = P.rss_kib(main.pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        seconds = _upload_file(main, s3, source, "rss.bin")
    finally:
        stop.set()
        sampler.join(5)
    after = P.rss_kib(main.pid)
    os.unlink(source)
    peak = max(samples + [after.get("VmRSS", 0)])
    growth_mib = (peak - before.get("VmRSS", 0)) / 1024.0
    rows.append(Row("s3_rss", r_fig, growth_mib, unit="MiB",
                    detail=(f"VmRSS {before.get('VmRSS', 0) / 1024:.0f} -> peak {peak / 1024:.0f} MiB "
                            f"({growth_mib / p.rss_mib * 100:.1f}% of the upload), VmHWM "
                            f"{before.get('VmHWM', 0) / 1024:.0f} -> {after.get('VmHWM', 0) / 1024:.0f} MiB, "
                            f"{p.rss_mib / seconds:,.0f} MiB/s"),
                    method=r_method, data={"before_kib": before, "after_kib": after, "peak_kib": peak,
                                           "samples": len(samples), "seconds": seconds}))
    return rows


def fig_metrics(b: Bench) -> list[Row]:
    p = b.profile
    small, large = p.scrape_sizes
    method = (f"two daemons, {small:,} and {large:,} jobs inserted into their SQLite before start (mixed statuses "
              f"and costs), metrics enabled with every category; wrk -t1 -c1 GET /api/cloud/metrics/prometheus "
              f"(sequential scrapes over one keep-alive connection), best of {max(2, p.rounds)} interleaved runs "
              f"of {p.scrape_requests} scrapes or {p.scrape_seconds} s; ratio of mean scrape times")
    figure = f"metrics scrape time, {large:,} vs {small:,} jobs"
    if not feature("stdaemon/metrics/service.py", "stdaemon/metrics/http.py"):
        return [na("metrics_scrape", figure, method)]
    if not wrk.available():
        return [na("metrics_scrape", figure, method, "n/a (wrk not installed)")]
    from stdaemon.metrics.settings import CATEGORIES

    daemons = {}
    for size in (small, large):
        state = os.path.join(b.base, f"metrics{size}", "state")
        P.seed_state(state, filler_jobs=size)
        daemons[size] = b.procs.daemon(f"metrics{size}", {
            "rate_limit": {"enabled": False},
            "metrics": {"prometheus_enabled": True, "prometheus_categories": list(CATEGORIES)}}, state=state)
    reported = {}
    for size, proc in daemons.items():
        status, body = P.http_get(proc.port, "/api/cloud/metrics/prometheus")
        line = [ln for ln in body.decode("utf-8", "replace").splitlines() if ln.startswith("simpletuner_jobs_total ")]
        reported[size] = float(line[0].split()[1]) if status == 200 and line else None
    best: dict = {}
    for _ in range(max(2, p.rounds)):
        for size, proc in daemons.items():
            result = b.wrk(proc.url("/api/cloud/metrics/prometheus"), seconds=p.scrape_seconds,
                           max_requests=p.scrape_requests, connections=1)
            if size not in best or result.rate > best[size].rate:
                best[size] = result
    for size, proc in daemons.items():
        b.ready_with_jobs[size] = proc.ready_seconds
        b.procs.stop(proc)
    ms = {size: 1000.0 / r.rate for size, r in best.items()}
    return [Row("metrics_scrape", figure, ms[large] / ms[small],
                detail=(f"{ms[large]:.2f} ms vs {ms[small]:.2f} ms per scrape; simpletuner_jobs_total reported "
                        f"{reported[large]} / {reported[small]}"),
                method=method, data={"ms_per_scrape": ms, "reported_jobs_total": reported,
                                     "runs": {s: r.as_dict() for s, r in best.items()}})]


def fig_rate_limit(b: Bench) -> list[Row]:
    p = b.profile
    method = (f"daemons alike but for rate_limit (off; memory; sqlite file in the state dir; redis on a local "
              f"redis-server), "
              f"limit 100000 calls per 1 s so nothing is refused (the figure is the cost of deciding), "
              f"exempt_loopback off; wrk -t1 -c16 GET /api/cloud/jobs/{{id}} with the admin key, best of "
              f"{p.rounds} interleaved runs of {p.wrk_seconds} s / {p.wrk_requests} responses")
    fig_m, fig_r = "throughput with rate limiting (memory) vs off", "throughput with rate limiting (redis) vs off"
    fig_s = "throughput with rate limiting (sqlite) vs off"
    if not feature("stdaemon/ratelimit/service.py", "stdaemon/ratelimit/http.py"):
        return [na("rate_limit_memory", fig_m, method), na("rate_limit_redis", fig_r, method)]
    if not wrk.available():
        return [na("rate_limit_memory", fig_m, method, "n/a (wrk not installed)"),
                na("rate_limit_redis", fig_r, method, "n/a (wrk not installed)")]
    redis = b.procs.redis()
    limit = {"enabled": True, "calls": 100_000, "period": 1, "exempt_loopback": False}
    configs = {"off": {"enabled": False}, "memory": dict(limit, backend="memory"),
               "sqlite": dict(limit, backend="sqlite")}
    if redis is not None:
        configs["redis"] = dict(limit, backend="redis", redis_url=f"redis://127.0.0.1:{redis.port}/0",
                                timeout=2.0, fail_open=False)
    daemons = {}
    for name, rate_limit in configs.items():
        state = os.path.join(b.base, f"rl-{name}", "state")
        P.seed_state(state, get_job=GET_JOB)
        daemons[name] = b.procs.daemon(f"rl-{name}", {"rate_limit": rate_limit}, state=state)
        daemons[name].extra["key"] = b.procs.admin_key(daemons[name])
    best = b.interleaved({name: (proc.url(f"/api/cloud/jobs/{GET_JOB}"), {"X-API-Key": proc.extra["key"]})
                          for name, proc in daemons.items()})
    for proc in daemons.values():
        b.procs.stop(proc)
    if redis is not None:
        b.procs.stop(redis)
    off = best["off"].rate
    rows = []
    for name, figure in (("memory", fig_m), ("sqlite", fig_s), ("redis", fig_r)):
        if name not in best:
            rows.append(na(f"rate_limit_{name}", figure, method, "n/a (redis-server not installed)"))
            continue
        r = best[name]
        detail = f"{r.rate:,.0f} req/s vs off {off:,.0f} req/s"
        if r.status_errors:
            detail += f"; {r.status_errors} non-2xx (refused or failed decisions)"
        rows.append(Row(f"rate_limit_{name}", figure, r.rate / off, detail=detail, method=method,
                        data={"limited": r.as_dict(), "off": best["off"].as_dict()}))
    return rows


def fig_ready(b: Bench) -> list[Row]:
    p = b.profile
    method = (f"median of {p.ready_starts} starts, each from spawning the process to the first 200 of "
              f"GET /api/cloud/health/ready (polled every 20 ms): `twistd -n stdaemon` on a fresh state dir "
              f"(migrations, first admin key) vs the bare peer (python + twisted.web) answering its first GET, "
              f"both with their bytecode compiled beforehand, as installed; "
              f"also the metrics figure's daemons, which start on a database that already holds jobs")
    figure = "time from process start to ready vs bare twisted.web peer"
    ours, theirs = [], []
    for index in range(p.ready_starts):
        proc = b.procs.daemon(f"ready{index}", {"rate_limit": {"enabled": False}})
        ours.append(proc.ready_seconds)
        b.procs.stop(proc)
        peer = b.procs.peer()
        theirs.append(peer.ready_seconds)
        b.procs.stop(peer)
    a, c = statistics.median(ours), statistics.median(theirs)
    detail = f"stdaemon {a:.2f} s, peer {c:.2f} s"
    if b.ready_with_jobs:
        detail += "; with " + ", ".join(f"{n:,} jobs {s:.2f} s" for n, s in sorted(b.ready_with_jobs.items()))
    return [Row("ready", figure, a / c, detail=detail, method=method,
                data={"stdaemon_seconds": ours, "peer_seconds": theirs,
                      "with_jobs_seconds": {str(n): s for n, s in b.ready_with_jobs.items()}})]


def fig_scale_out(b: Bench) -> list[Row]:
    """Two instances against one on a shared PostgreSQL (bench/scale_out.py)."""
    return scale_out.figure(b, Row, na, _webhook_requests)


FIGURES: list[tuple[str, Callable[[Bench], list[Row]]]] = [
    ("get", fig_small_get),
    ("webhook", fig_webhook),
    ("s3_put", fig_s3_put),
    ("s3_large", fig_s3_large),
    ("metrics", fig_metrics),
    ("rate_limit", fig_rate_limit),
    ("ready", fig_ready),
    ("scale_out", fig_scale_out),
]


# ------------------------------------------------------------------------------------------ output


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = ""
    try:
        mem = subprocess.run(["free", "-h"], capture_output=True, text=True, timeout=10).stdout.splitlines()[1]
        mem = mem.split()[1] + " total"
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    return {"nproc": os.cpu_count(), "memory": mem, "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release()}


def table(rows: list[Row]) -> str:
    width = max([len(r.figure) for r in rows] + [6])
    lines = [f"{'figure':<{width}}  {'ratio':>12}  {'goal':>9}  {'':7}  measured",
             f"{'-' * width}  {'-' * 12}  {'-' * 9}  {'-' * 7}  {'-' * 8}"]
    for r in rows:
        met = r.met()
        verdict = "" if met is None else ("met" if met else "NOT met")
        lines.append(f"{r.figure:<{width}}  {r.shown():>12}  {r.goal():>9}  {verdict:7}  {r.detail}")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description="stdaemon benchmarks (S17): ratios measured in one run")
    parser.add_argument("--quick", action="store_true", help="tiny bounded loads (smoke test, < 60 s)")
    parser.add_argument("--only", default="", help="comma-separated figures: " + ",".join(n for n, _ in FIGURES))
    parser.add_argument("--out", default=os.path.join(P.REPO, "bench", "results", "latest.json"),
                        help="JSON results (default bench/results/latest.json)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (daemon logs) for inspection")
    args = parser.parse_args(argv)
    profile = QUICK if args.quick else FULL
    selected = [n for n in args.only.split(",") if n] or [n for n, _ in FIGURES]
    unknown = set(selected) - {n for n, _ in FIGURES}
    if unknown:
        parser.error(f"unknown figure(s): {', '.join(sorted(unknown))}")

    def log(message: str) -> None:
        print(f"[bench {time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    started = time.monotonic()
    base = tempfile.mkdtemp(prefix="stdaemon-bench-")
    bench = Bench(profile, base, log)
    log("bytecode compiled in " + ", ".join(P.compile_bytecode(base)))
    rows: list[Row] = []
    failures = 0
    try:
        for name, fn in FIGURES:
            if name not in selected:
                continue
            log(f"figure {name} ...")
            try:
                rows.extend(fn(bench))
            except Exception as exc:  # one broken figure must not hide the others
                failures += 1
                log(f"figure {name} failed:\n{traceback.format_exc()}")
                lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()] or [""]
                summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
                rows.append(Row(name, name, text="error", detail=f"{type(exc).__name__}: {summary[:300]}"))
    finally:
        bench.procs.close()
        if args.keep:
            log(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    elapsed = time.monotonic() - started
    info = machine()
    result = {"generated_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "profile": profile.name, "seconds": round(elapsed, 1), "machine": info,
              "figures": [r.as_dict() for r in rows]}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2, default=str)
    print(f"stdaemon benchmarks ({profile.name}, {elapsed:.0f} s) on {info['nproc']} CPUs ({info['cpu']}), "
          f"memory {info['memory']}")
    print(table(rows))
    print("\nmethods:")
    for r in rows:
        if r.method:
            print(f"- {r.figure}: {r.method}")
    print(f"\nwritten to {args.out}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
