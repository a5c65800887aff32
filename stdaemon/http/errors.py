"""API errors: one exception type, rendered as ``{"error": code, "detail": text}``."""

from __future__ import annotations

from typing import Mapping


class ApiError(Exception):
    """Raise from any handler (or middleware) to answer with a JSON error.

    ``code`` is a stable machine-readable string; ``detail`` is for humans
    (SimpleTuner's CLI prints ``detail``).  Never put exception text from
    libraries or secrets into ``detail``.
    """

    def __init__(self, status: int, code: str, detail: str,
                 headers: Mapping[str, str] | None = None, **extra):
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict:
        body = {"error": self.code, "detail": self.detail}
        body.update(self.extra)
        return body


def bad_request(detail: str, code: str = "bad_request", **extra) -> ApiError:
    return ApiError(400, code, detail, **extra)


def invalid_field(field: str, detail: str) -> ApiError:
    """400 naming the offending field (``field`` is also in the body)."""
    return ApiError(400, "invalid_field", f"{field}: {detail}", field=field)


def not_found(detail: str = "Not found") -> ApiError:
    return ApiError(404, "not_found", detail)


def conflict(detail: str, code: str = "conflict") -> ApiError:
    return ApiError(409, code, detail)


def unauthorized(detail: str = "Authentication required") -> ApiError:
    return ApiError(401, "unauthorized", detail,
                    headers={"WWW-Authenticate": 'Bearer realm="stdaemon"'})


def forbidden(detail: str = "Forbidden") -> ApiError:
    return ApiError(403, "forbidden", detail)
