"""What runs the model for the engine: the core's paged runner or a backend's own."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class ModelExecutor(ABC):
    """Runs one scheduled step and returns sampled tokens.

    The core's default is :class:`lmport.engine.model_runner.PagedModelRunner`; a backend
    that compiles whole models (Neuron, Gaudi) returns its own through
    ``lmport_model_executor``. The engine calls, in order: ``kv_cache_spec()``,
    ``initialize_cache(num_blocks)`` once, then ``execute(step)`` per step.
    """

    # True: also has ``launch(step, feed, previous) -> PendingStep`` (see the paged runner), so
    # the engine can schedule step N+1 while step N runs (async scheduling)
    supports_async_scheduling: bool = False
    # True: ``launch`` also takes ``before_sample`` (a callable it runs after queueing the
    # forward pass, before sampling); the engine then reads a grammar's previous tokens there
    supports_late_tokens: bool = False
    # True: reads ``seq.images`` (ImageInputs) of the sequences it runs; the engine refuses
    # requests with images otherwise (``EngineLimits.accepts_images``)
    accepts_images: bool = False

    def prepare_sequence(self, seq: Any) -> None:
        """Adjust a new :class:`~lmport.engine.sequence.Sequence` before it is queued (default: nothing).

        An encoder-decoder runner moves the prompt into ``seq.encoder_input``, makes the
        decoder's start token the sequence's prompt and sets ``cross_kv_len`` (the positions
        of its cross-attention KV group) and ``hash_seed``.
        """

    @abstractmethod
    def kv_cache_spec(self) -> Any:
        """The :class:`~lmport.layers.attention.KVCacheSpec` this executor needs per block."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int) -> None: ...

    @abstractmethod
    def execute(self, step: Any) -> Any:
        """Run one :class:`~lmport.engine.batch.ScheduledStep`; return its sampler output."""
