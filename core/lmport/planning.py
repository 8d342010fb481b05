"""What the engine does with a backend's capability flags: shape buckets and the engine plan.

Pure data, importing nothing from :mod:`lmport.engine`, so a backend's own executor (Gaudi,
Neuron) pads with the same buckets the core's runner uses.

Shape buckets follow vllm-gaudi's scheme: per dimension, powers of two from ``minimum`` up to
``step``, then multiples of ``step``. A static-shape backend compiles one graph per bucket, so
an unbounded range of shapes becomes a few dozen, at the cost of padding. Three dimensions
are bucketed (vllm-gaudi's 3-D bucketing): the batch size (sequences in a step), the query
length (the step's tokens: the whole flat batch for a prefill or mixed step, one per sequence
for decode) and the block count (the width of the block tables).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class BucketRange:
    """Powers of two from ``minimum`` to ``step``, then multiples of ``step`` (vllm-gaudi's ramp)."""

    minimum: int = 1
    step: int = 32

    def __post_init__(self) -> None:
        if self.minimum < 1 or self.step < 1:
            raise ValueError(f"bucket minimum and step must be positive, got {self.minimum}, {self.step}")

    def bucket(self, value: int) -> int:
        """The smallest bucket that holds ``value``."""
        if value <= self.minimum:
            return self.minimum
        if value <= self.step:
            size = self.minimum
            while size < value:
                size *= 2
            return min(size, self.step)
        return -(-value // self.step) * self.step

    def values(self, maximum: int) -> tuple[int, ...]:
        """Every bucket up to the one that holds ``maximum`` (what a warm-up compiles)."""
        out: list[int] = []
        value = 1
        while True:
            size = self.bucket(value)
            if not out or size != out[-1]:
                out.append(size)
            if size >= maximum:
                return tuple(out)
            value = size + 1


@dataclass(frozen=True)
class PaddedShape:
    """One step's shape after padding: sequences, tokens, block-table width."""

    num_seqs: int
    num_tokens: int
    num_blocks: int


@dataclass(frozen=True)
class ShapeBuckets:
    """The three bucketed dimensions of a step (see the module doc)."""

    batch: BucketRange = BucketRange(1, 32)
    tokens: BucketRange = BucketRange(16, 256)
    blocks: BucketRange = BucketRange(1, 16)

    def pad(self, num_seqs: int, num_tokens: int, num_blocks: int, block_size: int = 0) -> PaddedShape:
        """The padded shape of a step of ``num_seqs`` sequences feeding ``num_tokens`` tokens.

        Decode (one token per sequence): the batch is padded with one-token sequences, so the
        tokens are the padded batch. Otherwise the tokens are padded to their bucket, and the
        pad tokens belong to one more (dummy) sequence, counted in the padded batch, whose
        block table (given ``block_size``) must be wide enough to hold them.
        """
        if num_tokens == num_seqs:
            seqs = self.batch.bucket(num_seqs)
            return PaddedShape(seqs, seqs, self.blocks.bucket(max(num_blocks, 1)))
        tokens = self.tokens.bucket(num_tokens)
        pad = tokens - num_tokens
        seqs = self.batch.bucket(num_seqs + (pad > 0))
        if block_size and pad:
            num_blocks = max(num_blocks, -(-pad // block_size))
        return PaddedShape(seqs, tokens, self.blocks.bucket(max(num_blocks, 1)))

    def describe(self) -> str:
        def one(name: str, r: BucketRange) -> str:
            return f"{name} {r.minimum}..{r.step} doubling, then +{r.step}"

        return "; ".join((one("batch", self.batch), one("tokens", self.tokens), one("blocks", self.blocks)))


DEFAULT_BUCKETS = ShapeBuckets()


@dataclass(frozen=True)
class EnginePlan:
    """What the engine does with one backend's flags (``plan_for(capabilities)``).

    - ``shape_buckets``: set for ``static_shapes``; the core's runner pads every step to them.
    - ``max_batch_size``: the backend's compiled batch size; ``--max-batch-size`` is capped at it.
    - ``fixed_slots``: ``not continuous_batching``; a step either prefills new sequences into
      free slots (the running ones pause) or decodes every running one, never both, and
      prompts are not chunked.
    - ``whole_model``: the backend runs the whole model (``lmport_model_executor``).
    - ``reference_kernels``: kernels the backend lacks, whose layers run the core's reference
      path (attention: with one warning per layer kind when a model has them); none for a
      whole-model backend, whose executor runs every layer.
    """

    backend: str
    shape_buckets: ShapeBuckets | None = None
    max_batch_size: int | None = None
    fixed_slots: bool = False
    whole_model: bool = False
    graph_capture: bool = False
    reference_kernels: tuple[str, ...] = ()

    def describe(self) -> list[tuple[str, str]]:
        """``(flag, what the engine does)`` rows, as ``lmport backends`` prints them."""
        rows = []
        if self.shape_buckets is not None and self.whole_model:
            rows.append(("static_shapes", "the backend's executor runs its compiled shapes (its own buckets)"))
        elif self.shape_buckets is not None:
            rows.append(("static_shapes", f"steps padded to shape buckets ({self.shape_buckets.describe()})"))
        else:
            rows.append(("static_shapes", "off: steps run at their own shapes"))
        if self.max_batch_size is not None:
            rows.append(("max_batch_size", f"--max-batch-size capped at {self.max_batch_size} (the compiled batch)"))
        if self.fixed_slots:
            rows.append((
                "continuous_batching",
                "off: fixed slots; a step prefills whole prompts into free slots while the others pause, "
                "or decodes every slot",
            ))
        else:
            rows.append(("continuous_batching", "on: prefill chunks and decodes share steps"))
        if self.whole_model:
            rows.append(("whole_model_executor", "the backend's lmport_model_executor runs the model"))
        rows.append(("graph_capture", "decode steps replay device graphs" if self.graph_capture else "off: eager decode"))
        for kernel in self.reference_kernels:
            if kernel == "flash_layer_norm":
                rows.append((kernel, "off: layer norms run the core's reference op (plain torch)"))
            else:
                rows.append((kernel, "off: such layers run the core's reference attention, one warning per layer kind"))
        return rows


_KERNEL_FLAGS = ("paged_attention", "sliding_window_attention", "alibi_attention", "flash_layer_norm")


def plan_for(capabilities: Any) -> EnginePlan:
    """The :class:`EnginePlan` for a :class:`~lmport.capabilities.Capabilities`."""
    missing: tuple[str, ...] = ()
    if capabilities.backend != "cpu" and not capabilities.whole_model_executor:  # (the CPU *is* the reference)
        missing = tuple(flag for flag in _KERNEL_FLAGS if not getattr(capabilities, flag))
    return EnginePlan(
        backend=capabilities.backend,
        shape_buckets=DEFAULT_BUCKETS if capabilities.static_shapes else None,
        max_batch_size=capabilities.max_batch_size,
        fixed_slots=not capabilities.continuous_batching,
        whole_model=capabilities.whole_model_executor,
        graph_capture=capabilities.graph_capture,
        reference_kernels=missing,
    )
