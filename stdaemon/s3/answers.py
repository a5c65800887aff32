"""S3 answers: response headers as S3 writes them and XML error documents, including for what
the root refuses on S3 paths by itself (405, 429, …)."""

from __future__ import annotations

from typing import Any

from twisted.web.http_headers import Headers

from stdaemon.http.surface import Response
from stdaemon.s3 import xml_documents as s3_xml
from stdaemon.s3.errors import S3Error
from stdaemon.s3.parsing import split, splittable


class S3Headers(Headers):
    """Response headers that send ``x-amz-*`` names in lower case, as S3 does: clients keep the
    case of user-metadata names (``x-amz-meta-step`` → ``{"step": …}``), and Twisted would
    otherwise write ``X-Amz-Meta-Step``."""

    def getAllRawHeaders(self):
        for name, values in super().getAllRawHeaders():
            if name[:6].lower() == b"x-amz-":
                name = name.lower()
            yield name, values


#: S3 error codes for the statuses the root answers on S3 paths by itself.
API_ERROR_CODES = {
    400: "InvalidRequest", 401: "AccessDenied", 403: "AccessDenied", 404: "NoSuchKey",
    405: "MethodNotAllowed", 413: "EntityTooLarge", 429: "SlowDown", 500: "InternalError",
    503: "ServiceUnavailable",
}


def xml_error(request: Any, err: S3Error, resource: str = "") -> Response:
    body = s3_xml.error(err.code, err.message, getattr(request, "correlation_id", ""), resource, **err.extra)
    return Response(body=body, status=err.status, headers={"x-amz-request-id": getattr(request, "correlation_id", "")},
                    content_type="application/xml")


def api_error_document(request: Any, error: Any) -> bytes:
    """What the root answers on S3 paths (405 for a method S3 does not have, 429 from the rate
    limiter, …) as an S3 XML error that SDKs parse (and retry, for ``SlowDown``)."""
    code = API_ERROR_CODES.get(error.status, "InvalidRequest" if error.status < 500 else "InternalError")
    message = error.detail
    extra = {}
    if code == "MethodNotAllowed":
        message = "The specified method is not allowed against this resource."
        extra = {"Method": request.method.decode("latin-1", "replace")[:32], "ResourceType": "OBJECT"}
    elif code == "SlowDown":
        message = "Please reduce your request rate."
    request.setResponseCode(error.status)
    for name, value in error.headers.items():
        request.setHeader(name, value)
    request.setHeader("x-amz-request-id", getattr(request, "correlation_id", ""))
    if request.method == b"HEAD":
        request.setHeader("x-amz-error-code", code)
        return b""
    request.setHeader("Content-Type", "application/xml")
    _, _, bucket, key = split(request.uri) if splittable(request.uri) else ("", "", "", "")
    resource = f"/{bucket}/{key}" if key else (f"/{bucket}" if bucket else "/")
    return s3_xml.error(code, message, getattr(request, "correlation_id", ""), resource, **extra)
