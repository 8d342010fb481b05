"""What runs the model for the engine, and what it returns: the types a backend implements.

The core's default executor is :class:`lmport.engine.model_runner.PagedModelRunner`; a
backend that compiles whole models (Neuron, Gaudi) returns its own through
``lmport_model_executor``. This module imports nothing from ``lmport.engine``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class SampledToken:
    token_id: int
    logprob: float
    top_tokens: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), best first


@dataclass
class PromptLogprobs:
    """Logprobs of the prompt tokens one chunk predicted: ``positions[i] + 1`` is the token's position."""

    positions: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]


@dataclass
class ExecutorOutput:
    """Per scheduled entry, in step order: the sampled token (or None) and prompt logprobs (or None).

    ``runs`` (speculative decoding; None when no entry verified drafts): per entry, the tokens a
    verify emitted (the kept drafts and the one after them; ``sampled[i]`` is the first), or None.
    """

    sampled: list[SampledToken | None]
    prompt_logprobs: list[PromptLogprobs | None]
    runs: list[list[SampledToken] | None] | None = None


class PendingStep(Protocol):
    """A launched step (async scheduling): ``result()`` waits for it.

    ``sample_row[i]`` is entry ``i``'s row in ``token_ids`` (the sampled ids left on the device
    for the next step to read; None when nothing samples).
    """

    sample_row: dict[int, int]
    token_ids: Any

    def result(self) -> ExecutorOutput: ...


class ModelExecutor(ABC):
    """Runs one scheduled step and returns sampled tokens.

    The engine calls, in order: ``kv_cache_spec()``, ``initialize_cache(num_blocks)`` once,
    then ``execute(step)`` (or ``launch``) per step.

    With ``takes_plan`` set, ``step`` is a :class:`lmport.plan.StepPlan` (plain data, see
    :mod:`lmport.plan`: the executor keeps its own per-sequence state from the plan's
    ``new``/``finished_seq_ids`` delta). Without it (the default, for executors written
    before plans), ``step`` is the engine's ``ScheduledStep``, whose entries also carry the
    live ``seq`` (read it, never change it); ``step.plan()`` gives its plan.
    """

    takes_plan: bool = False
    # True: also has ``launch(step, feed, previous) -> PendingStep``, so the engine can schedule
    # step N+1 while step N runs (async scheduling). ``feed`` pairs (entry index, row of
    # ``previous.token_ids``) for each decode token the host does not know yet; ``previous``
    # may be None: an executor that keeps its own last PendingStep reads that.
    supports_async_scheduling: bool = False
    # True: ``launch`` also takes ``before_sample`` (a callable it runs after queueing the
    # forward pass, before sampling); the engine then reads a grammar's previous tokens there
    supports_late_tokens: bool = False
    # True: reads the images of the sequences it runs; the engine refuses requests with images
    # otherwise (``EngineLimits.accepts_images``)
    accepts_images: bool = False

    # an executor with ``takes_plan`` may also have ``release(seq_ids)``: the ``finished_seq_ids``
    # of a step that never runs (nothing left to schedule) come to it at once, not with the next plan

    def prepare_sequence(self, seq: Any) -> None:
        """Adjust a new engine ``Sequence`` before it is queued (default: nothing).

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
    def execute(self, step: Any) -> ExecutorOutput:
        """Run one step (a ``StepPlan`` with ``takes_plan``, else a ``ScheduledStep``); return its output."""
