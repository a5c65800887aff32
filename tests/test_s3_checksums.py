"""x-amz-checksum-* algorithms: C implementations (crc32c, awscrt, zlib, hashlib) against reference
check values, against botocore's own checksum classes, and the pure-Python fallback against both."""

from __future__ import annotations

import base64
import hashlib
import os

import pytest
import pytest_twisted
from botocore import httpchecksum
from twisted.internet.threads import deferToThread

from stdaemon.s3 import checksums as s3_checksums

# RevEng catalogue check values (the CRC of b"123456789") and the empty input
CHECK = {"crc32": "cbf43926", "crc32c": "e3069283", "crc64nvme": "ae8b14860a799888",
         "sha1": hashlib.sha1(b"123456789").hexdigest(), "sha256": hashlib.sha256(b"123456789").hexdigest()}
EMPTY = {"crc32": "00000000", "crc32c": "00000000", "crc64nvme": "0000000000000000",
         "sha1": hashlib.sha1(b"").hexdigest(), "sha256": hashlib.sha256(b"").hexdigest()}
# botocore's classes for each algorithm (CRC32C and CRC64/NVME need the AWS CRT, as in botocore)
BOTOCORE = {"crc32": httpchecksum.Crc32Checksum, "crc32c": httpchecksum.CrtCrc32cChecksum,
            "crc64nvme": httpchecksum.CrtCrc64NvmeChecksum, "sha1": httpchecksum.Sha1Checksum,
            "sha256": httpchecksum.Sha256Checksum}
FALLBACK = {"crc32c": (0x82F63B78, 32), "crc64nvme": (0x9A6C9329AC4BC9B5, 64)}


def _digest(state, data: bytes, cuts=(1, 7, 4096)) -> str:
    """Feed ``data`` in uneven pieces (bytes, a memoryview slice, a bytearray) and return the hex digest."""
    view = memoryview(data)
    start = 0
    for index, cut in enumerate(cuts):
        piece = view[start:start + cut]
        state.update(piece if index % 2 else bytearray(piece))
        start += cut
    state.update(bytes(view[start:]))
    return state.digest().hex()


def test_every_crc_runs_in_c_here():
    # crc32c and awscrt are dependencies: a broken install would silently fall back to Python
    assert all(s3_checksums.native(algorithm) for algorithm in s3_checksums.ALGORITHMS)
    assert type(s3_checksums.new_checksum("crc32c")).__name__ == "_Crc"
    assert type(s3_checksums.new_checksum("crc64nvme")).__name__ == "_Crc"


@pytest.mark.parametrize("algorithm", s3_checksums.ALGORITHMS)
def test_check_values(algorithm):
    assert _digest(s3_checksums.new_checksum(algorithm), b"123456789", cuts=(4,)) == CHECK[algorithm]
    assert s3_checksums.new_checksum(algorithm).digest().hex() == EMPTY[algorithm]


@pytest.mark.parametrize("algorithm", s3_checksums.ALGORITHMS)
@pytest.mark.parametrize("size", [0, 1, 9, 4096, 1024 * 1024 + 3])
def test_same_as_botocore(algorithm, size):
    data = os.urandom(size)
    theirs = BOTOCORE[algorithm]()
    theirs.update(data)
    assert s3_checksums.checksum_b64(algorithm, data) == theirs.b64digest()
    assert base64.b64encode(bytes.fromhex(_digest(s3_checksums.new_checksum(algorithm), data))).decode() \
        == theirs.b64digest()


@pytest.mark.parametrize("algorithm", sorted(FALLBACK))
def test_pure_python_fallback_gives_the_same_values(algorithm):
    poly, width = FALLBACK[algorithm]
    assert _digest(s3_checksums._TableCrc(poly, width), b"123456789", cuts=(4,)) == CHECK[algorithm]
    data = os.urandom(20_000)
    assert _digest(s3_checksums._TableCrc(poly, width), data) == _digest(s3_checksums.new_checksum(algorithm), data)


def test_fallback_is_used_when_the_c_library_is_missing(monkeypatch):
    monkeypatch.setattr(s3_checksums, "_native", {"crc32c": None, "crc64nvme": None})
    for algorithm in FALLBACK:
        state = s3_checksums.new_checksum(algorithm)
        assert isinstance(state, s3_checksums._TableCrc) and not s3_checksums.native(algorithm)
        assert _digest(state, b"123456789", cuts=(4,)) == CHECK[algorithm]


@pytest_twisted.ensureDeferred
async def test_boto3_put_and_multipart_with_crc32c_and_crc64nvme(make_daemon):
    """boto3 (with the CRT, as botocore needs for these two) sends them; the daemon checks and
    returns the same values, for a PutObject and for the parts of a multipart upload."""
    import boto3
    from botocore.config import Config

    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
    client = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                          aws_secret_access_key=secret, region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1, "mode": "standard"}))
    body = os.urandom(300_000)
    for algorithm, field in (("CRC32C", "ChecksumCRC32C"), ("CRC64NVME", "ChecksumCRC64NVME")):
        key = f"job-1/{algorithm}.bin"
        answer = await deferToThread(client.put_object, Bucket="outputs", Key=key, Body=body,
                                     ChecksumAlgorithm=algorithm)
        assert answer[field] == s3_checksums.checksum_b64(algorithm.lower(), body)
        bad = {field: s3_checksums.checksum_b64(algorithm.lower(), b"other")}
        with pytest.raises(Exception) as err:
            await deferToThread(client.put_object, Bucket="outputs", Key=key + ".bad", Body=body, **bad)
        assert "BadDigest" in str(err.value)
        upload = await deferToThread(client.create_multipart_upload, Bucket="outputs", Key=key + ".mp",
                                     ChecksumAlgorithm=algorithm)
        part = await deferToThread(client.upload_part, Bucket="outputs", Key=key + ".mp", PartNumber=1,
                                   UploadId=upload["UploadId"], Body=body, ChecksumAlgorithm=algorithm)
        assert part[field] == s3_checksums.checksum_b64(algorithm.lower(), body)


@pytest_twisted.ensureDeferred
async def test_the_s3_service_loads_the_c_libraries_in_its_pool(monkeypatch):
    """An aws-chunked upload's decoder runs on the reactor: the C CRC libraries must already be
    imported by then, in the S3 pool (a thread), not in the first such request."""
    import threading

    from twisted.internet import reactor

    from stdaemon.s3.service import S3Service
    from stdaemon.threads import BlockingPool

    loaded_in: list = []
    monkeypatch.setattr(s3_checksums, "_native", {})
    original = s3_checksums._c_function

    def record(algorithm):
        loaded_in.append((algorithm, threading.current_thread() is threading.main_thread()))
        return original(algorithm)

    monkeypatch.setattr(s3_checksums, "_c_function", record)

    class Engine:
        async def start(self):
            pass

    pool = BlockingPool(reactor, "test-s3-io", maxthreads=1)
    pool.start()
    try:
        service = S3Service(Engine(), pool, None, reactor, "/nonexistent")
        await service.load_checksum_libraries()
    finally:
        await pool.stop()
    assert sorted(loaded_in) == [("crc32c", False), ("crc64nvme", False)]
    assert s3_checksums._native["crc32c"] is not None and s3_checksums._native["crc64nvme"] is not None
