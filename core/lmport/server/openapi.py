"""``/api-doc/openapi.json``: FastAPI's document, with every error status each route really
answers and the error body it answers it with (TGI's on TGI's routes, OpenAI's on ``/v1/*``).

:data:`ROUTE_ERRORS` is the one table of those statuses; tests check it covers every route and
a schemathesis run checks the server keeps to it. The ``401`` and the bearer security scheme
appear only on an app started with ``--api-key``/``--api-key-file``, on the routes that need
the key, so the document says what that server does.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from lmport.server.auth import require_api_key
from lmport.server.errors import is_openai_path
from lmport.server.schemas_openai import OpenAIErrorResponse
from lmport.server.schemas_tgi import ErrorResponse

DESCRIPTIONS = {
    400: "Request body is not JSON",
    401: "Missing or wrong API key (Authorization: Bearer <key>)",
    413: "Request body larger than --payload-limit",
    422: "Input validation error",
    424: "Generation error",
    429: "Model is overloaded",
    500: "Incomplete generation",
    503: "Model is warming up, or its engine is down",
}

BODY = (400, 413, 422)  # any route that reads a JSON body
GENERATION = (*BODY, 424, 429, 500)

ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("post", "/generate"): GENERATION,
    ("post", "/generate_stream"): GENERATION,
    ("post", "/"): GENERATION,
    ("post", "/tokenize"): BODY,
    ("post", "/chat_tokenize"): BODY,
    ("post", "/v1/chat/completions"): GENERATION,
    ("post", "/v1/completions"): GENERATION,
    ("get", "/v1/models"): (),
    ("get", "/info"): (),
    ("get", "/health"): (503,),
    ("get", "/metrics"): (),
}

SECURITY_SCHEME = "bearer"


def iter_routes(routes: Iterable[BaseRoute]) -> Iterator[BaseRoute]:
    """Every route, with included routers flattened (FastAPI 0.16x keeps them nested; routers
    are included here without a prefix, so the paths are the routes' own)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from iter_routes(inner.routes)
        else:
            yield route


def protected_routes(app: FastAPI) -> set[tuple[str, str]]:
    """``(method, path)`` of every route that depends on :func:`require_api_key`."""
    found = set()
    for route in iter_routes(app.routes):
        if isinstance(route, APIRoute) and any(d.call is require_api_key for d in route.dependant.dependencies):
            found |= {(method.lower(), route.path) for method in route.methods}
    return found


def _schema_of(model: Any) -> dict[str, Any]:
    return model.model_json_schema(ref_template="#/components/schemas/{model}")


def contract_document(app: FastAPI, *, auth: bool) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (ErrorResponse, OpenAIErrorResponse):
        schema = _schema_of(model)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never answered here
        schemas.pop(name, None)
    protected = protected_routes(app) if auth else set()
    if protected:
        components["securitySchemes"] = {SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}}
    for path, operations in document["paths"].items():
        error_model = "OpenAIErrorResponse" if is_openai_path(path) else "ErrorResponse"
        for method, operation in operations.items():
            statuses = list(ROUTE_ERRORS.get((method, path), ()))
            if (method, path) in protected:
                statuses.append(401)
                operation["security"] = [{SECURITY_SCHEME: []}]
            responses = {code: answer for code, answer in operation.get("responses", {}).items() if code.startswith("2")}
            for status in sorted(statuses):
                responses[str(status)] = {
                    "description": DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_model}"}}},
                }
            operation["responses"] = responses
    return document


def install_openapi(app: FastAPI, *, auth: bool) -> None:
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "document" not in cache:
            cache["document"] = contract_document(app, auth=auth)
        return cache["document"]

    app.openapi = openapi  # type: ignore[method-assign]
