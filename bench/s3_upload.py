"""S3 upload throughput and daemon memory during a large upload (S17).

Usage: ``python bench/s3_upload.py [--size-mib 1024] [--put-mib 256]``

Runs the daemon in this process (temp state dir, loopback port) and drives it from a child
process with boto3's default configuration (``upload_file``: multipart, 10 concurrent 8 MiB
parts), so the resident memory sampled here is the daemon's alone. Figures, each as a ratio
against a peer measured in the same run:

* multipart throughput vs raw disk (writing the same bytes to a file, fsynced) — the upper bound
  for a daemon that must write and fsync every byte (and assemble the parts once more);
* single PutObject throughput vs the same raw disk figure;
* both vs moto's S3 server (``moto_server``, same client, same files) when it is installed;
* RSS growth during the upload vs the 64 MiB limit of issue 5, and during a ``download_file`` of
  the same object.

Nothing is asserted; the numbers are printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import urllib.request
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402
from twisted.internet import defer, task  # noqa: E402
from twisted.internet.utils import getProcessOutputAndValue  # noqa: E402

from stdaemon.config import load_config  # noqa: E402
from stdaemon.service import StdaemonService  # noqa: E402

MIB = 1024 * 1024
RSS_LIMIT_MIB = 64

CLIENT = r"""
import sys, time, boto3
endpoint, key, secret, path, name, mode = sys.argv[1:7]
client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                      region_name="us-east-1")
if len(sys.argv) > 7:
    client.create_bucket(Bucket="outputs")
started = time.monotonic()
if mode == "multipart":
    client.upload_file(path, "outputs", name)
elif mode == "download":
    client.download_file("outputs", name, path)
else:
    with open(path, "rb") as fh:
        client.put_object(Bucket="outputs", Key=name, Body=fh)
print(time.monotonic() - started)
"""


def rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def make_file(path: str, size_mib: int) -> None:
    block = os.urandom(MIB)
    with open(path, "wb") as fh:
        for index in range(size_mib):
            fh.write(block[index % 7:] + block[:index % 7])


def raw_disk_seconds(source: str, target: str) -> float:
    started = time.monotonic()
    with open(source, "rb") as src, open(target, "wb") as dst:
        for block in iter(lambda: src.read(MIB), b""):
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    elapsed = time.monotonic() - started
    os.unlink(target)
    return elapsed


def start_moto():
    binary = shutil.which("moto_server") or os.path.join(os.path.dirname(sys.executable), "moto_server")
    if not os.path.exists(binary):
        return None, None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([binary, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None, None


async def run(reactor, args) -> None:
    base = tempfile.mkdtemp(prefix="stdaemon-bench-s3-")
    config_path = os.path.join(base, "bench.yaml")
    with open(config_path, "w") as fh:
        yaml.safe_dump({"server": {"listen": ["tcp:0:interface=127.0.0.1"]},
                        "rate_limit": {"enabled": False}}, fh)
    config = load_config(config_path, environ={"SIMPLETUNER_STATE_DIR": os.path.join(base, "state")}).config
    service = StdaemonService(config, reactor)
    service.startService()
    await service.started
    port = service.ports[0].getHost().port
    endpoint = f"http://127.0.0.1:{port}/api/cloud/storage"
    key, secret = await service.ctx.upload_credentials.issue("bench")
    source = os.path.join(base, "source.bin")
    put_source = os.path.join(base, "put.bin")
    make_file(source, args.size_mib)
    make_file(put_source, args.put_mib)
    raw = raw_disk_seconds(source, os.path.join(base, "raw.bin"))
    raw_put = raw_disk_seconds(put_source, os.path.join(base, "raw-put.bin"))

    async def upload(path, name, mode):
        samples = [rss_mib()]
        sampler = task.LoopingCall(lambda: samples.append(rss_mib()))
        sampler.start(0.1)
        out, err, code = await getProcessOutputAndValue(
            sys.executable, ["-c", CLIENT, endpoint, key, secret, path, name, mode], env=os.environ)
        sampler.stop()
        if code != 0:
            raise SystemExit(f"client failed: {err.decode()[-2000:]}")
        return float(out.decode().strip().splitlines()[-1]), samples[0], max(samples)

    moto_proc, moto_url = start_moto()
    moto = {}
    if moto_proc is not None:
        try:
            for label, path, name, mode in (("multipart", source, "m/big.bin", "multipart"),
                                            ("put", put_source, "m/put.bin", "put")):
                out, err, code = await getProcessOutputAndValue(
                    sys.executable, ["-c", CLIENT, moto_url, "testing", "testing", path, name, mode,
                                     "create" if label == "multipart" else ""], env=os.environ)
                if code == 0:
                    moto[label] = float(out.decode().strip().splitlines()[-1])
        finally:
            moto_proc.kill()
            moto_proc.wait()

    multipart_s, rss_before, rss_peak = await upload(source, "bench/big.bin", "multipart")
    put_s, _, put_peak = await upload(put_source, "bench/put.bin", "put")
    download_s, download_before, download_peak = await upload(os.path.join(base, "back.bin"), "bench/big.bin",
                                                              "download")
    growth = rss_peak - rss_before
    for label, size, ours in (("multipart", args.size_mib, multipart_s), ("put", args.put_mib, put_s)):
        if label in moto:
            print(f"{label:9s} vs moto_server: stdaemon {size / ours:8.1f} MiB/s  moto {size / moto[label]:8.1f} "
                  f"MiB/s  stdaemon/moto speed {moto[label] / ours:5.3f}")
        else:
            print(f"{label:9s} vs moto_server: moto_server not available")
    print(f"multipart upload {args.size_mib} MiB: {args.size_mib / multipart_s:8.1f} MiB/s  "
          f"raw disk {args.size_mib / raw:8.1f} MiB/s  stdaemon/raw speed {raw / multipart_s:5.3f}")
    print(f"single PutObject {args.put_mib} MiB:  {args.put_mib / put_s:8.1f} MiB/s  "
          f"raw disk {args.put_mib / raw_put:8.1f} MiB/s  stdaemon/raw speed {raw_put / put_s:5.3f}")
    print(f"daemon RSS: before {rss_before:.1f} MiB, peak {max(rss_peak, put_peak):.1f} MiB, growth during the "
          f"multipart upload {growth:.1f} MiB = {growth / RSS_LIMIT_MIB:.2f} x the {RSS_LIMIT_MIB} MiB limit")
    print(f"download_file {args.size_mib} MiB: {args.size_mib / download_s:8.1f} MiB/s; daemon RSS growth "
          f"{download_peak - download_before:.1f} MiB = {(download_peak - download_before) / RSS_LIMIT_MIB:.2f} x "
          f"the {RSS_LIMIT_MIB} MiB limit")
    await service.stopService()
    for name in os.listdir(base):
        if name.endswith(".bin"):
            os.unlink(os.path.join(base, name))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--put-mib", type=int, default=256)
    args = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(run(reactor, args)))


if __name__ == "__main__":
    main()
