"""``/api-doc/openapi.json``: FastAPI's document, with every error status each route really
answers and the error body it answers it with (TGI's on TGI's routes, OpenAI's on ``/v1/*``).

:data:`ROUTE_ERRORS` is the one table of those statuses; tests check it covers every route and
a schemathesis run checks the server keeps to it. The ``401`` and the bearer security scheme
appear only on an app started with ``--api-key``/``--api-key-file``, on the routes that need
the key, and the request fields carry this server's ranges (:func:`field_ranges`), so the
document says what that server does.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from lmport.engine.rules import MAX_SEQUENCES_PER_REQUEST, MAX_STOP_SEQUENCE_CHARS
from lmport.server.auth import require_api_key
from lmport.server.errors import is_openai_path
from lmport.server.schemas_openai import OpenAIErrorResponse
from lmport.server.schemas_tgi import ErrorResponse

DESCRIPTIONS = {
    400: "Request body is not JSON",
    401: "Missing or wrong API key (Authorization: Bearer <key>)",
    413: "Request body larger than --payload-limit",
    422: "Input validation error (also: a `grammar` or `response_format` that cannot be compiled, naming the unsupported feature)",
    424: "Generation error",
    429: "Model is overloaded: the queue is full or the request waited past --max-queue-time (with Retry-After)",
    500: "Incomplete generation",
    503: "Model is warming up, or its engine is down or being restarted (with Retry-After)",
    504: "Request took longer than --request-timeout",
}

BODY = (400, 413, 422)  # any route that reads a JSON body
GENERATION = (*BODY, 424, 429, 500, 503, 504)

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


def field_ranges(limits: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """The ranges the engine's rules (engine/rules.py) and the wire rules (server/validation.py)
    enforce, as JSON Schema keywords per component and field, with this server's limits.

    Only documentation: the checks themselves answer with TGI's messages. What no schema can say
    (prompt tokens + ``max_new_tokens`` <= ``max_total_tokens``, ``best_of`` needs sampling ...)
    is in docs/api.md.
    """
    probability = {"exclusiveMinimum": 0, "exclusiveMaximum": 1}
    penalty = {"minimum": -2, "maximum": 2}
    new_tokens = {"minimum": 1, "maximum": max(limits.max_total_tokens - 1, 1)}
    tgi = {
        "temperature": {"exclusiveMinimum": 0}, "repetition_penalty": {"exclusiveMinimum": 0},
        "frequency_penalty": penalty, "top_p": probability, "typical_p": probability, "top_k": {"minimum": 1},
        "max_new_tokens": new_tokens, "best_of": {"minimum": 1, "maximum": limits.max_best_of},
        "top_n_tokens": {"maximum": limits.max_top_n_tokens}, "truncate": {"minimum": 1, "maximum": limits.max_input_tokens},
        "stop": {"maxItems": limits.max_stop_sequences, "maxLength": MAX_STOP_SEQUENCE_CHARS},
    }
    openai = {
        "temperature": {"minimum": 0}, "top_p": {"exclusiveMinimum": 0, "maximum": 1},
        "frequency_penalty": penalty, "presence_penalty": penalty, "repetition_penalty": {"exclusiveMinimum": 0},
        "max_tokens": new_tokens, "n": {"maximum": MAX_SEQUENCES_PER_REQUEST},
        "stop": {"maxItems": limits.max_stop_sequences, "maxLength": MAX_STOP_SEQUENCE_CHARS},
    }
    return {
        "GenerateParameters": tgi,
        "GenerateRequest": {"inputs": {"minLength": 1}},
        "CompatGenerateRequest": {"inputs": {"minLength": 1}},
        "ChatRequest": {**openai, "max_completion_tokens": new_tokens, "top_logprobs": {"maximum": limits.max_top_n_tokens}},
        "CompletionRequest": {**openai, "logprobs": {"maximum": limits.max_top_n_tokens}, "best_of": {"maximum": 1}},
    }


def prompt_schema(limits: Any) -> dict[str, Any]:
    """``/v1/completions``' ``prompt``: one text or token-id list, or a batch of up to
    ``--max-client-batch-size`` of them; none empty."""
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    text = {"type": "string", "minLength": 1}
    batch = {"minItems": 1, "maxItems": limits.max_client_batch_size}
    return {"anyOf": [text, ids, {"type": "array", "items": text, **batch}, {"type": "array", "items": ids, **batch}],
            "title": "Prompt", "examples": ["Say this is a test"]}


# Routes that answer server-sent events when the body asks for ``stream``
STREAMS_WHEN_ASKED = {("post", "/"), ("post", "/v1/chat/completions"), ("post", "/v1/completions")}


def _constrain(schema: dict[str, Any], keywords: dict[str, Any]) -> None:
    """Add ``keywords`` to the branches of ``schema`` (or its ``anyOf``) they apply to."""
    branches = schema.get("anyOf", [schema])
    for branch in branches:
        kind = branch.get("type")
        if kind == "array" and branch.get("items", {}).get("type") == "string" and "maxLength" in keywords:
            branch["items"]["maxLength"] = keywords["maxLength"]  # each string of a list of them
        for keyword, value in keywords.items():
            applies = {"minLength": "string", "maxLength": "string", "maxItems": "array"}.get(keyword, ("number", "integer"))
            if kind in (applies if isinstance(applies, tuple) else (applies,)):
                branch[keyword] = value


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


def contract_document(app: FastAPI, *, auth: bool, limits: Any = None) -> dict[str, Any]:
    document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    components = document.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for model in (ErrorResponse, OpenAIErrorResponse):
        schema = _schema_of(model)
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body, never answered here
        schemas.pop(name, None)
    if limits is not None:
        for component, fields in field_ranges(limits).items():
            for field, keywords in fields.items():
                _constrain(schemas[component]["properties"][field], keywords)
        schemas["CompletionRequest"]["properties"]["prompt"] = prompt_schema(limits)
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
            if (method, path) in STREAMS_WHEN_ASKED:
                responses["200"].setdefault("content", {})["text/event-stream"] = {}  # with `stream`: true
            for status in sorted(statuses):
                responses[str(status)] = {
                    "description": DESCRIPTIONS[status],
                    "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{error_model}"}}},
                }
            operation["responses"] = responses
    return document


def install_openapi(app: FastAPI, *, auth: bool, limits: Any = None) -> None:
    cache: dict[str, Any] = {}

    def openapi() -> dict[str, Any]:
        if "document" not in cache:
            cache["document"] = contract_document(app, auth=auth, limits=limits)
        return cache["document"]

    app.openapi = openapi  # type: ignore[method-assign]
