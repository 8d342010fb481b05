"""TGI's error contract: every failure is ``{"error": message, "error_type": kind}``.

Status codes follow TGI's router: 422 validation, 424 generation failure, 429 overloaded,
500 incomplete generation, 503 unhealthy; plus 401 (api key) and 413 (payload limit). A body
that does not parse is a 422 like any other validation error, never a 500.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered to the client as TGI's error JSON."""

    status_code = 500
    error_type = "error"
    default_message: str | None = None  # the message when none is given (None: one must be)

    def __init__(self, message: str | None = None, *, status_code: int | None = None, error_type: str | None = None):
        if message is None:
            if self.default_message is None:
                raise TypeError(f"{type(self).__name__} needs a message")
            message = self.default_message
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if error_type is not None:
            self.error_type = error_type

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code)


class ValidationFailed(ApiError):
    status_code = 422
    error_type = "validation"


class Overloaded(ApiError):
    status_code = 429
    error_type = "overloaded"
    default_message = "Model is overloaded"


class GenerationFailed(ApiError):
    status_code = 424
    error_type = "generation"

    def __init__(self, detail: str):
        super().__init__(f"Request failed during generation: {detail}")


class IncompleteGeneration(ApiError):
    status_code = 500
    error_type = "incomplete_generation"
    default_message = "Incomplete generation"


class TemplateFailed(ApiError):
    status_code = 422
    error_type = "template_error"


class Unauthorized(ApiError):
    status_code = 401
    error_type = "authentication"
    default_message = "Unauthorized: missing or invalid bearer token"


class Unhealthy(ApiError):
    status_code = 503
    error_type = "healthcheck"
    default_message = "unhealthy"


def describe_validation_errors(exc: RequestValidationError) -> str:
    """One readable line from pydantic's error list, e.g. ``parameters.top_k: Input should be ...``."""
    parts = []
    for err in exc.errors():
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            parts.append(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        elif err.get("type") == "missing":
            parts.append(f"missing field `{location}`" if location else "request body is missing")
        else:
            parts.append(f"{location}: {err.get('msg')}" if location else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return ValidationFailed(describe_validation_errors(exc)).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found", 405: "method_not_allowed", 413: "payload_limit"}.get(exc.status_code, "http")
        return ApiError(str(exc.detail), status_code=exc.status_code, error_type=kind).response()

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected server error")
        return ApiError(f"{type(exc).__name__}: {exc}", status_code=500, error_type="server").response()
