"""Constrained decoding: resolving a request's :class:`~lmport.engine.api.Constraint` into the
per-sequence processor that masks the tokens it does not allow, and compile-checking one
before it is submitted.

The processor comes from the ``lmport_logits_processors`` hook (first answer wins; the core's
llguidance backend, :mod:`lmport.engine.sampling.llguidance_backend`, answers last), so a
plugin can supply xgrammar or outlines instead. A constraint that cannot be compiled, or that
uses a feature the backend does not support, raises :class:`RequestValidationError` naming it:
the server answers 422 and the request never reaches the engine.

A processor is stateful (one per sequence) and follows :class:`LogitsProcessor`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch

from lmport.engine.api import CONSTRAINT_KINDS, Constraint
from lmport.engine.errors import RequestValidationError


@dataclass(frozen=True, eq=False)
class ProcessorContext:
    """What a processor backend needs to know about the model it constrains.

    ``tokenizer``: the model's transformers tokenizer; ``vocab_size``: the width of the model's
    logits (may exceed the tokenizer's size; ``None``: the tokenizer's); ``eos_token_ids``: the
    ids that end a sequence (a finished constraint allows only these).
    """

    tokenizer: Any
    vocab_size: int | None = None
    eos_token_ids: tuple[int, ...] = ()


@runtime_checkable
class LogitsProcessor(Protocol):
    """One sequence's stateful logits processor (a grammar matcher, say).

    - ``needs_host_tokens``: ``True`` when ``apply`` depends on the sequence's sampled tokens
      being known on the host (every grammar does): under async scheduling the engine then
      waits for a step's tokens before it launches the next step with this sequence.
    - ``advance(token_id)``: the sequence took ``token_id`` (called once per generated token,
      in order, as soon as the host knows it).
    - ``begin(processors)`` (class method): the processors of one type in a step's batch,
      called before the model's forward pass; a backend may start computing their masks on
      another thread so the work overlaps the device's. Optional work: ``apply`` must also work
      when ``begin`` was not called.
    - ``apply(logits, processors)`` (class method): ``logits`` is ``[len(processors), vocab]``
      float32, row ``i`` belonging to ``processors[i]``; returns the processed logits (``-inf``
      for a disallowed token). Must never leave a row without an allowed token.
    - ``allow_ending_with(token_ids)`` (optional): the request's own stop token ids (a chat
      template's end-of-turn, say); a processor that has it lets them end the sequence once
      its constraint is satisfied, as it lets EOS.
    """

    needs_host_tokens: bool

    def advance(self, token_id: int) -> None: ...

    @classmethod
    def begin(cls, processors: Sequence[Any]) -> None: ...

    @classmethod
    def apply(cls, logits: torch.Tensor, processors: Sequence[Any]) -> torch.Tensor: ...


ProcessorResolver = Callable[[Constraint], LogitsProcessor]


def check_kind(constraint: Constraint) -> None:
    if constraint.kind not in CONSTRAINT_KINDS:
        raise RequestValidationError(f"constraint kind {constraint.kind!r} is not one of {', '.join(CONSTRAINT_KINDS)}")


def resolve_processor(constraint: Constraint, context: ProcessorContext, host: Any = None) -> LogitsProcessor:
    """A new processor for one sequence under ``constraint``: the ``lmport_logits_processors``
    hook's answer through ``host`` (a :class:`~lmport.plugins.PluginHost`), else the core's
    llguidance backend. Raises :class:`RequestValidationError` for a constraint the backend
    cannot compile."""
    check_kind(constraint)
    processor = host.logits_processors(constraint, context) if host is not None else None
    if processor is None:
        from lmport.engine.sampling.llguidance_backend import llguidance_processor

        processor = llguidance_processor(constraint, context)
    return processor


def check_constraint(
    constraint: Constraint, tokenizer: Any, *, eos_token_ids: Sequence[int] = (), host: Any = None
) -> None:
    """Compile ``constraint`` for ``tokenizer`` and drop the result; raises
    :class:`RequestValidationError` (message naming the unsupported feature or the compile
    error) when it cannot be served. Thread-safe; the first call per tokenizer builds the
    backend's vocabulary (cached), later calls cost a compile (cached per constraint)."""
    resolve_processor(constraint, ProcessorContext(tokenizer, None, tuple(eos_token_ids)), host)


def prepare(context: ProcessorContext) -> None:
    """Start building the core backend's vocabulary for ``context`` in the background (its
    first constrained request then finds it built)."""
    from lmport.engine.sampling.llguidance_backend import prepare_vocabulary

    prepare_vocabulary(context)


def processor_resolver(context: ProcessorContext, host: Any = None) -> ProcessorResolver:
    """``constraint -> processor`` for the engine: :func:`resolve_processor` bound to a model."""
    return lambda constraint: resolve_processor(constraint, context, host)
