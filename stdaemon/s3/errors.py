"""The S3 endpoint's errors: an :class:`S3Error` carries the S3 code, message and status that the
surface answers with as an S3 XML error document (pure: no I/O)."""

from __future__ import annotations

from typing import Any, Optional

from stdaemon.s3 import sigv4, xml_documents as s3_xml
from stdaemon.s3.aws_chunked import ChunkedError
from stdaemon.s3.keys import InvalidKey

#: Reason phrases of the statuses an S3 refusal is sent with before its body is read.
REASONS = {400: b"Bad Request", 403: b"Forbidden", 404: b"Not Found", 429: b"Too Many Requests",
           500: b"Internal Server Error", 501: b"Not Implemented"}


class S3Error(Exception):
    def __init__(self, code: str, message: str, status: Optional[int] = None, **extra: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status or s3_xml.status_for(code)
        self.extra = extra


class AuthError(Exception):
    """A refusal with an S3 error code (the surface turns it into its ``S3Error``)."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.extra = extra


class StorageError(Exception):
    """An S3-level failure: ``code`` (``NoSuchKey``, ``InvalidPart``, …), HTTP ``status``."""

    def __init__(self, code: str, message: str, status: int = 400, **extra: Any):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status
        self.extra = extra


def no_such_key(key: str) -> StorageError:
    return StorageError("NoSuchKey", "The specified key does not exist.", 404, Key=key)


def no_such_bucket(bucket: str) -> StorageError:
    return StorageError("NoSuchBucket", "The specified bucket does not exist", 404, BucketName=bucket)


def no_such_upload(upload_id: str) -> StorageError:
    return StorageError(
        "NoSuchUpload",
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have "
        "been aborted or completed.",
        404,
        UploadId=upload_id,
    )


def precondition_failed(condition: str) -> StorageError:
    return StorageError("PreconditionFailed", "At least one of the pre-conditions you specified did not hold",
                        412, Condition=condition)


def internal_error() -> S3Error:
    return S3Error("InternalError", "We encountered an internal error. Please try again.")


def malformed_xml() -> S3Error:
    return S3Error("MalformedXML", "The XML you provided was not well-formed or did not validate "
                   "against our published schema.")


def access_denied() -> S3Error:
    return S3Error("AccessDenied", "Access Denied")


def missing_bucket(bucket: str) -> S3Error:
    return S3Error("NoSuchBucket", "The specified bucket does not exist", BucketName=bucket)


def as_s3_error(exc: Exception) -> S3Error:
    """The S3 answer to a known failure; any other exception is raised again."""
    if isinstance(exc, S3Error):
        return exc
    if isinstance(exc, StorageError):
        return S3Error(exc.code, exc.message, exc.status if exc.status != 400 else None, **exc.extra)
    if isinstance(exc, (ChunkedError, sigv4.SignatureError, InvalidKey)):
        return S3Error(exc.code, exc.message)
    if isinstance(exc, AuthError):
        return S3Error(exc.code, exc.message, **exc.extra)
    raise exc
