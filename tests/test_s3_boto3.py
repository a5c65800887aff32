"""boto3 (default configuration, new checksum behaviour on) against the daemon over HTTP and HTTPS."""

from __future__ import annotations

import hashlib
import os
import ssl
import urllib.error
import urllib.request

import boto3
import pytest
import pytest_twisted
from botocore.config import Config as BotoConfig
from botocore.exceptions import ClientError
from twisted.internet.threads import deferToThread

from stdaemon.s3 import checksums as s3_checksums
from tests.s3_backing import backing, moto_s3, storage_backend  # noqa: F401 (fixtures)
from tests.s3_helpers import tls  # noqa: F401 (fixture)

MIB = 1024 * 1024


def _client(daemon, access_key, secret, verify=None):
    return boto3.client(
        "s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
        aws_secret_access_key=secret, region_name="us-east-1", verify=verify,
    )


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(MIB), b""):
            digest.update(block)
    return digest.hexdigest()


async def _start(make_daemon, tls, scheme, storage=None):
    """``storage``: the settings of a storage backend (``storage_backend``), local disk by default."""
    settings = dict(storage or {})
    if scheme == "https":
        settings["server"] = {"ssl_cert": tls["cert"], "ssl_key": tls["key"]}
    daemon = await make_daemon(settings=settings)
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-1")
    client = _client(daemon, access_key, secret, verify=tls["ca"] if scheme == "https" else None)
    return daemon, client, access_key, secret


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_boto3_put_get_head_list_delete_round_trip(make_daemon, tls, tmp_path, scheme):
    daemon, client, access_key, secret = await _start(make_daemon, tls, scheme)
    data = os.urandom(300_000)
    put = await deferToThread(client.put_object, Bucket="outputs", Key="job-1/dir/a b+c.bin", Body=data,
                              ContentType="application/x-test", Metadata={"step": "100"})
    assert put["ETag"] == '"%s"' % hashlib.md5(data).hexdigest()
    on_disk = os.path.join(daemon.ctx.outputs_dir(), "job-1", "dir", "a b+c.bin")
    with open(on_disk, "rb") as fh:
        assert _sha(fh.read()) == _sha(data)

    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/dir/a b+c.bin")
    body = await deferToThread(got["Body"].read)
    assert _sha(body) == _sha(data)
    assert got["ContentType"] == "application/x-test" and got["Metadata"] == {"step": "100"}

    ranged = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/dir/a b+c.bin",
                                 Range="bytes=1000-1999")
    assert await deferToThread(ranged["Body"].read) == data[1000:2000]
    assert ranged["ContentRange"] == f"bytes 1000-1999/{len(data)}"

    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/dir/a b+c.bin")
    assert head["ContentLength"] == len(data) and head["ETag"] == put["ETag"]

    for index in range(5):
        await deferToThread(client.put_object, Bucket="outputs", Key=f"job-1/many/{index:02d}.txt",
                            Body=str(index).encode())
    paginator = client.get_paginator("list_objects_v2")

    def list_all(**kw):
        keys, prefixes = [], []
        for page in paginator.paginate(Bucket="outputs", PaginationConfig={"PageSize": 2}, **kw):
            keys += [o["Key"] for o in page.get("Contents", [])]
            prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        return keys, prefixes

    keys, _ = await deferToThread(list_all, Prefix="job-1/")
    assert keys == ["job-1/dir/a b+c.bin"] + [f"job-1/many/{i:02d}.txt" for i in range(5)]
    _, prefixes = await deferToThread(list_all, Prefix="job-1/", Delimiter="/")
    assert prefixes == ["job-1/dir/", "job-1/many/"]

    await deferToThread(client.delete_object, Bucket="outputs", Key="job-1/many/00.txt")
    with pytest.raises(ClientError) as err:
        await deferToThread(client.head_object, Bucket="outputs", Key="job-1/many/00.txt")
    assert err.value.response["Error"]["Code"] in ("404", "NoSuchKey")
    with pytest.raises(ClientError) as err:
        await deferToThread(client.get_object, Bucket="outputs", Key="job-1/many/00.txt")
    assert err.value.response["Error"]["Code"] == "NoSuchKey"


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_boto3_multipart_upload_file_and_download_file(make_daemon, tls, tmp_path, scheme):
    daemon, client, access_key, secret = await _start(make_daemon, tls, scheme)
    source = tmp_path / "big.bin"
    with open(source, "wb") as fh:
        for _ in range(41):
            fh.write(os.urandom(MIB))
    await deferToThread(client.upload_file, str(source), "outputs", "job-1/checkpoints/big.bin")
    head = await deferToThread(client.head_object, Bucket="outputs", Key="job-1/checkpoints/big.bin")
    assert head["ContentLength"] == 41 * MIB
    assert head["ETag"].endswith('-6"')  # 8 MiB parts: a multipart ETag
    target = tmp_path / "back.bin"
    await deferToThread(client.download_file, "outputs", "job-1/checkpoints/big.bin", str(target))
    assert _file_sha(target) == _file_sha(source)
    assert daemon.ctx.upload_progress("job-1")["objects_completed"] == 1
    assert daemon.ctx.upload_progress("job-1")["bytes_received"] >= 41 * MIB


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_presigned_urls_fetched_with_a_plain_http_client(make_daemon, tls, scheme):
    daemon, client, access_key, secret = await _start(make_daemon, tls, scheme)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/p.txt", Body=b"presigned body")
    url = client.generate_presigned_url("get_object", Params={"Bucket": "outputs", "Key": "job-1/p.txt"},
                                        ExpiresIn=300)
    context = ssl.create_default_context(cafile=tls["ca"]) if scheme == "https" else None

    def fetch(u):
        with urllib.request.urlopen(u, context=context) as resp:
            return resp.read()

    assert await deferToThread(fetch, url) == b"presigned body"
    v4 = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                      aws_secret_access_key=secret, region_name="us-east-1",
                      config=BotoConfig(signature_version="s3v4"), verify=tls["ca"] if scheme == "https" else None)
    url4 = v4.generate_presigned_url("get_object", Params={"Bucket": "outputs", "Key": "job-1/p.txt"},
                                     ExpiresIn=300)
    assert "X-Amz-Signature" in url4
    assert await deferToThread(fetch, url4) == b"presigned body"
    tampered = url4.replace("p.txt", "q.txt")
    with pytest.raises(urllib.error.HTTPError) as err:
        await deferToThread(fetch, tampered)
    assert err.value.code == 403


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_boto3_low_level_multipart_out_of_order_list_parts_abort(make_daemon, tls, scheme, storage_backend):
    daemon, client, access_key, secret = await _start(make_daemon, tls, scheme, storage_backend)
    key = "job-1/manual.bin"
    created = await deferToThread(client.create_multipart_upload, Bucket="outputs", Key=key,
                                  ContentType="application/x-ckpt")
    upload_id = created["UploadId"]
    parts = {1: os.urandom(5 * MIB), 2: os.urandom(5 * MIB), 3: os.urandom(1234)}

    async def put(number):
        answer = await deferToThread(client.upload_part, Bucket="outputs", Key=key, UploadId=upload_id,
                                     PartNumber=number, Body=parts[number])
        return number, answer["ETag"]

    from twisted.internet import defer

    etags = dict(await defer.gatherResults([defer.ensureDeferred(put(n)) for n in (3, 1, 2)]))
    listed = await deferToThread(client.list_parts, Bucket="outputs", Key=key, UploadId=upload_id)
    assert [p["PartNumber"] for p in listed["Parts"]] == [1, 2, 3]
    assert [p["Size"] for p in listed["Parts"]] == [5 * MIB, 5 * MIB, 1234]
    # nothing is visible before Complete
    with pytest.raises(ClientError):
        await deferToThread(client.head_object, Bucket="outputs", Key=key)
    done = await deferToThread(
        client.complete_multipart_upload, Bucket="outputs", Key=key, UploadId=upload_id,
        MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]} for n in (1, 2, 3)]})
    expected = hashlib.md5(b"".join(hashlib.md5(parts[n]).digest() for n in (1, 2, 3))).hexdigest() + "-3"
    assert done["ETag"] == f'"{expected}"'
    got = await deferToThread(client.get_object, Bucket="outputs", Key=key)
    assert _sha(await deferToThread(got["Body"].read)) == _sha(parts[1] + parts[2] + parts[3])
    assert got["ContentType"] == "application/x-ckpt"

    second = await deferToThread(client.create_multipart_upload, Bucket="outputs", Key="job-1/aborted.bin")
    await deferToThread(client.upload_part, Bucket="outputs", Key="job-1/aborted.bin",
                        UploadId=second["UploadId"], PartNumber=1, Body=b"x" * 100)
    await deferToThread(client.abort_multipart_upload, Bucket="outputs", Key="job-1/aborted.bin",
                        UploadId=second["UploadId"])
    with pytest.raises(ClientError) as err:
        await deferToThread(client.list_parts, Bucket="outputs", Key="job-1/aborted.bin",
                            UploadId=second["UploadId"])
    assert err.value.response["Error"]["Code"] == "NoSuchUpload"


@pytest_twisted.ensureDeferred
async def test_list_objects_v1_markers_start_after_and_url_encoding(make_daemon, tls):
    daemon, client, access_key, secret = await _start(make_daemon, tls, "http")
    keys = ["job-1/a b.txt", "job-1/b+c.txt", "job-1/\u00e9t\u00e9/d.txt", "job-1/e&f<g>.txt", "job-1/z/1"]
    for key in keys:
        await deferToThread(client.put_object, Bucket="outputs", Key=key, Body=key.encode())

    def v1_all(**kw):
        out = []
        for page in client.get_paginator("list_objects").paginate(
                Bucket="outputs", Prefix="job-1/", PaginationConfig={"PageSize": 2}, **kw):
            out += [o["Key"] for o in page.get("Contents", [])] + [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        return out

    assert await deferToThread(v1_all) == sorted(keys, key=lambda k: k.encode())
    assert await deferToThread(v1_all, Delimiter="/") == [
        "job-1/a b.txt", "job-1/b+c.txt", "job-1/e&f<g>.txt", "job-1/z/", "job-1/\u00e9t\u00e9/"]
    after = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/", StartAfter="job-1/b+c.txt")
    assert [o["Key"] for o in after["Contents"]] == ["job-1/e&f<g>.txt", "job-1/z/1", "job-1/\u00e9t\u00e9/d.txt"]
    # a job credential cannot list outside its prefix; a listing of the bucket shows only its own keys
    os.makedirs(os.path.join(daemon.ctx.outputs_dir(), "job-2"), exist_ok=True)
    with open(os.path.join(daemon.ctx.outputs_dir(), "job-2", "secret"), "wb") as fh:
        fh.write(b"not yours")
    with pytest.raises(ClientError) as err:
        await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-2/")
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    whole = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="")
    assert [o["Key"] for o in whole["Contents"]] == sorted(keys, key=lambda k: k.encode())
    top = await deferToThread(client.list_objects_v2, Bucket="outputs", Delimiter="/")
    assert [p["Prefix"] for p in top["CommonPrefixes"]] == ["job-1/"] and "Contents" not in top
    narrow = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1", Delimiter="/")
    assert [p["Prefix"] for p in narrow.get("CommonPrefixes", [])] == ["job-1/"]


@pytest_twisted.ensureDeferred
async def test_presigned_put_and_signed_streaming_chunks(make_daemon, tls, storage_backend):
    daemon, client, access_key, secret = await _start(make_daemon, tls, "http", storage_backend)
    v4 = boto3.client("s3", endpoint_url=daemon.url + "/api/cloud/storage", aws_access_key_id=access_key,
                      aws_secret_access_key=secret, region_name="us-east-1",
                      config=BotoConfig(signature_version="s3v4"))
    url = v4.generate_presigned_url("put_object", Params={"Bucket": "outputs", "Key": "job-1/presigned-put.bin"},
                                    ExpiresIn=300)
    data = os.urandom(50_000)

    def put(u):
        request = urllib.request.Request(u, data=data, method="PUT")
        with urllib.request.urlopen(request) as resp:
            return resp.status

    assert await deferToThread(put, url) == 200
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/presigned-put.bin")
    assert await deferToThread(got["Body"].read) == data

    # STREAMING-AWS4-HMAC-SHA256-PAYLOAD: seed signature from botocore's signer, chunk chain per AWS
    from stdaemon.s3 import sigv4
    from tests.s3_helpers import raw_request, sign

    path = "/api/cloud/storage/outputs/job-1/signed-chunks.bin"
    headers = sign(daemon.url + path, "PUT", access_key, secret, sigv4.STREAMING_SIGNED,
                   {"Content-Encoding": "aws-chunked", "X-Amz-Decoded-Content-Length": str(len(data))})
    seed = headers["Authorization"].rsplit("Signature=", 1)[1]
    amz_date = headers["X-Amz-Date"]
    scope = f"{amz_date[:8]}/us-east-1/s3/aws4_request"
    signer = sigv4.ChunkSigner(sigv4.signing_key(secret, amz_date[:8], "us-east-1", "s3"), amz_date, scope, seed)
    body, previous = b"", seed
    for chunk in (data[:20_000], data[20_000:], b""):
        previous = signer.chunk_signature(previous, hashlib.sha256(chunk).hexdigest())
        body += b"%x;chunk-signature=%s\r\n%s\r\n" % (len(chunk), previous.encode(), chunk)
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", path, headers, body)
    assert status == 200, answer
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/signed-chunks.bin")
    assert await deferToThread(got["Body"].read) == data
    forged = body.replace(data[:100], bytes(100))  # data changed under valid chunk signatures
    status, _, answer = await deferToThread(raw_request, daemon.port, "PUT", path, headers, forged)
    assert status == 403 and b"SignatureDoesNotMatch" in answer
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/signed-chunks.bin")
    assert await deferToThread(got["Body"].read) == data  # the refused upload replaced nothing


@pytest_twisted.ensureDeferred
async def test_delete_objects_and_response_overrides(make_daemon, tls, storage_backend):
    daemon, client, access_key, secret = await _start(make_daemon, tls, "http", storage_backend)
    for name in ("a", "b", "c"):
        await deferToThread(client.put_object, Bucket="outputs", Key=f"job-1/del/{name}", Body=b"x")
    answer = await deferToThread(client.delete_objects, Bucket="outputs", Delete={"Objects": [
        {"Key": "job-1/del/a"}, {"Key": "job-1/del/b"}, {"Key": "job-2/other"}]})
    assert sorted(d["Key"] for d in answer["Deleted"]) == ["job-1/del/a", "job-1/del/b"]
    assert [(e["Key"], e["Code"]) for e in answer["Errors"]] == [("job-2/other", "AccessDenied")]
    listed = await deferToThread(client.list_objects_v2, Bucket="outputs", Prefix="job-1/del/")
    assert [o["Key"] for o in listed["Contents"]] == ["job-1/del/c"]
    url = client.generate_presigned_url("get_object", Params={
        "Bucket": "outputs", "Key": "job-1/del/c", "ResponseContentDisposition": 'attachment; filename="c.bin"',
        "ResponseContentType": "application/octet-stream"}, ExpiresIn=60)

    def fetch(u):
        with urllib.request.urlopen(u) as resp:
            return resp.headers["Content-Disposition"], resp.headers["Content-Type"], resp.read()

    assert await deferToThread(fetch, url) == ('attachment; filename="c.bin"', "application/octet-stream", b"x")


@pytest_twisted.ensureDeferred
async def test_full_object_checksum_is_returned_and_validated_by_botocore(make_daemon, tls, storage_backend):
    daemon, client, access_key, secret = await _start(make_daemon, tls, "http", storage_backend)
    data = os.urandom(10_000)
    await deferToThread(client.put_object, Bucket="outputs", Key="job-1/ck.bin", Body=data)
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/ck.bin", ChecksumMode="ENABLED")
    assert got["ChecksumCRC32"] == s3_checksums.checksum_b64("crc32", data)
    assert await deferToThread(got["Body"].read) == data


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest.mark.parametrize("algorithm", ["SHA256", "SHA1", "CRC32"])
@pytest_twisted.ensureDeferred
async def test_requested_checksum_algorithms_header_and_trailer(make_daemon, tls, scheme, algorithm,
                                                                 monkeypatch, storage_backend):
    from stdaemon.s3 import uploads as storage

    decoders = []

    class CountingDecoder(storage.AwsChunkedDecoder):
        def __init__(self, **kwargs):
            decoders.append(kwargs)
            super().__init__(**kwargs)

    monkeypatch.setattr(storage, "AwsChunkedDecoder", CountingDecoder)
    daemon, client, access_key, secret = await _start(make_daemon, tls, scheme, storage_backend)
    data = os.urandom(70_000)
    put = await deferToThread(client.put_object, Bucket="outputs", Key="job-1/sum.bin", Body=data,
                              ChecksumAlgorithm=algorithm)
    # botocore sends aws-chunked with a trailing checksum over HTTPS, a checksum header over HTTP
    if scheme == "https":
        assert decoders and decoders[0]["trailer_names"] == [f"x-amz-checksum-{algorithm.lower()}"]
    else:
        assert decoders == []
    expected = s3_checksums.checksum_b64(algorithm.lower(), data)
    assert put[f"Checksum{algorithm}"] == expected
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/sum.bin", ChecksumMode="ENABLED")
    assert got[f"Checksum{algorithm}"] == expected
    assert await deferToThread(got["Body"].read) == data


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_empty_objects(make_daemon, tls, scheme, storage_backend):
    daemon, client, access_key, secret = await _start(make_daemon, tls, scheme, storage_backend)
    put = await deferToThread(client.put_object, Bucket="outputs", Key="job-1/empty", Body=b"")
    assert put["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'
    got = await deferToThread(client.get_object, Bucket="outputs", Key="job-1/empty")
    assert await deferToThread(got["Body"].read) == b"" and got["ContentLength"] == 0
