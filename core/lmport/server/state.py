"""What every route needs: the engine, the tokenizer, the limits, metrics and health."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import dataclass, field
from typing import Any

from lmport import __version__
from lmport.config import LaunchConfig
from lmport.engine.api import EngineStats
from lmport.server.errors import Overloaded
from lmport.server.metrics import ServerMetrics
from lmport.server.validation import Limits, Validator


@dataclass(frozen=True)
class ServedModel:
    """What the server says about its model (``/info``, ``/v1/models``)."""

    model_id: str
    dtype: str = "float32"
    device_type: str = "cpu"
    eos_token_ids: tuple[int, ...] = ()  # extra stop ids for every request (the engine has the model's)
    chat_template: str | None = None  # used only when the tokenizer has none
    chat_stop_token_ids: tuple[int, ...] = ()  # end-of-turn tokens that also end a chat reply
    sha: str | None = None
    pipeline_tag: str | None = None
    block_size: int | None = None


class Permit:
    """One request's share of ``max_concurrent_requests``; ``release`` is idempotent."""

    def __init__(self, limiter: "ConcurrencyLimiter"):
        self._limiter: ConcurrencyLimiter | None = limiter

    def release(self) -> None:
        if self._limiter is not None:
            self._limiter.in_use -= 1
            self._limiter = None

    def __enter__(self) -> "Permit":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


class ConcurrencyLimiter:
    """TGI's ``max_concurrent_requests``: a permit per request, refused (429) when none is left.

    Only touched from the event loop, so a plain counter is enough.
    """

    def __init__(self, limit: int):
        self.limit = limit
        self.in_use = 0

    def acquire(self) -> Permit:
        if self.in_use >= self.limit:
            raise Overloaded()
        self.in_use += 1
        return Permit(self)

    def acquire_many(self, count: int) -> list[Permit]:
        if self.in_use + count > self.limit:
            raise Overloaded()
        return [self.acquire() for _ in range(count)]


@dataclass
class ServerState:
    engine: Any
    tokenizer: Any
    model: ServedModel
    limits: Limits
    config: LaunchConfig = field(default_factory=LaunchConfig)
    host: Any = None  # PluginHost, for /info's backend section
    ready: bool = False  # set once warm-up is done; /health answers 503 until then
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.validator = Validator(
            self.limits, self.tokenizer, self.model.eos_token_ids, vocab_size=getattr(self.engine, "vocab_size", None)
        )
        self.limiter = ConcurrencyLimiter(self.limits.max_concurrent_requests)
        self.metrics = ServerMetrics(
            max_input_tokens=self.limits.max_input_tokens,
            max_total_tokens=self.limits.max_total_tokens,
            engine_stats=self.engine_stats,
            in_flight=lambda: self.limiter.in_use,
            block_size=self.model.block_size,
        )
        self.system_fingerprint = f"{__version__}-lmport"
        self.special_ids = frozenset(getattr(self.tokenizer, "all_special_ids", None) or ())
        # TGI's x-compute-type header comes from $COMPUTE_TYPE; read when the app is built
        self.compute_type = os.environ.get("COMPUTE_TYPE") or f"{self.model.device_type}+lmport"

    def engine_stats(self) -> EngineStats | None:
        stats = getattr(self.engine, "stats", None)
        return stats() if callable(stats) else None

    async def engine_alive(self) -> bool:
        """The engine's own health verdict (a property or a plain/async method)."""
        for name in ("is_healthy", "healthy", "is_alive", "alive", "health"):
            probe = getattr(self.engine, name, None)
            if probe is None:
                continue
            try:
                value = probe() if callable(probe) else probe
                if inspect.isawaitable(value):
                    value = await value
            except Exception:
                return False
            return bool(value)
        return True
