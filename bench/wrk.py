"""Drive HTTP load with ``wrk`` (Debian package), bounded in requests AND seconds.

``wrk`` alone stops after ``-d`` seconds; the Lua script below also stops each
thread after ``max_requests`` responses, and reports exact figures as one JSON
line from ``done()``.  With ``requests_lua`` (a file returning a table of raw
requests built with ``wrk.format``) every request is taken from the table in
order (signed webhook deliveries, each with its own id).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

SCRIPT = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local ts = ffi.new("bench_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)  -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) / 1e9
end

local max_requests = tonumber(os.getenv("BENCH_MAX_REQUESTS") or "0")
local requests_file = os.getenv("BENCH_REQUESTS_LUA") or ""
local threads = {}
counted = 0
first = 0
last = 0
local reqs = nil
local index = 0

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  first = now()
  last = first
end

if requests_file ~= "" then
  reqs = dofile(requests_file)
  function request()
    index = index + 1
    if index > #reqs then index = 1 end
    return reqs[index]
  end
end

function response(status, headers, body)
  counted = counted + 1
  last = now()
  if max_requests > 0 and counted >= max_requests then
    wrk.thread:stop()
  end
end

function done(summary, latency, requests)
  -- wrk's own duration is always -d (its main thread sleeps that long): measure from the
  -- threads' clocks instead, from the first request to the last response.
  local total, t0, t1 = 0, nil, nil
  for _, thread in ipairs(threads) do
    total = total + thread:get("counted")
    local a, b = thread:get("first"), thread:get("last")
    if t0 == nil or a < t0 then t0 = a end
    if t1 == nil or b > t1 then t1 = b end
  end
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests": %d, "seconds": %.6f, "status_errors": %d, "connect_errors": %d, ' ..
    '"read_errors": %d, "write_errors": %d, "timeouts": %d, "latency_mean_us": %.1f, "latency_p50_us": %d, ' ..
    '"latency_p99_us": %d}\n',
    total, (t1 or 0) - (t0 or 0), e.status, e.connect, e.read, e.write, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass
class WrkResult:
    requests: int
    seconds: float
    status_errors: int
    socket_errors: int
    latency_mean_ms: float
    latency_p99_ms: float

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"requests": self.requests, "seconds": round(self.seconds, 3), "req_per_s": round(self.rate, 1),
                "non_2xx": self.status_errors, "socket_errors": self.socket_errors,
                "latency_mean_ms": round(self.latency_mean_ms, 3), "latency_p99_ms": round(self.latency_p99_ms, 3)}


def available() -> Optional[str]:
    return shutil.which("wrk")


def run(url: str, *, seconds: float, max_requests: int, connections: int = 16, threads: int = 1,
        headers: Optional[dict] = None, requests_lua: Optional[str] = None, workdir: str = "/tmp") -> WrkResult:
    """One bounded ``wrk`` run; raises RuntimeError when wrk fails or reports nothing."""
    binary = available()
    if binary is None:
        raise RuntimeError("wrk is not installed (Debian package wrk; scripts/bench installs it)")
    script = os.path.join(workdir, "bench-wrk.lua")
    with open(script, "w") as fh:
        fh.write(SCRIPT)
    argv = [binary, "-t", str(threads), "-c", str(connections), "-d", f"{max(1, int(round(seconds)))}s",
            "--timeout", "10s", "-s", script]
    for name, value in (headers or {}).items():
        argv += ["-H", f"{name}: {value}"]
    argv.append(url)
    per_thread = max(1, max_requests // threads)
    env = dict(os.environ, BENCH_MAX_REQUESTS=str(per_thread), BENCH_REQUESTS_LUA=requests_lua or "")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCHJSON ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout[-1500:]} {done.stderr[-1500:]}")
    data = json.loads(line[len("BENCHJSON "):])
    return WrkResult(requests=data["requests"], seconds=data["seconds"],
                     status_errors=data["status_errors"],
                     socket_errors=data["connect_errors"] + data["read_errors"] + data["write_errors"]
                     + data["timeouts"],
                     latency_mean_ms=data["latency_mean_us"] / 1000.0, latency_p99_ms=data["latency_p99_us"] / 1000.0)


def lua_string(data: bytes) -> str:
    """A Lua long-bracket-free string literal for arbitrary bytes."""
    out = []
    for byte in data:
        if 32 <= byte < 127 and byte not in (34, 92):
            out.append(chr(byte))
        else:
            out.append("\\%03d" % byte)
    return '"' + "".join(out) + '"'


def write_requests(path: str, raw_requests: list[bytes]) -> None:
    """A Lua file returning the raw requests in order (see ``requests_lua``)."""
    with open(path, "w") as fh:
        fh.write("return {\n")
        for raw in raw_requests:
            fh.write(lua_string(raw) + ",\n")
        fh.write("}\n")
