"""Helpers for whole-model executors (``lmport_model_executor``): compiled shapes, slots, sampling.

A whole-model executor (Neuron's compiled models, optimum-habana's Gaudi models, a
TensorRT-like engine) receives each step as a :class:`lmport.plan.StepPlan` (plain data;
``takes_plan = True``) and returns an :class:`lmport.executor.ExecutorOutput` of sampled
tokens. The core still schedules, tokenizes, stops and serves. What such executors share:

- :class:`CompiledShape`: the batch size and sequence length a model was compiled for. An
  executor that exposes ``compiled_shape`` gets it checked against ``--max-batch-size`` and
  ``--max-total-tokens`` at start (:func:`check_compiled_shape`, a clear error), the engine's
  batch capped at it and a KV bookkeeping of exactly ``batch_size`` full sequences.
- :class:`SlotTable`: one slot per compiled batch row (TGI's Neuron backend): a new sequence
  takes the lowest free slot at its prefill, a finished or preempted one gives it back.
- :class:`SequenceStates`: what the plan's ``new`` delta announces per sequence (sampling
  parameters, prompt, seed) and the tokens sampled since, kept until ``released_seq_ids``.
- :func:`sample_rows`: the core's sampler over the logits a library returned.

Nothing here imports :mod:`lmport.engine` at import time (the sampler is imported when used).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CompiledShape:
    """What a whole model was compiled for: sequences per batch, tokens per sequence."""

    batch_size: int
    sequence_length: int

    def kv_blocks(self, block_size: int) -> int:
        """Blocks for ``batch_size`` sequences of ``sequence_length`` tokens (the engine's bookkeeping)."""
        return self.batch_size * -(-self.sequence_length // block_size)


class CompiledShapeError(ValueError):
    """A setting asks for more than the compiled model runs."""


def check_compiled_shape(config: Any, shape: CompiledShape, backend: str) -> None:
    """Refuse ``--max-batch-size`` / ``--max-total-tokens`` / ``--max-input-tokens`` past the compiled shape."""
    problems = []
    if config.max_batch_size and config.max_batch_size > shape.batch_size:
        problems.append(f"--max-batch-size {config.max_batch_size} > the compiled batch size {shape.batch_size}")
    if config.max_total_tokens and config.max_total_tokens > shape.sequence_length:
        problems.append(f"--max-total-tokens {config.max_total_tokens} > the compiled sequence length {shape.sequence_length}")
    if config.max_input_tokens and config.max_input_tokens >= shape.sequence_length:
        problems.append(f"--max-input-tokens {config.max_input_tokens} >= the compiled sequence length {shape.sequence_length}")
    if problems:
        raise CompiledShapeError(
            f"backend '{backend}' runs a model compiled for batch_size={shape.batch_size}, "
            f"sequence_length={shape.sequence_length}: " + "; ".join(problems)
            + ". Lower the setting, or compile (export) the model for a larger shape"
        )


class SlotTable:
    """One slot per compiled batch row; a sequence holds its slot from prefill until released."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._slot: dict[int, int] = {}
        self._free = list(range(size))

    def assign(self, seq_id: int) -> int:
        """The sequence's slot, taking the lowest free one if it has none."""
        if seq_id in self._slot:
            return self._slot[seq_id]
        if not self._free:
            raise RuntimeError(f"all {self.size} slots of the compiled batch are taken (sequences {sorted(self._slot)})")
        slot = min(self._free)
        self._free.remove(slot)
        self._slot[seq_id] = slot
        return slot

    def slot_of(self, seq_id: int) -> int:
        if seq_id not in self._slot:
            raise RuntimeError(f"sequence {seq_id} decodes without a slot (it was never prefilled)")
        return self._slot[seq_id]

    def release(self, seq_id: int) -> None:
        slot = self._slot.pop(seq_id, None)
        if slot is not None:
            self._free.append(slot)

    @property
    def used(self) -> dict[int, int]:
        return dict(self._slot)


@dataclass
class SequenceState:
    params: Any
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    generator: Any = None
    processors: tuple = ()  # the sequence's stateful logits processors (a grammar), advanced by the engine


class SequenceStates:
    """Per-sequence sampling state from the plans' ``new`` / ``finished_seq_ids`` delta."""

    def __init__(self) -> None:
        self.states: dict[int, SequenceState] = {}

    def update(self, plan: Any) -> None:
        for new in getattr(plan, "new", ()):
            self.states[new.seq_id] = SequenceState(
                new.params, list(new.prompt_token_ids), list(getattr(new, "output_token_ids", []) or []), new.seed,
                processors=tuple(getattr(new, "processors", ()) or ()),
            )
        for seq_id in getattr(plan, "finished_seq_ids", ()):
            self.states.pop(seq_id, None)

    def __getitem__(self, seq_id: int) -> SequenceState:
        return self.states[seq_id]


def sample_rows(logits: Any, seq_ids: list[int], states: SequenceStates) -> list[Any]:
    """One :class:`~lmport.executor.SampledToken` per row of ``logits`` (``[len(seq_ids), vocab]``),
    sampled by the core's sampler with each sequence's parameters and logits processors (a
    grammar's constraint included); each token is appended to its sequence's outputs (the
    penalties read them next step)."""
    from lmport.engine.sampling.sampler import Sampler
    from lmport.engine.sampling.state import SamplingRow, make_generator
    from lmport.executor import SampledToken

    rows = []
    for seq_id in seq_ids:
        state = states[seq_id]
        if state.generator is None and state.seed is not None and state.params.do_sample:
            state.generator = make_generator(state.seed, logits.device)
        rows.append(SamplingRow(state.params, state.prompt_token_ids, state.output_token_ids, state.generator,
                                state.processors))
    out = Sampler().sample(logits, rows)
    token_ids = out.token_ids.tolist()
    logprobs = out.logprobs.tolist()
    top_ids = out.top_ids.tolist() if out.top_ids is not None else None
    top_lps = out.top_logprobs.tolist() if out.top_logprobs is not None else None
    sampled = []
    for j, seq_id in enumerate(seq_ids):
        n = states[seq_id].params.top_n_tokens
        top = list(zip(map(int, top_ids[j][:n]), top_lps[j][:n])) if n and top_ids is not None else []
        sampled.append(SampledToken(int(token_ids[j]), float(logprobs[j]), top))
        states[seq_id].output_token_ids.append(int(token_ids[j]))
    return sampled
