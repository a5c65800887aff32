"""Real S3 command-line clients against the daemon, each with the configuration the README documents:
rclone (``type = s3``, ``provider = Other``, nothing else but endpoint and keys), s3cmd (SigV4,
path-style through ``host_base``/``host_bucket``) and s3fs-fuse (a FUSE mount). Under CI=true a
missing client binary is a failure (``tests.services.require_binary``)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from tests.s3_helpers import file_sha256
from tests.services import missing, require_binary

MIB = 1024 * 1024


def _env(home) -> dict:
    return {"HOME": str(home), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


async def _run(binary, args, env):
    out, err, code = await getProcessOutputAndValue(binary, args, env=env)
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), code


def _tree(base):
    (base / "sub").mkdir(parents=True)
    (base / "a.txt").write_bytes(b"alpha")
    (base / "sub" / "big.bin").write_bytes(os.urandom(12 * MIB))  # multipart for every client
    (base / "sub" / "space name é.txt").write_bytes(b"unicode and spaces")
    return ["a.txt", "sub/big.bin", "sub/space name é.txt"]


async def _configured(make_daemon, tmp_path, job_id, name, template):
    """(daemon, home, config file) for a client configured from ``template`` with a job's
    credentials (``{access_key}``, ``{secret}``, ``{endpoint}``, ``{host}`` are filled in)."""
    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue(job_id)
    home = tmp_path / "home"
    home.mkdir()
    config = home / name
    config.write_text(template.format(access_key=access_key, secret=secret, endpoint=daemon.url + "/api/cloud/storage",
                                      host=daemon.url.split("://", 1)[1]))
    return daemon, home, config


# --------------------------------------------------------------------------- rclone


RCLONE_CONFIG = """[stdaemon]
type = s3
provider = Other
access_key_id = {access_key}
secret_access_key = {secret}
endpoint = {endpoint}
"""


@pytest_twisted.ensureDeferred
async def test_rclone_with_a_default_provider_other_config(make_daemon, tmp_path):
    rclone = require_binary("rclone")
    daemon, home, config = await _configured(make_daemon, tmp_path, "job-3", "rclone.conf", RCLONE_CONFIG)
    base = ["--config", str(config), "--retries", "1", "--low-level-retries", "1"]
    files = _tree(tmp_path / "src")
    env = _env(home)

    # copy (the first upload checks/creates the bucket: BucketAlreadyOwnedByYou is success)
    out, err, code = await _run(rclone, [*base, "copy", str(tmp_path / "src"), "stdaemon:outputs/job-3/run"], env)
    assert code == 0, (out, err)
    out, err, code = await _run(rclone, [*base, "lsf", "-R", "stdaemon:outputs/job-3/run"], env)
    assert code == 0, (out, err)
    assert sorted(line for line in out.splitlines() if not line.endswith("/")) == sorted(files)
    for rel in files:
        assert file_sha256(tmp_path / "src" / rel) == file_sha256(os.path.join(daemon.ctx.outputs_dir(), "job-3", "run", rel))
    # check (hashes: MD5 of single uploads, rclone's X-Amz-Meta-Md5chksum of multipart ones)
    out, err, code = await _run(rclone, [*base, "check", str(tmp_path / "src"), "stdaemon:outputs/job-3/run"], env)
    assert code == 0, (out, err)
    # a second sync has nothing to transfer
    out, err, code = await _run(rclone, [*base, "sync", "-v", str(tmp_path / "src"), "stdaemon:outputs/job-3/run"],
                                env)
    assert code == 0 and "Copied" not in err, (out, err)
    out, err, code = await _run(rclone, [*base, "copy", "stdaemon:outputs/job-3/run", str(tmp_path / "back")], env)
    assert code == 0, (out, err)
    for rel in files:
        assert file_sha256(tmp_path / "src" / rel) == file_sha256(tmp_path / "back" / rel)
    # mkdir + rmdir of a "directory", deletes
    out, err, code = await _run(rclone, [*base, "delete", "stdaemon:outputs/job-3/run/sub"], env)
    assert code == 0, (out, err)
    out, err, code = await _run(rclone, [*base, "lsf", "-R", "stdaemon:outputs/job-3/run"], env)
    assert code == 0 and [line for line in out.splitlines() if not line.endswith("/")] == ["a.txt"], (out, err)
    # outside the job's prefix: refused
    out, err, code = await _run(rclone, [*base, "copy", str(tmp_path / "src" / "a.txt"), "stdaemon:outputs/job-4"],
                                env)
    assert code != 0
    assert not os.path.exists(os.path.join(daemon.ctx.outputs_dir(), "job-4"))


# --------------------------------------------------------------------------- s3cmd


S3CMD_CONFIG = """[default]
access_key = {access_key}
secret_key = {secret}
host_base = {host}/api/cloud/storage
host_bucket = {host}/api/cloud/storage
use_https = False
signature_v2 = False
bucket_location = us-east-1
"""


@pytest_twisted.ensureDeferred
async def test_s3cmd_put_get_ls_sync_del(make_daemon, tmp_path):
    s3cmd = require_binary("s3cmd")
    daemon, home, config = await _configured(make_daemon, tmp_path, "job-5", ".s3cfg", S3CMD_CONFIG)
    base = ["-c", str(config), "--no-progress"]
    files = _tree(tmp_path / "src")
    env = _env(home)

    out, err, code = await _run(s3cmd, [*base, "put", str(tmp_path / "src" / "a.txt"), "s3://outputs/job-5/a.txt"],
                                env)
    assert code == 0, (out, err)
    out, err, code = await _run(s3cmd, [*base, "sync", str(tmp_path / "src") + "/", "s3://outputs/job-5/tree/"], env)
    assert code == 0, (out, err)
    for rel in files:
        assert file_sha256(tmp_path / "src" / rel) == file_sha256(os.path.join(daemon.ctx.outputs_dir(), "job-5", "tree", rel))
    out, err, code = await _run(s3cmd, [*base, "ls", "--recursive", "s3://outputs/job-5/"], env)
    assert code == 0, (out, err)
    listed = sorted(line.split("s3://outputs/", 1)[1] for line in out.splitlines() if "s3://" in line)
    assert listed == sorted(["job-5/a.txt"] + [f"job-5/tree/{rel}" for rel in files])
    out, err, code = await _run(s3cmd, [*base, "info", "s3://outputs/job-5/a.txt"], env)
    assert code == 0 and "MD5 sum" in out, (out, err)
    back = tmp_path / "back.bin"
    out, err, code = await _run(s3cmd, [*base, "get", "s3://outputs/job-5/tree/sub/big.bin", str(back)], env)
    assert code == 0, (out, err)
    assert file_sha256(back) == file_sha256(tmp_path / "src" / "sub" / "big.bin")
    out, err, code = await _run(s3cmd, [*base, "del", "--recursive", "--force", "s3://outputs/job-5/tree/"], env)
    assert code == 0, (out, err)
    out, err, code = await _run(s3cmd, [*base, "ls", "--recursive", "s3://outputs/job-5/"], env)
    assert code == 0 and [line.split()[-1] for line in out.splitlines()] == ["s3://outputs/job-5/a.txt"], out
    out, err, code = await _run(s3cmd, [*base, "put", str(tmp_path / "src" / "a.txt"), "s3://outputs/job-6/a.txt"],
                                env)
    assert code != 0 and "AccessDenied" in (out + err), (out, err)


# --------------------------------------------------------------------------- s3fs (FUSE)


def _fuse_usable() -> bool:
    return os.path.exists("/dev/fuse") and os.access("/dev/fuse", os.R_OK | os.W_OK)


def _mounted(path) -> bool:
    with open("/proc/self/mounts", encoding="utf-8") as fh:
        return any(line.split()[1] == str(path) for line in fh)


#: What the test does on the mount, in a child process so a stuck FUSE call can never hang the test run.
S3FS_SCRIPT = """
import json, os, sys
mount, data_path = sys.argv[1], sys.argv[2]
data = open(data_path, "rb").read()
os.mkdir(os.path.join(mount, "dir"))
with open(os.path.join(mount, "dir", "model.bin"), "wb") as fh:
    fh.write(data)
with open(os.path.join(mount, "notes.txt"), "w") as fh:
    fh.write("hello")
listing = sorted(os.listdir(mount))
same = open(os.path.join(mount, "dir", "model.bin"), "rb").read() == data
os.unlink(os.path.join(mount, "notes.txt"))
after = sorted(os.listdir(mount))
print(json.dumps({"listing": listing, "same": same, "after": after}))
"""


@pytest_twisted.ensureDeferred
async def test_s3fs_mount_write_read_list(make_daemon, tmp_path):
    import json
    import sys

    s3fs = require_binary("s3fs")
    fusermount = require_binary("fusermount")
    if not _fuse_usable():
        # a container without FUSE: the client is installed (checked above), mounting cannot work
        missing("/dev/fuse is not usable here: s3fs cannot mount")
    daemon = await make_daemon()
    access_key, secret = await daemon.ctx.upload_credentials.issue("job-2")
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{access_key}:{secret}\n")
    passwd.chmod(0o600)
    mount = tmp_path / "mnt"
    mount.mkdir()
    log_path = tmp_path / "s3fs.log"
    args = [s3fs, "outputs:/job-2", str(mount), "-o", f"url={daemon.url}/api/cloud/storage",
            "-o", "use_path_request_style", "-o", f"passwd_file={passwd}", "-o", "dbglevel=warn", "-f"]
    data = os.urandom(7 * MIB)
    (tmp_path / "data.bin").write_bytes(data)

    def start():
        with open(log_path, "wb") as log:
            process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and process.poll() is None and not _mounted(mount):
            time.sleep(0.1)
        return process

    def stop(process):
        subprocess.run([fusermount, "-u", "-z", str(mount)], check=False, capture_output=True)
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)

    process = await deferToThread(start)
    try:
        if not _mounted(mount):
            pytest.fail(f"s3fs could not mount: {log_path.read_text(errors='replace')[-4000:]}")
        result = await deferToThread(subprocess.run, [sys.executable, "-c", S3FS_SCRIPT, str(mount),
                                                      str(tmp_path / "data.bin")],
                                     capture_output=True, timeout=180)
        assert result.returncode == 0, (result.stderr, log_path.read_text(errors="replace")[-4000:])
        assert _mounted(mount) and process.poll() is None, log_path.read_text(errors="replace")[-4000:]
        answer = json.loads(result.stdout)
        assert answer == {"listing": ["dir", "notes.txt"], "same": True, "after": ["dir"]}
        root = os.path.join(daemon.ctx.outputs_dir(), "job-2")
        assert file_sha256(os.path.join(root, "dir", "model.bin")) == hashlib.sha256(data).hexdigest()
        assert not os.path.exists(os.path.join(root, "notes.txt"))
    finally:
        await deferToThread(stop, process)
