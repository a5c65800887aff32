"""The AWS CLI (``aws s3 cp/ls/sync --endpoint-url``) against the daemon over HTTP and HTTPS."""

from __future__ import annotations

import os
import sys

import pytest
import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from tests.s3_backing import backing, moto_s3, storage_backend, stored_bytes  # noqa: F401 (fixtures)
from tests.services import require_binary
from tests.s3_helpers import file_sha256, tls  # noqa: F401 (fixture)

MIB = 1024 * 1024


def _aws_binary() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "aws")
    if os.path.exists(candidate):
        return candidate
    return require_binary("aws")


def _env(home, access_key, secret) -> dict:
    """The AWS CLI with only these credentials: no config file, no instance metadata."""
    return {
        "HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(home / "none"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "none"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }


async def _aws(args, env):
    out, err, code = await getProcessOutputAndValue(_aws_binary(), args, env=env)
    return out.decode(), err.decode(), code


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_aws_cli_cp_ls_sync_round_trip(make_daemon, tls, tmp_path, scheme, storage_backend):  # noqa: F811
    settings = dict(storage_backend)
    if scheme == "https":
        settings["server"] = {"ssl_cert": tls["cert"], "ssl_key": tls["key"]}
    daemon = await make_daemon(settings=settings)
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-7")
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, access_key, secret)
    if scheme == "https":
        env["AWS_CA_BUNDLE"] = tls["ca"]
    endpoint = ["--endpoint-url", daemon.url + "/api/cloud/storage"]

    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        for _ in range(20):
            fh.write(os.urandom(MIB))
    out, err, code = await _aws(["s3", "cp", str(big), "s3://outputs/job-7/big.bin", *endpoint], env)
    assert code == 0, (out, err)

    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"alpha")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    (tree / "sub" / "space name.txt").write_bytes(b"spaces")
    if storage_backend:
        # listings carry the store's LastModified, whole seconds as S3's: a file written in the second
        # of its upload would look newer to the second sync
        for path in (tree / "a.txt", tree / "sub" / "b.bin", tree / "sub" / "space name.txt"):
            os.utime(path, (os.path.getmtime(path) - 60, os.path.getmtime(path) - 60))
    out, err, code = await _aws(["s3", "sync", str(tree), "s3://outputs/job-7/tree/", *endpoint], env)
    assert code == 0, (out, err)

    out, err, code = await _aws(["s3", "ls", "--recursive", "s3://outputs/job-7/", *endpoint], env)
    assert code == 0, (out, err)
    listed = sorted(line.split(None, 3)[3] for line in out.splitlines() if line.strip())
    assert listed == ["job-7/big.bin", "job-7/tree/a.txt", "job-7/tree/sub/b.bin", "job-7/tree/sub/space name.txt"]
    out, err, code = await _aws(["s3", "ls", "s3://outputs/job-7/", *endpoint], env)
    assert code == 0 and "PRE tree/" in out, (out, err)

    back = tmp_path / "back.bin"
    out, err, code = await _aws(["s3", "cp", "s3://outputs/job-7/big.bin", str(back), *endpoint], env)
    assert code == 0, (out, err)
    assert file_sha256(back) == file_sha256(big)
    copy = tmp_path / "copy"
    out, err, code = await _aws(["s3", "sync", "s3://outputs/job-7/tree/", str(copy), *endpoint], env)
    assert code == 0, (out, err)
    for rel in ("a.txt", "sub/b.bin", "sub/space name.txt"):
        assert file_sha256(copy / rel) == file_sha256(tree / rel)
    # a second sync has nothing to do
    out, err, code = await _aws(["s3", "sync", str(tree), "s3://outputs/job-7/tree/", *endpoint], env)
    assert code == 0 and "upload:" not in out, (out, err)

    # rm --recursive (DeleteObjects) inside the prefix
    out, err, code = await _aws(["s3", "rm", "--recursive", "s3://outputs/job-7/tree/", *endpoint], env)
    assert code == 0, (out, err)
    out, err, code = await _aws(["s3", "ls", "--recursive", "s3://outputs/job-7/", *endpoint], env)
    assert code == 0 and [line.split()[-1] for line in out.splitlines()] == ["job-7/big.bin"]

    # outside the job's prefix: refused, nothing written
    out, err, code = await _aws(["s3", "cp", str(tree / "a.txt"), "s3://outputs/job-8/a.txt", *endpoint], env)
    assert code != 0 and "AccessDenied" in err, (out, err)
    assert not os.path.exists(os.path.join(daemon.ctx.outputs_dir(), "job-8"))
    with pytest.raises(FileNotFoundError):
        stored_bytes(daemon, "job-8/a.txt")


@pytest_twisted.ensureDeferred
async def test_aws_cli_acl_and_tagging_commands_leave_the_object_intact(make_daemon, tmp_path):
    """``s3api put-object-acl`` once emptied the object, ``put-object-tagging`` replaced its bytes
    with the tagging XML and ``delete-object-tagging`` deleted it."""
    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-7")
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, access_key, secret)
    endpoint = ["--endpoint-url", daemon.url + "/api/cloud/storage"]
    source = tmp_path / "model.bin"
    source.write_bytes(os.urandom(100_000))
    on_disk = os.path.join(daemon.ctx.outputs_dir(), "job-7", "model.bin")
    out, err, code = await _aws(["s3", "cp", str(source), "s3://outputs/job-7/model.bin", *endpoint], env)
    assert code == 0, (out, err)
    target = ["--bucket", "outputs", "--key", "job-7/model.bin", *endpoint]
    commands = [
        (["s3api", "put-object-acl", "--acl", "public-read", *target], "NotImplemented"),
        (["s3api", "put-object-acl", "--acl", "private", *target], None),
        (["s3api", "put-object-tagging", "--tagging", "TagSet=[{Key=a,Value=b}]", *target], "NotImplemented"),
        (["s3api", "delete-object-tagging", *target], "NotImplemented"),
        (["s3api", "get-object-tagging", *target], None),
        (["s3api", "get-object-acl", *target], None),
    ]
    for args, error in commands:
        out, err, code = await _aws(args, env)
        if error is None:
            assert code == 0, (args, out, err)
        else:
            assert code != 0 and error in err, (args, out, err)
        assert file_sha256(on_disk) == file_sha256(source), args
    out, err, code = await _aws(["s3api", "get-object-acl", *target], env)
    assert "FULL_CONTROL" in out, (out, err)
