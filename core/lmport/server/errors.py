"""The error contract: TGI's ``{"error": message, "error_type": kind}`` on TGI's routes and
OpenAI's ``{"error": {"message", "type", "param", "code"}}`` on ``/v1/*`` (the ``openai`` SDK,
LiteLLM and LangChain show only that shape's message).

Status codes follow TGI's router: 400 a body that is not JSON (axum's ``JsonSyntaxError``),
422 validation, 424 generation failure, 429 overloaded, 500 incomplete generation, 503
unhealthy; plus 401 (api key), 404/405 (route, method), 413 (payload limit), 503 while a dead
engine process is restarted and 504 past --request-timeout. Never a 500 for anything a client sent.
"""

from __future__ import annotations

import logging
import math
from typing import Any

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
    param: str | None = None  # the request field at fault, where known (OpenAI's ``param``)

    def __init__(
        self, message: str | None = None, *, status_code: int | None = None, error_type: str | None = None,
        param: str | None = None,
    ):
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
        if param is not None:
            self.param = param
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, str]:
        return {"error": self.message, "error_type": self.error_type}

    def openai_body(self) -> dict[str, dict[str, str | None]]:
        """OpenAI's error object; ``code`` carries TGI's ``error_type``."""
        return {"error": {"message": self.message, "type": openai_type(self.status_code), "param": self.param, "code": self.error_type}}

    def body_for(self, path: str) -> dict[str, Any]:
        return self.openai_body() if is_openai_path(path) else self.body()

    def response(self, path: str = "") -> JSONResponse:
        return JSONResponse(self.body_for(path), status_code=self.status_code, headers=self.headers or None)


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_type(status_code: int) -> str:
    """OpenAI's ``error.type`` for a status (the SDK picks its exception class by status)."""
    if status_code == 401:
        return "authentication_error"
    if status_code == 404:
        return "not_found_error"
    if status_code == 429:
        return "rate_limit_error"
    if status_code >= 500 or status_code == 424:
        return "server_error"
    return "invalid_request_error"


class ValidationFailed(ApiError):
    status_code = 422
    error_type = "validation"


class BodyNotJson(ApiError):
    """400, as TGI's router answers a body that is not JSON at all (422 is for JSON of the wrong shape)."""

    status_code = 400
    error_type = "validation"


def retry_after(error: ApiError, seconds: float | None) -> ApiError:
    """``error`` with a ``Retry-After`` header of ``seconds`` rounded up (at least 1)."""
    error.headers["Retry-After"] = str(max(1, math.ceil(seconds or 1)))
    return error


class Overloaded(ApiError):
    """429, with ``Retry-After``: the queue is full, or a request waited past --max-queue-time."""

    status_code = 429
    error_type = "overloaded"
    default_message = "Model is overloaded"

    def __init__(self, message: str | None = None, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        retry_after(self, retry_after_s)


class EngineUnavailable(ApiError):
    """503, with ``Retry-After``: the engine process died and a new one is loading."""

    status_code = 503
    error_type = "unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        retry_after(self, retry_after_s)


class TimedOut(ApiError):
    """504: the request ran past --request-timeout; it was ended and its KV blocks freed."""

    status_code = 504
    error_type = "timeout"


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


def validation_failure(exc: RequestValidationError) -> ApiError:
    """One readable line from pydantic's error list, e.g. ``parameters.top_k: Input should be ...``;
    ``param`` is the first field at fault."""
    parts, params = [], []
    for err in exc.errors():
        location = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":  # FastAPI's own parse (routes without StrictJsonRoute)
            return BodyNotJson(f"request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        if location:
            params.append(location)
        if err.get("type") == "missing":
            parts.append(f"missing field `{location}`" if location else "request body is missing")
        else:
            parts.append(f"{location}: {err.get('msg')}" if location else str(err.get("msg")))
    return ValidationFailed("; ".join(parts) or "invalid request", param=params[0] if params else None)


HTTP_ERROR_TYPES = {400: "validation", 404: "not_found", 405: "method_not_allowed", 413: "payload_limit", 422: "validation"}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response(request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_failure(exc).response(request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = ApiError(
            str(exc.detail), status_code=exc.status_code, error_type=HTTP_ERROR_TYPES.get(exc.status_code, "http"),
            param=getattr(exc, "param", None),
        )
        error.headers = dict(exc.headers or {})  # a 405 keeps its `Allow`
        return error.response(request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected server error")
        return ApiError(f"{type(exc).__name__}: {exc}", status_code=500, error_type="server").response(request.url.path)
