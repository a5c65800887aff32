"""Request throughput with rate limiting (memory, Redis) relative to without (S17).

Usage: ``python bench/rate_limit.py [--requests N] [--concurrency C]``

Starts, in this process, a daemon per configuration on a loopback port (temp
state dir) with one public route under the rate limiter, and drives it with
treq over keep-alive connections:

* ``off``    — ``rate_limit.calls = 0`` (the middleware steps aside);
* ``memory`` — the in-process sliding window;
* ``redis``  — the shared sliding window on a real ``redis-server`` started
  on a random port (skipped with a note when redis-server is not installed).

The limit is set high enough that nothing is refused: the figure is the cost
of deciding.  Also measured: raw decisions per second of ``limiter.check``
per backend.  Every figure is printed as a ratio against ``off`` measured in
the same run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import treq  # noqa: E402
import yaml  # noqa: E402
from klein import Klein  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.web.client import HTTPConnectionPool  # noqa: E402

import stdaemon.service as service_module  # noqa: E402
from stdaemon.config import load_config  # noqa: E402
from stdaemon.http.surface import PUBLIC, Surface, route  # noqa: E402


class BenchSurface(Surface):
    app = Klein()
    prefixes = ("/api/bench",)

    @route(app, "/api/bench/ping", access=PUBLIC)
    def ping(self, request):
        return {"ok": True}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_redis(directory: str):
    binary = shutil.which("redis-server")
    if binary is None:
        return None, None
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", directory,
                             "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None


async def make_daemon(reactor, base: str, name: str, rate_limit: dict):
    directory = os.path.join(base, name)
    os.makedirs(directory)
    path = os.path.join(directory, "stdaemon.yaml")
    with open(path, "w") as fh:
        yaml.safe_dump({"server": {"listen": ["tcp:0:interface=127.0.0.1"]},
                        "logging": {"level": "ERROR"},
                        "rate_limit": dict(rate_limit, exempt_loopback=False)}, fh)
    config = load_config(path, environ={"SIMPLETUNER_STATE_DIR": os.path.join(directory, "state")}).config
    service = service_module.StdaemonService(config, reactor)
    service.startService()
    await service.started
    return service


async def drive(reactor, url: str, requests: int, concurrency: int) -> float:
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = concurrency
    remaining = [requests]
    codes: dict[int, int] = {}

    async def worker():
        while remaining[0] > 0:
            remaining[0] -= 1
            response = await treq.get(url, pool=pool)
            await response.content()
            codes[response.code] = codes.get(response.code, 0) + 1

    started = time.perf_counter()
    await defer.gatherResults([defer.ensureDeferred(worker()) for _ in range(concurrency)])
    elapsed = time.perf_counter() - started
    await pool.closeCachedConnections()
    if set(codes) != {200}:
        print(f"  warning: status codes {codes}", file=sys.stderr)
    return requests / elapsed


async def decisions(limiting, n: int) -> float:
    limiter = limiting.get_rate_limiter(max_requests=100_000,
                                        window_seconds=60, key_prefix="bench")
    started = time.perf_counter()
    for i in range(n):
        await limiter.check(f"client-{i % 500}")
    return n / (time.perf_counter() - started)


async def main(reactor, args) -> None:
    original = service_module.build_surfaces
    service_module.build_surfaces = lambda ctx: [BenchSurface(ctx)] + original(ctx)
    base = tempfile.mkdtemp(prefix="stdaemon-bench-rl-")
    redis_proc, redis_url = start_redis(base)
    configs = [("off", {"calls": 0}),
               ("memory", {"backend": "memory", "calls": 100_000})]
    if redis_url:
        configs.append(("redis", {"backend": "redis", "redis_url": redis_url,
                                  "calls": 100_000, "timeout": 2.0}))
    results: dict[str, float] = {}
    raw = {}
    services = {}
    try:
        for name, rate_limit in configs:
            services[name] = await make_daemon(reactor, base, name, rate_limit)
        if "redis" in services:
            for _ in range(200):
                if services["redis"].ctx.rate_limiter.backend.connected:
                    break
                await task.deferLater(reactor, 0.05, lambda: None)
        urls = {name: f"http://127.0.0.1:{svc.ports[0].getHost().port}/api/bench/ping"
                for name, svc in services.items()}
        for name, url in urls.items():  # warm-up
            await drive(reactor, url, min(300, args.requests), args.concurrency)
        # interleaved rounds, best of each: order and warm-up effects cancel out
        for _ in range(args.rounds):
            for name, url in urls.items():
                rate = await drive(reactor, url, args.requests, args.concurrency)
                results[name] = max(results.get(name, 0.0), rate)
        for name, svc in services.items():
            if name != "off":
                raw[name] = await decisions(svc.ctx.rate_limiter, args.decisions)
    finally:
        for svc in services.values():
            await svc.stopService()
        service_module.build_surfaces = original
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)

    base_rate = results["off"]
    print(f"rate limiting: {args.requests} GETs x {args.rounds} rounds (best), "
          f"concurrency {args.concurrency}, one client IP")
    print(f"  off     {base_rate:9.0f} req/s  (ratio 1.00)")
    for name in ("memory", "redis"):
        if name in results:
            print(f"  {name:<7} {results[name]:9.0f} req/s  (ratio {results[name] / base_rate:.2f} vs off)")
        else:
            print(f"  {name:<7} skipped: redis-server not installed")
    if raw:
        print(f"limiter.check, sequential ({args.decisions} decisions over 500 keys):")
        for name, rate in raw.items():
            print(f"  {name:<7} {rate:9.0f} decisions/s  ({rate / base_rate:.1f}x the unlimited "
                  "request rate)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--decisions", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
