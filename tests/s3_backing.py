"""A real backing store for the ``s3`` storage backend: ``moto_server`` on 127.0.0.1 (random port,
temp HOME), one per test module, and a fresh bucket per test. A missing ``moto_server`` fails under
CI=true and skips otherwise (``tests.services.missing``)."""

from __future__ import annotations

import uuid

import pytest

from tests.secret_stores import MotoServer

KEY_ID_SECRET = "STORE_ACCESS_KEY_ID"
SECRET_KEY_SECRET = "STORE_SECRET_ACCESS_KEY"


@pytest.fixture(scope="module")
def moto_s3():
    server = MotoServer().start()
    yield server
    server.close()


def store_client(moto):
    import boto3

    return boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing",
                                 region_name="us-east-1").client("s3", endpoint_url=moto.url)


STORE_SECRETS = {KEY_ID_SECRET: "testing", SECRET_KEY_SECRET: "testing"}


@pytest.fixture
def backing(moto_s3, monkeypatch):
    """``(settings, client, bucket)``: daemon settings for the ``s3`` backend on a fresh bucket of
    the module's moto server, and a client of that bucket. The store's keys are named secrets,
    resolved by the daemon's secrets service (here from the environment)."""
    bucket = f"stdaemon-{uuid.uuid4().hex[:12]}"
    client = store_client(moto_s3)
    client.create_bucket(Bucket=bucket)
    for name, value in STORE_SECRETS.items():
        monkeypatch.setenv(name, value)
    return {"storage": storage_settings(moto_s3, bucket)}, client, bucket


def storage_settings(moto, bucket: str) -> dict:
    return {"backend": "s3", "endpoint_url": moto.url, "region": "us-east-1", "bucket": bucket,
            "prefix": "team-a", "addressing_style": "path", "access_key_id_secret": KEY_ID_SECRET,
            "secret_access_key_secret": SECRET_KEY_SECRET}


def stored_keys(client, bucket, prefix=""):
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", [])]
    return keys


@pytest.fixture(params=["local", "s3"])
def storage_backend(request):
    """Daemon settings for each storage backend: ``{}`` (local disk) or the ``s3`` backend on a fresh
    bucket of moto_server, for the S3 tests that must answer the same on both."""
    if request.param == "local":
        return {}
    return request.getfixturevalue("backing")[0]


def stored_bytes(daemon, key: str, bucket: str = "outputs") -> bytes:
    """What the daemon's store holds under ``key`` (the file on local disk, or the object in the
    backing bucket); ``FileNotFoundError`` when nothing."""
    import os

    storage = daemon.ctx.config.storage
    if storage.backend == "local":
        with open(os.path.join(daemon.ctx.outputs_dir(), *key.split("/")), "rb") as fh:
            return fh.read()
    client = daemon.ctx.s3.engine.store.client()
    try:
        return client.get_object(Bucket=storage.bucket, Key=f"{storage.prefix}{bucket}/{key}")["Body"].read()
    except client.exceptions.NoSuchKey:
        raise FileNotFoundError(key) from None
