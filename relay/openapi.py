"""The control API's OpenAPI 3.0 document, built from what each handler declares.

A handler says what it answers with ``@operation(...)``: a summary, its 200 response
(a pydantic model, or a raw schema for a non-JSON body), the error codes beyond those
every protected route has, and pydantic models for its query parameters and body,
declared next to it in relay/api.py. ``document`` walks the aiohttp router, so a route
without a declaration (and not marked ``undocumented``) is an error, not a gap.

pydantic (already a dependency) writes JSON Schema 2020-12; the few forms OpenAPI 3.0
reads differently (``anyOf`` with ``null``, ``const``) are rewritten to 3.0's, so the
served document keeps its version and schemathesis reads it as before.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web
from pydantic import BaseModel

F = TypeVar("F", bound=Callable[..., Any])
Schema = dict[str, Any]

_REF = "#/components/schemas/{model}"
_PATH_PARAM = re.compile(r"\{(\w+)\}")
_ATTR = "__castgate_openapi__"
_AUTH_ERRORS = (401, 403, 503)  # 503: the audit store is unavailable


@dataclass(frozen=True)
class Operation:
    """What one handler declares about itself."""

    summary: str
    ok: type[BaseModel] | Schema
    content_type: str = "application/json"
    errors: tuple[int, ...] = ()
    query: type[BaseModel] | None = None
    body: type[BaseModel] | None = None
    body_required: bool = False
    auth: bool = True


@dataclass(frozen=True)
class Undocumented:
    """A route kept out of the document on purpose, and why."""

    why: str


def operation(
    summary: str,
    ok: type[BaseModel] | Schema,
    *errors: int,
    content_type: str = "application/json",
    query: type[BaseModel] | None = None,
    body: type[BaseModel] | None = None,
    body_required: bool = False,
    auth: bool = True,
) -> Callable[[F], F]:
    """Declare a handler's operation (outermost decorator, above ``requires``)."""
    op = Operation(summary, ok, content_type, errors, query, body, body_required, auth)

    def mark(handler: F) -> F:
        setattr(handler, _ATTR, op)
        return handler

    return mark


def undocumented(why: str) -> Callable[[F], F]:
    """Keep a handler's route out of the document (relay-to-relay routes)."""

    def mark(handler: F) -> F:
        setattr(handler, _ATTR, Undocumented(why))
        return handler

    return mark


def declared(handler: Any) -> Operation | Undocumented | None:
    """What ``handler`` declared, if anything."""
    found = getattr(handler, _ATTR, None)
    return found if isinstance(found, Operation | Undocumented) else None


class _Components:
    """The models the document refers to, as OpenAPI 3.0 schemas."""

    def __init__(self) -> None:
        self.schemas: dict[str, Schema] = {}

    def ref(self, model: type[BaseModel], mode: str = "serialization") -> Schema:
        schema = model.model_json_schema(ref_template=_REF, mode=mode)  # type: ignore[arg-type]
        for name, sub in schema.pop("$defs", {}).items():
            self.schemas[name] = to_openapi30(sub)
        self.schemas[model.__name__] = to_openapi30(schema)
        return {"$ref": _REF.format(model=model.__name__)}


def _schema(ok: type[BaseModel] | Schema, components: _Components) -> Schema:
    return components.ref(ok) if isinstance(ok, type) else ok


def _error_response() -> Schema:
    return {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": _REF.format(model="Error")}}},
    }


def _parameters(path: str, query: type[BaseModel] | None) -> list[Schema]:
    params: list[Schema] = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in _PATH_PARAM.findall(path)
    ]
    if query is not None:
        schema = to_openapi30(query.model_json_schema(mode="validation"))
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            prop = {k: v for k, v in prop.items() if k not in ("nullable", "default")}
            param: Schema = {"name": name, "in": "query", "schema": prop}
            if name in required:
                param["required"] = True
            params.append(param)
    return params


def _operation(path: str, op: Operation, components: _Components) -> Schema:
    responses: Schema = {
        "200": {
            "description": "ok",
            "content": {op.content_type: {"schema": _schema(op.ok, components)}},
        }
    }
    for code in (*op.errors, *(_AUTH_ERRORS if op.auth else ())):
        responses.setdefault(str(code), _error_response())
    out: Schema = {"summary": op.summary, "responses": responses}
    params = _parameters(path, op.query)
    if params:
        out["parameters"] = params
    if op.body is not None:
        out["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": components.ref(op.body, "validation")}},
        }
    if not op.auth:
        out["security"] = []
    return out


def document(app: web.Application, title: str, error: type[BaseModel]) -> Schema:
    """The OpenAPI 3.0 document of ``app``'s routes. ``error`` is the body of every
    error response (components' ``Error``)."""
    components = _Components()
    components.ref(error)
    paths: dict[str, Schema] = {}
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp's automatic HEAD for each GET
        path = route.resource.canonical if route.resource is not None else ""
        found = declared(route.handler)
        if isinstance(found, Undocumented):
            continue
        if found is None:
            raise LookupError(f"{route.method} {path} declares no OpenAPI operation")
        paths.setdefault(path, {})[route.method.lower()] = _operation(path, found, components)
    return {
        "openapi": "3.0.3",
        "info": {"title": title, "version": "1"},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": dict(sorted(components.schemas.items())),
        },
        "security": [{"bearer": []}],
        "paths": paths,
    }


def to_openapi30(schema: Any) -> Any:
    """JSON Schema as pydantic writes it, in OpenAPI 3.0's dialect: ``anyOf`` with a
    ``null`` branch becomes ``nullable``, ``const`` a one-value ``enum``; titles go."""
    if isinstance(schema, list):
        return [to_openapi30(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: to_openapi30(v) for k, v in schema.items() if k != "title"}
    if "const" in out:
        out["enum"] = [out.pop("const")]
    branches = out.get("anyOf")
    if isinstance(branches, list) and {"type": "null"} in branches:
        rest = [b for b in branches if b != {"type": "null"}]
        del out["anyOf"]
        if len(rest) == 1 and "$ref" not in rest[0]:
            out = {**rest[0], **out}
        else:
            out["anyOf" if len(rest) > 1 else "allOf"] = rest
        out["nullable"] = True
    return out
