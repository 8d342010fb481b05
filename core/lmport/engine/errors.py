"""Errors the engine raises to its callers (the server maps them to HTTP answers)."""

from __future__ import annotations

from typing import Iterable


class RequestValidationError(ValueError):
    """The request can never be served as asked (too long, empty ...): TGI answers 422."""


class EngineOverloadedError(RuntimeError):
    """``max_concurrent_requests`` requests are in flight already: TGI answers 429."""


class EngineDeadError(RuntimeError):
    """The engine loop stopped (shut down or a fatal error); nothing more can be served."""


class EngineRestartingError(EngineDeadError):
    """The engine process died and a new one is starting: it serves again in a few seconds.

    ``retry_after_s``: the supervisor's guess of when (the back-off left plus the last start-up's length).
    """

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def check_token_ids(token_ids: Iterable[int], vocab_size: int | None) -> None:
    """Raise :class:`RequestValidationError` for an id outside ``0..vocab_size-1`` (``None``: only negatives)."""
    ids = list(token_ids)
    if not ids:
        return
    low, high = min(ids), max(ids)
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        limit = f"0..{vocab_size - 1}" if vocab_size is not None else "non-negative"
        raise RequestValidationError(f"token id {bad} is out of the vocabulary ({limit})")
