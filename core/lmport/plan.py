"""The step plan: one step's work as plain, picklable data.

The scheduler decides; the plan says what to run, and nothing in it is live engine state, so
it crosses a pipe or ``torch.distributed`` to tensor-parallel workers or a whole-model
executor, and every rank runs the same plan. Per step:

* ``entries``, in the order of the flat batch: per sequence its id, the positions it feeds
  (``start .. start + num_new_tokens - 1``), the token ids it feeds (:data:`PLACEHOLDER` for a
  token the device sampled in the step before and the host does not know yet: the executor
  takes it from its own previous samples), whether it samples (at its last position), its
  prompt-logprob targets, and its row of ``block_tables``;
* the delta of sequences: ``new`` (first scheduled in this step: prompt, sampling parameters,
  seed, images, encoder input; the executor keeps what it needs per sequence, e.g. seeded
  generators and the tokens it sampled), ``released_seq_ids`` (their KV blocks were freed:
  finished, aborted or preempted; what the executor holds on the device for them in the
  cache, e.g. encoded cross-attention K/V, is gone) and ``finished_seq_ids`` (a subset: they
  never come back; drop their state).

This module imports nothing from ``lmport.engine``: a backend that receives plans depends on
it alone. The engine's own ``ScheduledStep`` (with the live sequences) builds a plan with
``plan()``; :func:`as_plan` takes either.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

PLACEHOLDER = -1  # an out-of-vocabulary id: a token sampled on the device, not known on the host yet


@dataclass
class NewSequence:
    """What an executor learns about a sequence once, when it is first scheduled."""

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: Any  # lmport.engine.api.SamplingParams (a plain dataclass)
    seed: int | None = None
    images: Any = None  # ImageInputs (tensors) of an image-text model, else None
    encoder_input: Any = None  # an encoder-decoder model's encoder tokens
    cross_kv_len: int = 0
    cross_key_ranges: list[tuple[int, int]] | None = None  # per prompt position, the cross keys it attends
    # tokens generated before it was (re)announced: a preempted sequence keeps them
    output_token_ids: list[int] = field(default_factory=list)
    # its stateful logits processors (a grammar's matcher), advanced by the engine: live objects,
    # meaningful in the engine's process only; a plan sent to another process goes without them
    processors: tuple = ()


@dataclass
class PlanEntry:
    """One sequence's share of a step (see the module docstring)."""

    seq_id: int
    request_id: str
    start: int
    num_new_tokens: int
    sample: bool
    token_ids: list[int]
    is_prefill: bool
    num_prompt_tokens: int
    prompt_logprobs: bool = False
    prompt_targets: list[int] = field(default_factory=list)  # the prompt token each prompt row predicts
    block_table_len: int = 0  # blocks of its row of ``StepPlan.block_tables`` that are its own
    cross_block_table: list[int] = field(default_factory=list)
    # speculative decoding: the last ``num_draft_tokens`` of ``token_ids`` are draft tokens (counted
    # in ``num_new_tokens``) the step verifies: it computes logits at the last known token and at
    # each draft, and returns the kept run (``ExecutorOutput.runs``)
    num_draft_tokens: int = 0

    @property
    def positions(self) -> range:
        return range(self.start, self.start + self.num_new_tokens)

    @property
    def sample_position(self) -> int | None:
        """The position whose next token this entry samples (None: it samples nothing)."""
        return self.start + self.num_new_tokens - 1 if self.sample else None

    def prompt_rows(self) -> range:
        """Positions in this chunk whose next token is a prompt token (prompt logprob rows)."""
        if not self.prompt_logprobs:
            return range(0)
        end = min(self.start + self.num_new_tokens, self.num_prompt_tokens - 1)
        return range(self.start, max(self.start, end))


@dataclass
class StepPlan:
    """One step's work: ``entries`` in flat-batch order, ``block_tables`` (``int32
    [len(entries), width]``, row ``i`` entry ``i``'s block table padded with 0) and the delta."""

    entries: list[PlanEntry]
    block_tables: np.ndarray
    new: list[NewSequence] = field(default_factory=list)
    released_seq_ids: list[int] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(e.num_new_tokens for e in self.entries)

    @property
    def is_empty(self) -> bool:
        return not self.entries

    def block_table(self, i: int) -> np.ndarray:
        """Entry ``i``'s block table (its own blocks only)."""
        return self.block_tables[i, : self.entries[i].block_table_len]


def as_plan(step: Any) -> StepPlan:
    """``step`` as a :class:`StepPlan` (the engine's ``ScheduledStep`` builds one with ``plan()``)."""
    return step if isinstance(step, StepPlan) else step.plan()
