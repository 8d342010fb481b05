"""Decode steps captured as CUDA graphs, one per batch-size bucket (TGI's ``--cuda-graphs``).

A graph replays fixed kernels on fixed addresses, so every input of a decode step lives in a
static buffer sized for the largest bucket (:class:`StaticDecodeBatch`). A step of ``n``
sequences is padded to the next captured size ``b``: padding rows write no K/V (slot -1),
have one key (seq_len 1) in a block that always exists, and their outputs are dropped. Rows
never mix in a decoder (attention is per sequence, everything else per token), so padding
cannot leak into real rows.
"""

from __future__ import annotations

import bisect
import logging
from typing import Any, Iterable

import torch

from lmport.capabilities import Capabilities
from lmport.config import LaunchConfig
from lmport.graphs import DecodeGraphRunner, StaticDecodeMetadata
from lmport.layers.attention import Attention, AttentionMetadata, KVCache
from lmport.models.base import CausalLM

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
FALLBACK_MAX_SEQ_LEN = 4096  # when neither the config nor the model says how long a sequence gets
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")  # their frequencies follow the host's seq lens


def graph_batch_sizes(config: LaunchConfig, capabilities: Capabilities | None = None) -> list[int]:
    """``--cuda-graphs`` semantics: None -> the default buckets, () -> none; capped by the max batch."""
    sizes = DEFAULT_BATCH_SIZES if config.cuda_graphs is None else config.cuda_graphs
    cap = config.max_batch_size or (capabilities.max_batch_size if capabilities else None)
    sizes = sorted({int(s) for s in sizes if int(s) > 0})
    if cap:
        sizes = [s for s in sizes if s <= cap] or ([cap] if sizes else [])
    return sizes


class StaticDecodeBatch:
    """The fixed-address inputs of a decode step: token ids and positions here, the attention
    metadata in the core's :class:`~lmport.graphs.StaticDecodeMetadata` (its layout,
    KV groups and backends' per-step state are the core's and the backends' business)."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, device: torch.device, model: CausalLM | None = None):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.input_ids = torch.zeros(max_batch, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=device)
        layers = attention_layers(model) if model is not None else []
        num_groups = 1 + max((group for group, _ in layers), default=0)
        self.attention = StaticDecodeMetadata(max_batch, max_blocks, block_size, device, num_groups, layers)

    @property
    def max_seq_len(self) -> int:
        return self.attention.max_seq_len

    def metadata(self, batch: int) -> AttentionMetadata:
        """The metadata a graph of ``batch`` rows is captured with (views of the static buffers)."""
        return self.attention.view(batch)

    def load(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata, batch: int) -> None:
        """Copy a step of ``n <= batch`` sequences in (device to device, no sync) and pad it to ``batch``."""
        n = metadata.num_seqs
        self.input_ids[:n].copy_(input_ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        # padding rows keep stale input ids/positions: valid values, outputs dropped
        self.attention.load(metadata, batch)


def attention_layers(model: CausalLM) -> list[tuple[int, object]]:
    """``[(kv_group, backend)]`` of the model's attention layers."""
    return [(m.kv_group, m.backend) for m in model.modules() if isinstance(m, Attention)]


class CudaGraphRunner(DecodeGraphRunner):
    """Captures ``model`` decode steps per bucket at warm-up; replays the smallest bucket that fits.

    ``use_graphs=False`` runs the padded static batch eagerly instead of replaying (the same
    code path minus the capture): a debugging aid, and how CPU-only tests check the padding.
    """

    def __init__(
        self,
        model: CausalLM,
        max_seq_len: int,
        batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES,
        *,
        length_limit: int | None = None,
        use_graphs: bool = True,
    ):
        self.model = model
        self.max_seq_len = max_seq_len
        self.default_batch_sizes = sorted(batch_sizes)
        self.length_limit = length_limit  # beyond it the model's math depends on host values
        self.use_graphs = use_graphs
        self.batch: StaticDecodeBatch | None = None
        self.sizes: list[int] = []
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._metadata: dict[int, AttentionMetadata] = {}
        self._kv_caches: list[KVCache] | None = None

    # ------------------------------------------------------------------ warm-up

    @torch.inference_mode()
    def capture(self, kv_caches: list[KVCache], batch_sizes: list[int] | None = None) -> None:
        sizes = sorted({int(s) for s in (batch_sizes or self.default_batch_sizes) if int(s) > 0})
        if not sizes:
            return
        key_cache = kv_caches[0][0]
        num_blocks, block_size = key_cache.shape[:2]
        max_seq_len = min(self.max_seq_len, self.length_limit or self.max_seq_len)
        max_blocks = min(-(-max_seq_len // block_size), num_blocks)
        self.batch = StaticDecodeBatch(sizes[-1], max_blocks, block_size, key_cache.device, self.model)
        self._kv_caches = kv_caches
        pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        for size in reversed(sizes):  # largest first: the smaller graphs reuse its memory pool
            try:
                self._capture_one(size, kv_caches, pool)
            except Exception as exc:  # e.g. a host sync inside the model: run that size eagerly
                log.warning("decode graph for batch %d not captured (%s: %s); those steps run eagerly", size, type(exc).__name__, exc)
                self._metadata.pop(size, None)
                if self.use_graphs:
                    break  # a failed capture can poison the stream: capture nothing more
        self.sizes = sorted(self._metadata)
        log.info("decode graphs captured for batch sizes %s (max %d tokens per sequence)", self.sizes, self.batch.max_seq_len)

    def _capture_one(self, size: int, kv_caches: list[KVCache], pool: Any) -> None:
        batch = self.batch
        metadata = batch.metadata(size)
        ids, positions = batch.input_ids[:size], batch.positions[:size]
        self._metadata[size] = metadata
        if not self.use_graphs:
            return
        device = ids.device
        # Eager runs first compile the Triton kernels and create lazily made tensors (rotary
        # tables, ALiBi slopes) outside the capture; padding rows write nothing to the cache.
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.model(ids, positions, kv_caches, metadata)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = self.model(ids, positions, kv_caches, metadata)
        self.graphs[size] = graph
        self.outputs[size] = out

    # ------------------------------------------------------------------ per step

    def can_run(self, metadata: AttentionMetadata) -> bool:
        batch = self.batch
        return (
            batch is not None
            and bool(self.sizes)
            and metadata.max_query_len == 1
            and metadata.num_tokens == metadata.num_seqs
            and metadata.num_seqs <= self.sizes[-1]
            and batch.attention.fits(metadata)
        )

    @torch.inference_mode()
    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        if kv_caches is not self._kv_caches and kv_caches[0][0].data_ptr() != self._kv_caches[0][0].data_ptr():
            return self.model(input_ids, positions, kv_caches, metadata)  # not the cache we captured on
        n = metadata.num_seqs
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.batch.load(input_ids, positions, metadata, size)
        if self.use_graphs:
            self.graphs[size].replay()
            out = self.outputs[size]
        else:
            out = self.model(self.batch.input_ids[:size], self.batch.positions[:size], kv_caches, self._metadata[size])
        # a copy: the static output is overwritten by the next replay
        return out[:n].clone()


def _reference_layers(model: CausalLM) -> list[int]:
    """Layers whose attention is the core's reference path (it reads host lists: not capturable)."""
    return [
        m.layer_index for m in model.modules() if isinstance(m, Attention) and getattr(m.backend, "is_reference", False)
    ]


def _rope_length_limit(model: CausalLM) -> int | None:
    """Past this length some rotary embedding picks frequencies from host values; graphs stop there."""
    limits = [
        int(m.original_max_positions)
        for m in model.modules()
        if getattr(m, "rope_type", None) in LENGTH_DEPENDENT_ROPE and hasattr(m, "original_max_positions")
    ]
    return min(limits) if limits else None


def model_max_seq_len(model: CausalLM, config: LaunchConfig) -> int:
    if config.max_total_tokens:
        return int(config.max_total_tokens)
    hf_config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(hf_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return FALLBACK_MAX_SEQ_LEN


def make_graph_runner(model: CausalLM, config: LaunchConfig, capabilities: Capabilities | None = None) -> CudaGraphRunner | None:
    """The decode graph runner for ``model``, or ``None`` where graphs cannot be right."""
    sizes = graph_batch_sizes(config, capabilities)
    if not sizes:
        return None
    reference = _reference_layers(model)
    if reference:
        log.warning("no decode graphs: layers %s run the reference attention, which reads host values", reference)
        return None
    return CudaGraphRunner(model, model_max_seq_len(model, config), sizes, length_limit=_rope_length_limit(model))
