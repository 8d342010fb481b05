"""The FastAPI app: TGI routes, OpenAI routes, info routes, limits and error JSON.

``build_app(state)`` makes an app per :class:`ServerState` (no globals: tests build several).
Its lifespan starts the engine, warms it up (``/health`` says 503 until then) and shuts it
down after uvicorn has drained the in-flight requests.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmport import __version__
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.server import routes_info, routes_openai, routes_tgi
from lmport.server.auth import ApiKeys
from lmport.server.errors import ApiError, install_error_handlers
from lmport.server.openapi import install_openapi
from lmport.server.generation import ClientDisconnected
from lmport.server.state import ServerState

log = logging.getLogger(__name__)


class PayloadTooLarge(StarletteHTTPException):
    """Raised while the body streams in; an HTTPException so FastAPI's body reader lets it through."""

    def __init__(self, message: str):
        super().__init__(status_code=413, detail=message)


class PayloadLimit:
    """``--payload-limit``: 413 for a body over the limit, by header or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            error = ApiError(self._message(int(declared)), status_code=413, error_type="payload_limit")
            await error.response(scope.get("path", ""))(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise PayloadTooLarge(self._message(received))
            return message

        await self.app(scope, limited_receive, send)

    def _message(self, size: int) -> str:
        return f"Payload too large: {size} bytes is over the limit of {self.limit} bytes (--payload-limit)"


async def warm_up(state: ServerState) -> None:
    """Start the engine and push one short request through it; then /health says 200."""
    started = time.monotonic()
    state.engine.start()
    first_token = state.model.eos_token_ids[0] if state.model.eos_token_ids else 0
    prompt = state.tokenizer.bos_token_id  # None for tokenizers without a BOS
    ids = (prompt if prompt is not None else first_token,)
    request = GenerationRequest("warmup", ids, SamplingParams(max_new_tokens=2, ignore_eos=True))
    (stream,) = state.engine.submit([request])
    async for output in stream:
        if output.error:
            raise RuntimeError(f"the warm-up request failed: {output.error}")
    state.ready = True
    log.info("warm-up done in %.1f s; ready", time.monotonic() - started)


def build_app(state: ServerState, *, manage_engine: bool = True) -> FastAPI:
    """The HTTP app for ``state``. With ``manage_engine``, its lifespan starts, warms up and stops the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            await warm_up(state)
        else:
            state.ready = True
        try:
            yield
        finally:
            state.ready = False
            if manage_engine:
                state.engine.shutdown()

    app = FastAPI(
        title="lmport",
        description="Text generation with TGI's API and an OpenAI-compatible API",
        version=__version__,
        lifespan=lifespan,
        docs_url="/docs",
        openapi_url="/api-doc/openapi.json",
    )
    app.state.lmport = state
    app.state.api_keys = api_keys = ApiKeys((state.config.api_key or "", *state.config.api_keys))
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it: the client left

    app.include_router(routes_tgi.router)
    app.include_router(routes_openai.router)
    app.include_router(routes_info.router)
    install_openapi(app, auth=api_keys.enabled, limits=state.limits)
    if state.config.cors_allow_origin:  # off by default: browsers get no cross-origin access
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.config.cors_allow_origin),
            allow_methods=["GET", "POST"],
            # TGI allows only content-type; a browser needs authorization too when a key is required
            allow_headers=["content-type", "authorization"] if api_keys.enabled else ["content-type"],
        )
    app.add_middleware(PayloadLimit, limit=state.config.payload_limit)
    return app
