"""The Gaudi whole-model executor: an optimum-habana model in HPU graphs, at static shapes.

Loading (:func:`load_gaudi_model`): ``adapt_transformers_to_gaudi()`` swaps transformers'
model classes for optimum-habana's Gaudi ones, the checkpoint loads in bf16 (the executor's
dtype), moves to the HPU and is wrapped with ``wrap_in_hpu_graph`` (Habana's graph capture,
one graph per input shape); its ``generation_config`` is a ``GaudiGenerationConfig`` with
``static_shapes`` and the length ``bucket_size``.

Serving (:class:`GaudiExecutor`): every step the sequences that sample are run as one padded
batch: rows padded to the batch bucket (lmport.planning's ramp, at most the compiled batch),
columns left-padded to a multiple of ``bucket_size`` (optimum-habana's bucketing), with the
attention mask and positions that padding needs. So the HPU only ever sees the bucket shapes,
which :meth:`GaudiExecutor.warm_up` runs once each at start, with their time reported. Logits
come back and the core's sampler samples them on the executor's device (never a hard-coded
``"hpu"``).

What this release does not do: reuse a KV cache between steps. Each step recomputes the
sequences it samples from their tokens (optimum-habana's ``reuse_cache`` / paged cache keep
one position per batch, not per row, and are not driven yet), so it is correct and static-
shaped but its cost grows with the sequence. docs/backends.md says what has run where.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from lmport.executor import ExecutorOutput, ModelExecutor
from lmport.layers.attention import KVCacheSpec
from lmport.planning import BucketRange
from lmport.whole_model import CompiledShape, SequenceStates, check_compiled_shape, sample_rows

log = logging.getLogger(__name__)

DEFAULT_BUCKET_SIZE = 128  # optimum-habana's default length bucket
DEFAULT_BATCH_SIZE = 16
DEFAULT_SEQUENCE_LENGTH = 2048
PAD_TOKEN = 0


def hpu_device() -> torch.device:
    """The HPU when Habana's bridge says one is there, else the CPU (a test stand-in)."""
    import habana_frameworks.torch.hpu as hthpu

    return torch.device("hpu") if hthpu.is_available() else torch.device("cpu")


def load_gaudi_model(path: str, dtype: torch.dtype, device: torch.device, bucket_size: int) -> Any:
    """optimum-habana's Gaudi model class for ``path``, on ``device``, wrapped in HPU graphs."""
    from habana_frameworks.torch.hpu import wrap_in_hpu_graph
    from optimum.habana.transformers.generation import GaudiGenerationConfig
    from optimum.habana.transformers.modeling_utils import adapt_transformers_to_gaudi
    from transformers import AutoModelForCausalLM

    adapt_transformers_to_gaudi()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval().to(device)
    model.generation_config = GaudiGenerationConfig(static_shapes=True, bucket_size=bucket_size, use_cache=False,
                                                    reuse_cache=False)
    return wrap_in_hpu_graph(model)


class GaudiExecutor(ModelExecutor):
    """Runs an optimum-habana causal LM for the engine at bucketed static shapes (see the module doc)."""

    takes_plan = True

    def __init__(self, model: Any, config: Any, device: torch.device, max_positions: int | None = None,
                 bucket_size: int = DEFAULT_BUCKET_SIZE, block_size: int = 128) -> None:
        import habana_frameworks.torch.core as htcore

        self.model = model
        self.device = device
        self.mark_step = htcore.mark_step  # the lazy-mode graph boundary after each step
        length = config.max_total_tokens or min(DEFAULT_SEQUENCE_LENGTH, max_positions or DEFAULT_SEQUENCE_LENGTH)
        self.compiled_shape = CompiledShape(config.max_batch_size or DEFAULT_BATCH_SIZE, length)
        check_compiled_shape(config, self.compiled_shape, "gaudi")
        self.bucket_size = bucket_size
        self.batch_buckets = BucketRange(1, 32)
        self.block_size = block_size
        self.states = SequenceStates()
        self.warmup: dict[str, Any] = {}

    # ------------------------------------------------------------------ shapes

    def length_bucket(self, length: int) -> int:
        return min(-(-length // self.bucket_size) * self.bucket_size, self._max_length())

    def batch_bucket(self, rows: int) -> int:
        return min(self.batch_buckets.bucket(rows), self.compiled_shape.batch_size)

    def _max_length(self) -> int:
        return -(-self.compiled_shape.sequence_length // self.bucket_size) * self.bucket_size

    def shapes(self) -> list[tuple[int, int]]:
        """Every (batch, length) bucket a step can take: what the warm-up runs."""
        batches = sorted({self.batch_bucket(b) for b in self.batch_buckets.values(self.compiled_shape.batch_size)})
        lengths = range(self.bucket_size, self._max_length() + 1, self.bucket_size)
        return [(b, n) for b in batches for n in lengths]

    # ------------------------------------------------------------------ setup

    def kv_cache_spec(self) -> KVCacheSpec:
        """The engine's bookkeeping only: no KV cache is kept between steps."""
        return KVCacheSpec(0, 1, 1, self.block_size, torch.float32)

    def initialize_cache(self, num_blocks: int) -> None:
        self.warm_up()

    def warm_up(self) -> dict[str, Any]:
        """Run every shape bucket once (HPU graphs are captured then, not under traffic); report the time."""
        started = time.monotonic()
        shapes = self.shapes()
        for rows, length in shapes:
            ids = torch.full((rows, length), PAD_TOKEN, dtype=torch.int64, device=self.device)
            self._forward(ids, torch.ones_like(ids))
        seconds = time.monotonic() - started
        self.warmup = {"shapes": shapes, "seconds": seconds}
        log.info("gaudi: warmed up %d shape buckets (batch x length, length bucket %d) in %.2f s",
                 len(shapes), self.bucket_size, seconds)
        return self.warmup

    # ------------------------------------------------------------------ one step

    @torch.inference_mode()
    def execute(self, plan: Any) -> ExecutorOutput:
        self.states.update(plan)
        entries = plan.entries
        sampled: list = [None] * len(entries)
        rows = [i for i, e in enumerate(entries) if e.sample]
        if rows:
            histories = []
            for i in rows:
                e = entries[i]
                state = self.states[e.seq_id]
                tokens = (state.prompt_token_ids + state.output_token_ids)[: e.start + e.num_new_tokens]
                if len(tokens) != e.start + e.num_new_tokens or tokens[e.start:] != list(e.token_ids):
                    raise RuntimeError(f"gaudi: sequence {e.seq_id}'s tokens do not match the plan")
                histories.append(tokens)
            logits = self._run(histories)
            for i, token in zip(rows, sample_rows(logits, [entries[i].seq_id for i in rows], self.states)):
                sampled[i] = token
        return ExecutorOutput(sampled=sampled, prompt_logprobs=[None] * len(entries))

    def _run(self, histories: list[list[int]]) -> torch.Tensor:
        """The last token's logits of each history, run as one left-padded bucket-shaped batch."""
        longest = max(len(h) for h in histories)
        if longest > self.compiled_shape.sequence_length or len(histories) > self.compiled_shape.batch_size:
            raise RuntimeError(f"gaudi: a step of {len(histories)} sequences of up to {longest} tokens is past "
                               f"the warmed-up shapes {self.compiled_shape}")
        rows, length = self.batch_bucket(len(histories)), self.length_bucket(longest)
        ids = torch.full((rows, length), PAD_TOKEN, dtype=torch.int64)
        mask = torch.zeros((rows, length), dtype=torch.int64)
        mask[len(histories):, -1] = 1  # pad rows: one token each, so no row is all padding
        for r, tokens in enumerate(histories):
            ids[r, length - len(tokens):] = torch.tensor(tokens, dtype=torch.int64)
            mask[r, length - len(tokens):] = 1
        logits = self._forward(ids.to(self.device), mask.to(self.device))
        return logits[: len(histories)].float()

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False)
        self.mark_step()
        return out.logits[:, -1]
