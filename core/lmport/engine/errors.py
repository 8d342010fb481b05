"""Errors the engine raises to its callers (the server maps them to HTTP answers)."""

from __future__ import annotations


class RequestValidationError(ValueError):
    """The request can never be served as asked (too long, empty ...): TGI answers 422."""


class EngineOverloadedError(RuntimeError):
    """``max_concurrent_requests`` requests are in flight already: TGI answers 429."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down or a fatal error); nothing more can be served."""
