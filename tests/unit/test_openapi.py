"""relay/openapi.py: the control API's document is built from what each handler
declares, covers exactly the routes registered on the aiohttp app, and is a valid
OpenAPI 3.0 document."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from openapi_spec_validator import validate
from pydantic import BaseModel

from recorder.config import parse_config
from recorder.signing import SigningKey
from recorder.store import Store
from relay import peer
from relay.api import Error, build_app, openapi_document
from relay.context import RelayContext
from relay.openapi import Undocumented, declared, document, operation, to_openapi30


@pytest.fixture
def app(tmp_path: Path) -> Iterator[web.Application]:
    cfg = parse_config('data_dir = "data"\n', tmp_path / "castgate.toml")
    store = Store.open(cfg.store_url())
    try:
        yield build_app(RelayContext(cfg, store, SigningKey.generate()))
    finally:
        store.close()


def routes(app: web.Application) -> tuple[set[tuple[str, str]], set[str]]:
    """(documented (METHOD, path) pairs, paths kept out on purpose) of ``app``."""
    documented: set[tuple[str, str]] = set()
    kept_out: set[str] = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue
        assert route.resource is not None
        if isinstance(declared(route.handler), Undocumented):
            kept_out.add(route.resource.canonical)
        else:
            documented.add((route.method, route.resource.canonical))
    return documented, kept_out


def test_every_route_is_in_the_document_and_back(app: web.Application) -> None:
    doc = openapi_document(app)
    documented, kept_out = routes(app)
    in_doc = {(m.upper(), p) for p, item in doc["paths"].items() for m in item}
    assert in_doc == documented
    assert kept_out == {peer.LIVE_PATH}
    assert len(documented) == 14


def test_the_document_is_valid_openapi_30(app: web.Application) -> None:
    doc = openapi_document(app)
    assert doc["openapi"] == "3.0.3"
    validate(doc)


def test_a_route_without_a_declaration_is_an_error() -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/x", handler)
    with pytest.raises(LookupError, match="GET /x declares no OpenAPI operation"):
        document(app, "t", Error)


def test_declarations_become_operations() -> None:
    class Thing(BaseModel):
        name: str
        note: str | None = None

    class Query(BaseModel):
        limit: int | None = None

    @operation("A thing", Thing, 404, query=Query)
    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/things/{id}", handler)
    doc = document(app, "t", Error)
    op = doc["paths"]["/things/{id}"]["get"]
    assert sorted(op["responses"]) == ["200", "401", "403", "404", "503"]
    assert op["parameters"] == [
        {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "limit", "in": "query", "schema": {"type": "integer"}},
    ]
    thing = doc["components"]["schemas"]["Thing"]
    assert thing["required"] == ["name"]
    assert thing["properties"]["note"] == {"type": "string", "default": None, "nullable": True}
    validate(doc)


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, {"type": "string", "nullable": True}),
        (
            {"anyOf": [{"$ref": "#/x"}, {"type": "null"}]},
            {"allOf": [{"$ref": "#/x"}], "nullable": True},
        ),
        (
            {"anyOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}]},
            {"anyOf": [{"type": "string"}, {"type": "integer"}], "nullable": True},
        ),
        ({"const": "a", "title": "T"}, {"enum": ["a"]}),
        ({"items": {"title": "x", "type": "string"}}, {"items": {"type": "string"}}),
    ],
)
def test_to_openapi30(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert to_openapi30(schema) == expected
