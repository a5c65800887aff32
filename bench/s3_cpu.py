"""CPU of the S3 upload path's pure parts, per operation, without a network or a disk.

Usage: ``python -m bench.s3_cpu [--ops 2000] [--profile] [--only head,checksums]``

* ``head``: what the reactor does with the head of a boto3 PutObject of 4 KiB before and after its
  body, minus twisted's HTTP parsing and the pool: authenticate the SigV4 ``Authorization`` header
  (:class:`~stdaemon.s3.auth.S3Authenticator` with an in-memory credential), read what the upload
  sink needs (payload hash, checksum algorithms), check the body's digests and collect the metadata
  and conditions to store. The headers are the very ones botocore signs for ``put_object``.
* ``checksums``: MiB/s of each ``x-amz-checksum-*`` algorithm over 8 MiB of data.
* ``chunked``: MiB/s of the aws-chunked decoder over a 64 MiB body as botocore sends it over HTTPS
  (unsigned chunks of 64 KiB with a CRC32 trailer), fed in the upload sink's 1 MiB batches, the
  decoded pieces hashed (MD5) as the sink's write does.

The figures are deterministic enough to compare two trees on a busy machine: ``--profile`` prints
cProfile's function-call count per operation (the same on every run), and the whole script runs
under ``valgrind --tool=callgrind`` for instruction counts. Wall-clock microseconds are printed too,
but they move with the machine's load.
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import os
import pstats
import sys
import time
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twisted.web.http_headers import Headers  # noqa: E402

from stdaemon.s3 import checksums as s3_checksums  # noqa: E402
from stdaemon.s3.auth import S3Authenticator  # noqa: E402
from stdaemon.s3.credentials import UploadCredential  # noqa: E402

ENDPOINT = "http://127.0.0.1:8080/api/cloud/storage"
ACCESS_KEY, SECRET = "STUPBENCHKEY0000", "benchsecret" * 3
BODY = os.urandom(4096)


def signed_put_headers(now: float) -> tuple[str, Headers]:
    """(raw path, headers) of a botocore-signed PutObject with its default CRC32 checksum."""
    import botocore.session
    from botocore.config import Config

    session = botocore.session.get_session()
    client = session.create_client("s3", endpoint_url=ENDPOINT, region_name="us-east-1",
                                   aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET,
                                   config=Config(s3={"addressing_style": "path"}))
    captured: dict = {}

    def grab(request: Any, **_: Any) -> None:
        captured["request"] = request
        raise RuntimeError("captured")

    client.meta.events.register("before-send.s3.PutObject", grab)
    try:
        client.put_object(Bucket="outputs", Key="job-1/bench/object.bin", Body=BODY,
                          Metadata={"purpose": "bench"}, ContentType="application/octet-stream")
    except RuntimeError:
        pass
    request = captured["request"]
    headers = Headers()
    for name, value in request.headers.items():
        headers.addRawHeader(name.encode("latin-1"), value if isinstance(value, bytes) else value.encode("latin-1"))
    headers.setRawHeaders(b"host", [b"127.0.0.1:8080"])
    headers.setRawHeaders(b"content-length", [str(len(BODY)).encode()])
    path = request.url.split("8080", 1)[1]
    return path, headers


class _Credentials:
    def __init__(self, cred: UploadCredential):
        self.cred = cred

    async def lookup(self, access_key: str):
        return self.cred if access_key == self.cred.access_key_id else None

    async def lookup_token(self, token: str):
        return None

    async def check_job_active(self, cred: UploadCredential) -> bool:
        return True

    async def read_prefixes(self, cred: UploadCredential) -> tuple:
        return ()


def _run(coro: Any) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    raise RuntimeError("the coroutine waited")


def head_op(now: float, raw_path: str, headers: Headers):
    """One PUT's head work as the daemon does it (see the module docstring)."""
    from stdaemon.s3 import http as s3_http  # noqa: F401  (the surface's imports, as in the daemon)
    from stdaemon.s3.parsing import stored_metadata, write_conditions
    from stdaemon.s3.uploads import UploadSink

    cred = UploadCredential(ACCESS_KEY, "job-1", "outputs", "job-1/", SECRET, now + 3600)
    clock = SimpleNamespace(seconds=lambda: now)
    auth = S3Authenticator(_Credentials(cred), principal_auth=None, clock=clock,
                           path_prefix="/api/cloud/storage", denied=lambda *a, **k: None)
    storage = SimpleNamespace(job_for=lambda target: "job-1", progress=SimpleNamespace(start=lambda *a: None))
    target = SimpleNamespace(bucket="outputs", key="job-1/bench/object.bin", upload_id=None)
    md5, sha256 = hashlib.md5(BODY), hashlib.sha256(BODY)
    pending = SimpleNamespace(md5=md5, sha256=sha256,
                              checksum_b64=lambda algorithm: s3_checksums.checksum_b64(algorithm, BODY))

    def op() -> None:
        request = SimpleNamespace(requestHeaders=headers, channel=None, method=b"PUT", uri=raw_path.encode())
        request.getHeader = lambda name: (headers.getRawHeaders(name) or [None])[-1]
        caller = _run(auth.authenticate(request, "PUT", raw_path, "", None, target=raw_path))
        request.s3_caller = caller
        sink = UploadSink(storage, request, len(BODY), target, 5 * 1024 ** 3, caller)
        s3_http.StorageSurface._verified(request, sink, pending)
        stored_metadata(request)
        write_conditions(request)

    return op


def bench_head(ops: int, profile: bool) -> None:
    now = time.time()
    raw_path, headers = signed_put_headers(now)
    op = head_op(now, raw_path, headers)
    op()  # warm
    if profile:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(ops):
            op()
        profiler.disable()
        stats = pstats.Stats(profiler)
        print(f"head: {stats.total_calls / ops:.0f} function calls per PUT (cProfile)")
        stats.sort_stats("tottime").print_stats(15)
        return
    started = time.thread_time()
    for _ in range(ops):
        op()
    spent = time.thread_time() - started
    print(f"head: {spent * 1e6 / ops:.1f} us CPU per PUT over {ops} PUTs (thread CPU time)")


def bench_checksums(mib: int = 8) -> None:
    data = os.urandom(1024 * 1024) * mib
    for algorithm in s3_checksums.ALGORITHMS:
        state = s3_checksums.new_checksum(algorithm)
        size = len(data) if algorithm not in ("crc32c", "crc64nvme") or _native(algorithm) else len(data) // 64
        started = time.thread_time()
        state.update(memoryview(data)[:size])
        spent = max(time.thread_time() - started, 1e-9)
        print(f"{algorithm:>10}: {size / spent / 1024 / 1024:10,.0f} MiB/s ({type(state).__name__})")


def bench_chunked(mib: int = 64) -> None:
    import io

    from botocore.httpchecksum import AwsChunkedWrapper, Crc32Checksum

    from stdaemon.s3.aws_chunked import AwsChunkedDecoder

    data = os.urandom(1024 * 1024) * mib
    wrapper = AwsChunkedWrapper(io.BytesIO(data), checksum_cls=Crc32Checksum,
                                checksum_name="x-amz-checksum-crc32", chunk_size=64 * 1024)
    body = wrapper.read()
    batches = [bytearray(body[start:start + 1024 * 1024]) for start in range(0, len(body), 1024 * 1024)]
    decoder = AwsChunkedDecoder(trailer_names=["x-amz-checksum-crc32"], decoded_length=len(data))
    md5 = hashlib.md5()
    profiler = cProfile.Profile()
    started = time.thread_time()
    profiler.enable()
    for batch in batches:
        for piece in decoder.feed(batch):
            md5.update(piece)
    decoder.finish()
    profiler.disable()
    spent = time.thread_time() - started
    assert md5.digest() == hashlib.md5(data).digest()
    print(f"chunked: {mib / spent:,.0f} MiB/s decoded and hashed (MD5 alone: "
          f"{mib / _seconds(lambda: hashlib.md5(data).digest()):,.0f} MiB/s); "
          f"{pstats.Stats(profiler).total_calls} function calls")


def _seconds(fn) -> float:
    started = time.thread_time()
    fn()
    return max(time.thread_time() - started, 1e-9)


def _native(algorithm: str) -> bool:
    return "Table" not in type(s3_checksums.new_checksum(algorithm)).__name__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="cProfile call counts instead of CPU time")
    parser.add_argument("--only", default="head,checksums,chunked")
    args = parser.parse_args(argv)
    only = set(args.only.split(","))
    if "head" in only:
        bench_head(args.ops, args.profile)
    if "checksums" in only:
        bench_checksums()
    if "chunked" in only:
        bench_chunked()


if __name__ == "__main__":
    main()
