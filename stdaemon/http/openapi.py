"""The OpenAPI 3.1 description of the HTTP API, generated from the route table and its models (S19).

Served at ``GET /api/openapi.json`` (public: it says what the API accepts and who may call each
operation, never a secret or a setting's value). Every route declared with
:func:`stdaemon.http.surface.route` is described: its path, methods, access role
(``x-stdaemon-access``: public, viewer, operator or admin, with the matching ``security``), its
query parameters and JSON body from the route's models (pydantic's JSON Schema, draft 2020-12,
which OpenAPI 3.1 uses), and its answers: the success content type(s) and the one JSON error
shape ``{error, detail, field?}``. The S3 surface answers XML and is described minimally.
"""

from __future__ import annotations

import json
import re
from typing import Any, Iterable

from klein import Klein
from pydantic.json_schema import models_json_schema

from stdaemon.http.dispatch import route_table
from stdaemon.http.surface import PUBLIC, Access, RouteInfo, Surface, route

REF = "#/components/schemas/{model}"
ERROR_SCHEMA = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "Stable machine-readable code"},
        "detail": {"type": "string", "description": "What went wrong, for people"},
        "field": {"type": "string", "description": "The request field at fault, when there is one"},
    },
}
SECURITY_SCHEMES = {
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key",
               "description": "An API key (st_…); its role is the key's"},
    "bearer": {"type": "http", "scheme": "bearer", "description": "The same API key as a bearer token"},
    "session": {"type": "apiKey", "in": "cookie", "name": "st_session",
                "description": "Console session from POST /api/auth/login; state-changing requests "
                               "also send X-CSRF-Token (the st_csrf cookie) and a same-origin Origin"},
}
AUTHENTICATED = [{"apiKey": []}, {"bearer": []}, {"session": []}]
S3_PREFIX = "/api/cloud/storage"
_PARAM = re.compile(r"<(?:[a-zA-Z_]+:)?([a-zA-Z_][a-zA-Z0-9_]*)>")


def openapi_path(template: str) -> tuple[str, list[str]]:
    """``/api/cloud/jobs/<job_id>`` → (``/api/cloud/jobs/{job_id}``, ["job_id"])."""
    names = _PARAM.findall(template)
    return _PARAM.sub(lambda m: "{" + m.group(1) + "}", template), names


def _without_null(schema: dict) -> dict:
    """A query parameter is absent or text: drop the ``null`` alternative of optional fields."""
    options = schema.get("anyOf")
    if not options:
        return schema
    kept = [o for o in options if o.get("type") != "null"]
    out = {k: v for k, v in schema.items() if k not in ("anyOf", "default") or (k == "default" and v is not None)}
    if len(kept) == 1:
        out.update(kept[0])
    else:
        out["anyOf"] = kept
    return out


def _models(routes: Iterable[tuple[str, tuple, str, RouteInfo]]) -> dict:
    models = {}
    for _, _, _, info in routes:
        for model in (info.body, info.query):
            if model is not None:
                models[model] = None
    return models


def document(routes: list[tuple[str, tuple[str, ...], str, RouteInfo]], version: str) -> dict:
    """The OpenAPI document for ``routes`` (``Root.routes()``)."""
    models = list(_models(routes))
    refs, defs = models_json_schema([(m, "validation") for m in models], ref_template=REF)
    schemas = dict(defs.get("$defs", {}))
    schemas["Error"] = ERROR_SCHEMA
    paths: dict[str, dict] = {}
    used_ids: set[str] = set()
    for template, methods, endpoint, info in sorted(routes, key=lambda r: r[0]):
        path, names = openapi_path(template)
        entry = paths.setdefault(path, {})
        for method in methods:
            entry[method.lower()] = _operation(method, path, names, endpoint, info, refs, schemas, used_ids)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "stdaemon",
            "version": version,
            "description": "SimpleTuner's cloud-training operations server. Every error is JSON "
                           "{error, detail} (S3: S3 XML). x-stdaemon-access names the least role "
                           "that may call an operation (admin ⊇ operator ⊇ viewer).",
        },
        "paths": paths,
        "components": {"schemas": schemas, "securitySchemes": SECURITY_SCHEMES},
    }


def _operation(method: str, path: str, names: list[str], endpoint: str, info: RouteInfo,
               refs: dict, schemas: dict, used_ids: set) -> dict:
    access = info.access.name.lower()
    operation_id = f"{method.lower()}_{endpoint.rsplit('.', 2)[-2]}_{endpoint.rsplit('.', 1)[-1]}"
    while operation_id in used_ids:
        operation_id += "_"
    used_ids.add(operation_id)
    op: dict[str, Any] = {
        "operationId": operation_id,
        "summary": info.summary or f"{method} {path}",
        "tags": [endpoint.rsplit(".", 2)[-2]],
        "x-stdaemon-access": access,
        "security": [] if info.access == Access.PUBLIC else AUTHENTICATED,
    }
    parameters = [{"name": name, "in": "path", "required": True,
                   "schema": {"type": "string", "minLength": 1, "maxLength": 1024}} for name in names]
    if info.query is not None:
        schema = schemas.get(info.query.__name__) or info.query.model_json_schema(ref_template=REF)
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            parameters.append({"name": name, "in": "query", "required": name in required,
                               "schema": _without_null(prop)})
    if parameters:
        op["parameters"] = parameters
    if info.body is not None:
        op["requestBody"] = {"required": info.body_required, "content": {
            "application/json": {"schema": refs[(info.body, "validation")]}}}
    if path.startswith(S3_PREFIX):
        op["responses"] = {"default": {"description": "S3 answer (XML; errors are S3 error documents)",
                                       "content": {"application/xml": {}, "application/octet-stream": {}}}}
        return op
    success = {content_type: {} for content_type in info.produces}
    if "application/json" in success:
        success["application/json"] = {"schema": {"type": ["object", "array"]}}
    error = {"description": "Error", "content": {"application/json": {"schema": {"$ref": REF.format(model="Error")}}}}
    op["responses"] = {"2XX": {"description": "Success", "content": success}, "3XX": {"description": "Redirect"},
                       "4XX": error, "5XX": error}
    return op


class OpenApiSurface(Surface):
    """``GET /api/openapi.json``: the document for every surface of this daemon (built once)."""

    app = Klein()
    prefixes = ("/api/openapi.json",)

    def __init__(self, ctx: Any, surfaces: list):
        super().__init__(ctx)
        self.surfaces = surfaces   # the daemon's list, this surface included
        self._document: bytes | None = None

    @route(app, "/api/openapi.json", access=PUBLIC)
    def openapi(self, request):
        """This document."""
        if self._document is None:
            body = document(route_table(self.surfaces), self.ctx.version)
            self._document = json.dumps(body, separators=(",", ":")).encode()
        request.setHeader("Content-Type", "application/json")
        return self._document
