"""What every route needs: the engine, the tokenizer, the limits, metrics and health.

The limits are the engine's (:class:`~lmport.engine.limits.EngineLimits`, built once by
``resolve_limits``), and so is admission: ``max_concurrent_requests`` is counted by the
engine's ``submit`` alone.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from lmport import __version__
from lmport.config import LaunchConfig
from lmport.engine.api import EngineClient, EngineStats
from lmport.engine.constraints import ProcessorContext, prepare as prepare_constraints
from lmport.engine.limits import EngineLimits
from lmport.server.images import ImagePolicy
from lmport.server.metrics import ServerMetrics
from lmport.server.tokenize_pool import TokenizePool
from lmport.server.validation import Validator

T = TypeVar("T")


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
    modality: str = "text"  # "image-text" for a model that reads images with its prompt (/info, /v1/models)


@dataclass
class ServerState:
    engine: EngineClient
    tokenizer: Any  # the HTTP layer's transformers tokenizer
    model: ServedModel
    config: LaunchConfig = field(default_factory=LaunchConfig)
    host: Any = None  # PluginHost, for /info's backend section
    image_prompts: Any = None  # lmport.models.image_prompts.ImagePrompts for a model that takes images
    image_policy: ImagePolicy = field(default_factory=ImagePolicy)
    ready: bool = False  # set once warm-up is done; /health answers 503 until then
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.validator = Validator(
            self.limits, self.tokenizer, self.model.eos_token_ids, vocab_size=self.engine.vocab_size, host=self.host
        )
        self.tokenize_pool = TokenizePool(self.config.validation_workers)
        if not self.limits.disable_grammar_support:  # the grammar checks' vocabulary, built in the background
            prepare_constraints(ProcessorContext(self.tokenizer))
        self.metrics = ServerMetrics(
            max_input_tokens=self.limits.max_input_tokens,
            max_total_tokens=self.limits.max_total_tokens,
            engine_stats=self.engine_stats,
            in_flight=lambda: self.engine.num_open,
            block_size=self.model.block_size,
        )
        self.system_fingerprint = f"{__version__}-lmport"
        self.special_ids = frozenset(self.tokenizer.all_special_ids or ())
        # TGI's x-compute-type header comes from $COMPUTE_TYPE; read when the app is built
        self.compute_type = os.environ.get("COMPUTE_TYPE") or f"{self.model.device_type}+lmport"

    async def off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run tokenizing or template work on the tokenize pool (:mod:`lmport.server.tokenize_pool`)."""
        return await self.tokenize_pool.run(fn, *args, **kwargs)

    @property
    def limits(self) -> EngineLimits:
        return self.engine.limits

    def engine_stats(self) -> EngineStats | None:
        return self.engine.stats()

    def engine_alive(self) -> bool:
        """The engine's own health verdict."""
        return bool(self.engine.is_healthy)
