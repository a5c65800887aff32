"""The backing store's boto3 client (the ``s3`` ``storage.backend``): built once from the
``storage`` settings and the store's keys, every call with the store's failures mapped to S3 errors
clients retry, its small JSON records, and the streaming reader of an object's bytes.

Blocking: used from the ``s3-io`` pool only. boto3 is imported when the first client is built (start-up
must not load it: ``tests/test_lazy_imports.py``). The keys are kept here and nowhere else; no
message built here contains them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import threading
from typing import Any, Iterable, Mapping, Optional

from stdaemon.logs import get_logger
from stdaemon.s3 import backing_records as records
from stdaemon.s3.errors import StorageError

log = get_logger("stdaemon.s3.backing_store")

#: Attempts per store call (botocore's standard retry mode: throttling, 5xx, connection errors).
MAX_ATTEMPTS = 5
#: How ``code(exc)`` names "not there" for the calls whose absence is an answer.
MISSING = ("NoSuchKey", "404", "NotFound")


def unavailable() -> StorageError:
    return StorageError("ServiceUnavailable", "The object store is unavailable. Please try again.", 503)


def code(exc: Any) -> str:
    """The S3 error code of a botocore ``ClientError``."""
    return str(exc.response.get("Error", {}).get("Code", ""))


class StoreClient:
    """One boto3 S3 client of the backing bucket, rebuilt when the keys change."""

    def __init__(self, settings: Any, environ: Optional[Mapping[str, str]] = None):
        self.settings = settings
        self.bucket = settings.bucket
        self.environ = dict(environ or {})
        self._credentials: Optional[tuple[str, str]] = None
        self._client: Any = None
        self._lock = threading.Lock()

    def set_credentials(self, key_id: str, secret_key: str) -> None:
        with self._lock:
            if self._credentials != (key_id, secret_key):
                self._credentials = (key_id, secret_key)
                self._client = None  # rotated: the next call builds a client with the new keys

    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = self._build_client()
            return self._client

    def _build_client(self) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        settings = self.settings
        env = self.environ
        verify: Any = settings.ssl_verify and env.get("SIMPLETUNER_SSL_VERIFY", "").lower() not in ("0", "false", "no")
        bundle = settings.ssl_ca_bundle or env.get("SIMPLETUNER_CA_BUNDLE", "")
        if verify and bundle:
            verify = os.path.expanduser(bundle)
        key_id, secret_key = self._credentials or (None, None)
        session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret_key,
                                        region_name=settings.region or None)
        return session.client(
            "s3", endpoint_url=settings.endpoint_url or None, verify=verify,
            config=BotoConfig(
                s3={"addressing_style": settings.addressing_style},
                retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
                connect_timeout=10, read_timeout=120, max_pool_connections=32,
                # Content-MD5 is sent with every body; no trailing checksums older stores refuse
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def call(self, method: str, **kwargs: Any) -> Any:
        """One store call; a store that cannot be reached is ``ServiceUnavailable`` (clients retry)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client(), method)(Bucket=self.bucket, **kwargs)
        except ClientError:
            raise
        except BotoCoreError as exc:
            log.warn("Object store call {method} failed: {error}", method=method, error=type(exc).__name__)
            raise unavailable() from None


    def error(self, exc: Any, method: str) -> StorageError:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 500)
        log.warn("Object store call {method} refused: {code} ({status})", method=method, code=code(exc),
                 status=status)
        return unavailable()

    # -- small JSON records and listings --------------------------------------------------------

    def get_json(self, name: str) -> Optional[dict]:
        from botocore.exceptions import ClientError

        try:
            body = self.call("get_object", Key=name)["Body"]
            try:
                data = body.read()
            finally:
                body.close()
        except ClientError as exc:
            if code(exc) in MISSING:
                return None
            raise self.error(exc, "get_object") from None
        return records.decode(data)

    def put_json(self, name: str, data: dict) -> None:
        from botocore.exceptions import ClientError

        body = json.dumps(data, sort_keys=True).encode("utf-8")
        try:
            self.call("put_object", Key=name, Body=body, ContentType="application/json",
                       ContentMD5=base64.b64encode(hashlib.md5(body).digest()).decode("ascii"))
        except ClientError as exc:
            raise self.error(exc, "put_object") from None

    def delete(self, name: str) -> None:
        from botocore.exceptions import ClientError

        try:
            self.call("delete_object", Key=name)
        except ClientError as exc:
            if code(exc) not in ("NoSuchKey", "404", "NotFound"):
                raise self.error(exc, "delete_object") from None

    def names(self, prefix: str, delimiter: str = "") -> Iterable[tuple[str, bool]]:
        """``(name, is common prefix)`` of everything under ``prefix`` (every page)."""
        from botocore.exceptions import ClientError

        token = None
        while True:
            kwargs: dict = {"Prefix": prefix, "MaxKeys": 1000}
            if delimiter:
                kwargs["Delimiter"] = delimiter
            if token:
                kwargs["ContinuationToken"] = token
            try:
                page = self.call("list_objects_v2", **kwargs)
            except ClientError as exc:
                raise self.error(exc, "list_objects_v2") from None
            for item in page.get("Contents", []):
                yield item["Key"], False
            for item in page.get("CommonPrefixes", []):
                yield item["Prefix"], True
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return


class BackingReader:
    """An object's bytes from the store: one streaming ranged GET from the first offset read,
    continued while reads follow each other, opened again after a seek elsewhere. ``If-Match`` the
    backing ETag seen by HEAD: an object replaced meanwhile ends the read rather than mixing two."""

    def __init__(self, store: StoreClient, name: str, backing_etag: str, size: int):
        self.store = store
        self.name = name
        self.backing_etag = backing_etag
        self.size = size
        self._position = 0
        self._body: Any = None
        self._body_position = -1

    def seek(self, offset: int) -> int:
        self._position = offset
        return offset

    def read(self, size: int) -> bytes:
        if size <= 0 or self._position >= self.size:
            return b""
        if self._body is None or self._body_position != self._position:
            self._open()
        out = bytearray()
        while len(out) < size:
            block = self._body.read(size - len(out))
            if not block:
                break
            out += block
        self._position += len(out)
        self._body_position = self._position
        return bytes(out)

    def _open(self) -> None:
        from botocore.exceptions import ClientError

        self._close_body()
        try:
            answer = self.store.call("get_object", Key=self.name, IfMatch=self.backing_etag,
                                      Range=f"bytes={self._position}-")
        except ClientError as exc:
            if code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                raise StorageError("NoSuchKey", "The object changed while it was read.", 404) from None
            raise self.store.error(exc, "get_object") from None
        self._body = answer["Body"]
        self._body_position = self._position

    def _close_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # a connection already gone: nothing to release
                pass
            self._body = None

    def close(self) -> None:
        self._close_body()
