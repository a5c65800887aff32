"""Request validation (S19): every body and query is a typed model, checked before a handler runs.

A route declares its models (``stdaemon.http.surface.route(..., body=SubmitJob, query=ListJobs)``)
and its handler receives the validated instances as the ``body=`` / ``query=`` keyword arguments.
The models of a surface are declared together at the top of its module (the "request models"
section); the OpenAPI document (``stdaemon/http/openapi.py``) is generated from the same models.

Validation is pydantic v2's: JSON bodies are parsed by pydantic-core's parser (no Python
recursion: nesting deeper than 200 levels, lone surrogates and invalid UTF-8 are parse errors,
``NaN``/``Infinity`` are refused) and validated in strict mode (a JSON string is not a number, a
number is not a boolean); query strings are validated in lax mode (``"5"`` is the integer 5).
Any failure is a 400 ``{"error", "detail", "field"}`` naming the first offending field; the
offending value itself is never echoed.
"""

from __future__ import annotations

import functools
import math
import typing
from typing import Any, Mapping

import pydantic_core
from pydantic import BaseModel, ConfigDict, ValidationError
from twisted.web.http import parse_qs

from stdaemon.http.errors import ApiError

# SQLite integers are signed 64-bit: a larger id in a body could never match a row and would
# overflow the driver.
SQLITE_MAX_INT = 2 ** 63 - 1


class BodyModel(BaseModel):
    """Base of JSON body models: strict types; unknown fields tolerated (SimpleTuner's clients send
    fields stdaemon does not use) unless a model sets ``extra="forbid"``."""

    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    def given(self) -> dict:
        """The fields the client sent (with tolerated extras), as plain JSON values."""
        return self.model_dump(mode="json", exclude_unset=True)


class QueryModel(BaseModel):
    """Base of query-string models: values arrive as text and are converted (lax mode); unknown
    parameters are ignored; an empty value counts as absent."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False, frozen=True)


def parse_json(raw: bytes) -> Any:
    """A JSON document as Python values, or a 400 ``invalid_json``: the one JSON parser for request
    bodies (bounded depth, no lone surrogates, no NaN)."""
    try:
        value = pydantic_core.from_json(raw, allow_inf_nan=False)
    except ValueError as exc:
        raise ApiError(400, "invalid_json", f"The body is not valid JSON: {_short(str(exc))}") from None
    if not _all_finite(value):
        # 1e400 parses as infinity: no JSON encoder downstream (audit, providers) accepts it back.
        raise ApiError(400, "invalid_json", "The body is not valid JSON: a number is out of range")
    return value


def _all_finite(value: Any) -> bool:
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, float):
            if not math.isfinite(item):
                return False
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def read_body(request: Any) -> bytes:
    content = request.content
    content.seek(0)
    return content.read()


def validate_body(request: Any, model: type[BodyModel], required: bool = True) -> BodyModel:
    return validate_raw(read_body(request), model, required)


def validate_raw(raw: bytes, model: type[BodyModel], required: bool = True) -> BodyModel:
    if not raw.strip():
        if required:
            raise ApiError(400, "invalid_json", "A JSON body is required")
        raw = b"{}"
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "The JSON body must be an object")
    return validate(model, data, code="invalid_field")


def query_string_args(request: Any) -> Mapping[bytes, list]:
    """The URL's query parameters only (twisted.web's ``request.args`` also holds the fields of a
    form-encoded body, which must not stand in for query parameters)."""
    uri = getattr(request, "uri", None)
    if not isinstance(uri, bytes):
        return getattr(request, "args", None) or {}
    _, sep, query = uri.partition(b"?")
    return parse_qs(query, 1) if sep else {}


def validate_query(request: Any, model: type[QueryModel]) -> QueryModel:
    args = query_string_args(request)
    if not args:
        return _defaults(model)
    data: dict[str, Any] = {}
    if args:
        for name, key, alias, listed in _query_plan(model):
            values = args.get(key)
            if not values:
                continue
            try:
                texts = [v.decode("utf-8") for v in values]
            except UnicodeDecodeError:
                raise ApiError(400, "invalid_query", f"{name}: is not valid UTF-8", field=name) from None
            texts = [t for t in texts if t != ""]
            if not texts:
                continue
            data[alias] = texts if listed else texts[0]
    return validate(model, data, code="invalid_query")


@functools.lru_cache(maxsize=None)  # one entry per query model class: a bounded set
def _defaults(model: type[QueryModel]) -> QueryModel:
    """The model of an empty query string, validated once: query models are frozen, so every
    request without parameters can share it (a model with required fields raises, uncached)."""
    return validate(model, {}, code="invalid_query")


@functools.lru_cache(maxsize=None)  # one entry per query model class: a bounded set
def _query_plan(model: type[QueryModel]) -> tuple[tuple[str, bytes, str, bool], ...]:
    """Per field: its name, the query key (bytes), the key pydantic validates and whether it
    takes every value (a list) or the first — worked out once per model, not per request."""
    listed = _list_fields(model)
    return tuple((name, (info.alias or name).encode(), info.alias or name, name in listed)
                 for name, info in model.model_fields.items())


def validate(model: type[BaseModel], data: Any, code: str = "invalid_field") -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc, code) from None


def validation_error(exc: ValidationError, code: str) -> ApiError:
    first = exc.errors(include_url=False, include_input=False)[0]
    loc = first.get("loc", ())
    # The top-level field the client sent (what a form highlights); deeper parts of the location
    # are union member names or container indexes.
    field = str(loc[0]) if loc else ""
    kind = first.get("type", "")
    if kind == "extra_forbidden":
        message = "unknown field"
    elif kind == "missing":
        message = "is required"
    else:
        message = _short(first.get("msg", "is not valid"))
    if not field:
        return ApiError(400, code, message)
    return ApiError(400, code, f"{field}: {message}", field=field)


def _list_fields(model: type[BaseModel]) -> set[str]:
    out = set()
    for name, info in model.model_fields.items():
        annotation = info.annotation
        for candidate in (annotation, *typing.get_args(annotation)):
            if typing.get_origin(candidate) in (list, tuple):
                out.add(name)
    return out


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "…"

