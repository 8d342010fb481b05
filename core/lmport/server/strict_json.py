"""Request bodies parsed as strict JSON, once, before pydantic sees them.

Python's ``json`` module accepts more than JSON: ``NaN``, ``Infinity`` (and ``1e999``, which
becomes infinity), strings holding lone surrogates (``"\\ud800"``, which no tokenizer or
encoder can handle), numbers of thousands of digits and nesting as deep as the recursion
limit. Each of those reached the routes as a 200 with garbage, a 500, or a long stall. Here:

- a body that is not UTF-8 or not JSON at all: 400 (TGI's status for a JSON syntax error);
- a non-finite number, a lone surrogate, an integer of more than 4,300 digits or nesting
  deeper than :data:`MAX_JSON_DEPTH` (64): 422, naming the field.

Every router with body routes uses :class:`StrictJsonRoute` (``APIRouter(route_class=...)``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Callable, Coroutine

from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import Response

MAX_JSON_DEPTH = 64  # a chat request with tools and their JSON schemas nests ~10-20 deep


class BodyRejected(StarletteHTTPException):
    """An HTTPException, so FastAPI's body reader lets it through to the app's error handler."""

    def __init__(self, status_code: int, message: str, param: str | None = None):
        super().__init__(status_code=status_code, detail=message)
        self.param = param


def _where(path: tuple[str | int, ...]) -> str:
    return ".".join(str(p) for p in path)


def _refuse(path: tuple[str | int, ...], problem: str) -> BodyRejected:
    where = _where(path)
    return BodyRejected(422, f"{where}: {problem}" if where else problem, param=where or None)


def _check_string(text: str, path: tuple[str | int, ...]) -> None:
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise _refuse(path, f"the string holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), "
                            "which is not valid Unicode") from None


def check_values(value: Any) -> None:
    """Raise :class:`BodyRejected` (422) for what JSON itself does not allow; iterative, so any depth is safe."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise _refuse((), f"the body nests deeper than {MAX_JSON_DEPTH} levels")
        kind = type(item)
        if kind is str:
            _check_string(item, path)
        elif kind is float:
            if not math.isfinite(item):
                raise _refuse(path, f"{json.dumps(item)} is not a finite number (JSON has no NaN or Infinity)")
        elif kind is dict:
            for key, child in item.items():
                _check_string(key, path)
                if type(child) not in (int, bool) and child is not None:
                    stack.append((child, (*path, key)))
        elif kind is list:
            for index, child in enumerate(item):
                if type(child) not in (int, bool) and child is not None:  # token-id lists stay cheap
                    stack.append((child, (*path, index)))


def parse_json_body(body: bytes) -> Any:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyRejected(400, f"request body is not valid JSON: it is not UTF-8 (byte {exc.start})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyRejected(400, f"request body is not valid JSON: {exc.msg}: line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BodyRejected(422, f"the body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as exc:  # int('9' * 5000): "Exceeds the limit (4300 digits) ..."
        raise BodyRejected(422, f"request body has a number out of range: {exc}") from None
    check_values(value)
    return value


class StrictJsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = parse_json_body(await self.body())
        return self._json


class StrictJsonRoute(APIRoute):
    """A route whose JSON body goes through :func:`parse_json_body`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def strict_handler(request: Request) -> Response:
            return await handler(StrictJsonRequest(request.scope, request.receive))

        return strict_handler
