"""Where the time of a request goes: a daemon run under cProfile while wrk drives one path.

Usage: ``python -m bench.profile [--seconds 5] [--top 30] [--path live|job|health|webhook] ...``

For each path asked for, starts the daemon with ``bench/profiled_daemon.py`` (profiled from ready
on; fresh state dir, rate limiting off, one job row seeded), drives it with ``wrk -t1 -c16`` for ``--seconds``, stops it
with SIGTERM (the profile is written at exit) and prints the top functions by own time and by
cumulative time, with the request rate measured while profiling (the profiler's overhead lowers it;
compare the shares, not the rate). docs/PROFILE.md keeps a run of it.
"""

from __future__ import annotations

import argparse
import io
import os
import pstats
import shutil
import signal
import subprocess
import sys
import tempfile

import yaml

from bench import procs as P
from bench import wrk
from bench.run import _webhook_requests

GET_JOB = "benchget"
PATHS = {"live": "/api/cloud/health/live", "job": f"/api/cloud/jobs/{GET_JOB}", "health": "/api/cloud/health",
         "webhook": "/api/webhooks/replicate"}
#: Signed deliveries prepared for the ``webhook`` path (each completes its own running job), which
#: also bounds that run.
WEBHOOK_DELIVERIES = 20_000


def profile_path(name: str, seconds: int, top: int, base: str) -> str:
    state = os.path.join(base, name, "state")
    P.seed_state(state, get_job=GET_JOB, webhook_jobs=WEBHOOK_DELIVERIES if name == "webhook" else 0)
    directory = os.path.join(base, name)
    port = P.free_port()
    config = {"server": {"listen": [f"tcp:{port}:interface=127.0.0.1"]}, "logging": {"level": "WARNING"},
              "rate_limit": {"enabled": False}, "jobs": {"poll_interval": 86400}}
    config_path = os.path.join(directory, "stdaemon.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump(config, fh)
    out = os.path.join(directory, "profile.out")
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("REPLICATE_", "AWS_", "VAULT_", "RATE_LIMIT_", "SIMPLETUNER_"))}
    environ.update({"SIMPLETUNER_STATE_DIR": state, "PYTHONUNBUFFERED": "1",
                    "REPLICATE_WEBHOOK_SECRET": P.WEBHOOK_SECRET})
    argv = [sys.executable, "-m", "bench.profiled_daemon", config_path, out]
    processes = P.Processes(directory)
    try:
        environ["PYTHONPATH"] = P.REPO
        proc = processes._spawn("daemon", argv, port, environ, cwd=P.REPO)
        processes.wait_http(proc, "/api/cloud/health/ready")
        headers = None
        if name == "job":
            with open(P.state_paths(state)["admin_key"]) as fh:
                headers = {"X-API-Key": fh.read().strip()}
        if name == "webhook":
            lua = os.path.join(directory, "webhooks.lua")
            wrk.write_requests(lua, _webhook_requests(port, WEBHOOK_DELIVERIES))
            result = wrk.run(proc.url(PATHS[name]), seconds=seconds, max_requests=WEBHOOK_DELIVERIES,
                             connections=16, requests_lua=lua, workdir=directory)
        else:
            wrk.run(proc.url(PATHS[name]), seconds=1, max_requests=2000, connections=16, headers=headers,
                    workdir=directory)
            result = wrk.run(proc.url(PATHS[name]), seconds=seconds, max_requests=10_000_000, connections=16,
                             headers=headers, workdir=directory)
        proc.popen.send_signal(signal.SIGTERM)
        proc.popen.wait(60)
    finally:
        processes.close()
    text = io.StringIO()
    stats = pstats.Stats(out, stream=text)
    stats.strip_dirs()
    text.write(f"## {'POST' if name == 'webhook' else 'GET'} {PATHS[name]}: {result.rate:,.0f} req/s under the profiler, "
               f"{result.requests} requests, {result.status_errors} non-2xx\n\n")
    text.write(by_file(stats))
    text.write("\n### by own time\n")
    stats.sort_stats("tottime").print_stats(top)
    text.write("\n### by cumulative time\n")
    stats.sort_stats("cumulative").print_stats(top)
    text.write("\n### what the root's pipeline calls (root.py _handle, _run_endpoint, _observe)\n")
    stats.sort_stats("cumulative").print_callees(r"root.py:\d+\((_handle|_run_endpoint|_observe|_authorise)\)")
    return text.getvalue()


def by_file(stats: pstats.Stats, top: int = 15) -> str:
    """Own CPU time summed per source file (which layer the time is spent in)."""
    totals: dict = {}
    calls = 0
    for (filename, _, function), (primitive, _, tottime, _, _) in stats.stats.items():  # type: ignore[attr-defined]
        key = "(C functions: sockets, epoll, json, hashing ...)" if filename == "~" else filename
        totals[key] = totals.get(key, 0.0) + tottime
        if function == "_handle" and filename == "root.py":
            calls = primitive
    whole = sum(totals.values()) or 1.0
    lines = ["### own CPU time per source file (reactor thread)", "",
             "| file | seconds | share |", "|---|---|---|"]
    for key, seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {key} | {seconds:.3f} | {seconds / whole:.1%} |")
    per = f"; {whole / calls * 1e6:,.0f} µs of reactor CPU per request under the profiler" if calls else ""
    lines.append(f"\n{whole:.3f} s in all{per}\n")
    return "\n".join(lines) + "\n"


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--path", action="append", choices=sorted(PATHS), help="repeatable; default: all")
    args = parser.parse_args(argv)
    if not wrk.available():
        print("wrk is not installed", file=sys.stderr)
        return 1
    base = tempfile.mkdtemp(prefix="stdaemon-profile-")
    try:
        for name in args.path or ["live", "job", "health"]:
            print(profile_path(name, args.seconds, args.top, base))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
