"""The CUDA backend's attention: Triton paged kernels, or flash-attn where its paged path fits.

Both read the core's KV layout ``[num_blocks, block_size, num_kv_heads, head_dim]`` per K and V
and the flat batch of :class:`~lmport.layers.attention.AttentionMetadata`. They read only
device tensors and host ints that are fixed for a captured decode step (``max_query_len``,
``block_size``), never ``.item()`` or the host lists, so decode can be captured in a CUDA graph.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

from lmport.capabilities import Capabilities
from lmport.layers.attention import AttentionBackend, AttentionMetadata, AttentionSpec, KVCache

log = logging.getLogger(__name__)

MAX_HEAD_DIM = 256
DTYPES = ("float32", "float16", "bfloat16")
FLASH_ATTN_PAGE_MULTIPLE = 256  # flash-attn's block_table path needs pages of a multiple of 256


class TritonPagedAttention(AttentionBackend):
    """KV write kernel + one unified paged attention kernel for prefill, chunks and decode.

    Also cross-attention (the same kernel, not causal, over the cross group's tables), with
    per-token key ranges (Idefics), and a position bias table (T5). It prepares nothing per
    step: the kernel reads the core's metadata.
    """

    name = "triton-paged"

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        self._alibi: torch.Tensor | None = None

    @classmethod
    def supports(cls, spec: AttentionSpec) -> bool:
        return spec.kind in ("self", "cross")

    def write_kv(self, key, value, kv_cache, slot_mapping) -> None:
        from lmport_cuda.kernels.kv_cache_write import write_kv_cache

        write_kv_cache(key, value, kv_cache[0], kv_cache[1], slot_mapping)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None,
        value: torch.Tensor | None,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
        position_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        from lmport_cuda.kernels.paged_attention import unified_attention

        key_cache, value_cache = kv_cache
        if key is not None:  # a cross layer's K/V were written at the encoder step
            self.write_kv(key, value, kv_cache, metadata.slot_mapping)
        spec = self.spec
        out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        return unified_attention(
            out,
            query,
            key_cache,
            value_cache,
            metadata.block_tables,
            metadata.seq_lens,
            metadata.query_start_loc,
            max_query_len=metadata.max_query_len,
            scale=spec.scale,
            causal=spec.causal and spec.kind != "cross",
            sliding_window=spec.sliding_window,
            alibi_slopes=self.alibi_slopes(query.device),
            soft_cap=spec.logits_soft_cap,
            position_bias=position_bias,
            key_ranges=metadata.key_ranges if spec.key_ranges else None,
        )

    def alibi_slopes(self, device: torch.device) -> torch.Tensor | None:
        """The slopes as a device tensor, made once: the first (eager) step runs before capture."""
        if not self.spec.alibi_slopes:
            return None
        if self._alibi is None or self._alibi.device != device:
            self._alibi = torch.tensor(self.spec.alibi_slopes, dtype=torch.float32, device=device)
        return self._alibi


class FlashAttnPagedAttention(TritonPagedAttention):
    """flash-attn's varlen kernel over the paged cache (``block_table``) for 256-multiple pages.

    Other block sizes, float32 (which flash-attn does not run), cross-attention and position
    bias take the Triton path. Its per-step state is ``cu_seqlens_k``, built once per step
    (``prepare_metadata``) for every layer, and kept in a static buffer for decode graphs.
    """

    name = "flash-attn"
    metadata_key = "flash-attn"

    def __init__(self, spec: AttentionSpec):
        super().__init__(spec)
        from flash_attn import flash_attn_varlen_func

        self._varlen = flash_attn_varlen_func
        self._static_cu_seqlens_k: torch.Tensor | None = None

    def prepare_metadata(self, metadata: AttentionMetadata) -> torch.Tensor:
        return torch.nn.functional.pad(torch.cumsum(metadata.seq_lens, 0, dtype=torch.int32), (1, 0))

    def init_capture_graph(self, max_batch: int, max_blocks: int, device: torch.device) -> None:
        self._static_cu_seqlens_k = torch.zeros(max_batch + 1, dtype=torch.int32, device=device)

    def prepare_for_capture(self, metadata: AttentionMetadata) -> torch.Tensor:
        batch = metadata.seq_lens.shape[0]
        self.prepare_for_replay(metadata, batch)
        return self._static_cu_seqlens_k[: batch + 1]

    def prepare_for_replay(self, metadata: AttentionMetadata, batch: int) -> None:
        torch.cumsum(metadata.seq_lens[:batch], 0, dtype=torch.int32, out=self._static_cu_seqlens_k[1 : batch + 1])

    def forward(self, query, key, value, kv_cache, metadata, position_bias=None):
        spec = self.spec
        if (
            metadata.block_size % FLASH_ATTN_PAGE_MULTIPLE
            or query.dtype == torch.float32
            or spec.kind != "self"
            or position_bias is not None
        ):
            return super().forward(query, key, value, kv_cache, metadata, position_bias)
        from lmport_cuda.kernels.kv_cache_write import write_kv_cache

        key_cache, value_cache = kv_cache
        write_kv_cache(key, value, key_cache, value_cache, metadata.slot_mapping)
        cu_seqlens_k = metadata.prepared.get(self.metadata_key)
        if cu_seqlens_k is None:  # a caller that did not prepare the step (a kernel test)
            cu_seqlens_k = self.prepare_metadata(metadata)
        # the reference's window counts the query itself: `window` keys = `window - 1` to the left
        left = spec.sliding_window - 1 if spec.sliding_window else -1
        right = 0 if spec.causal else -1
        return self._varlen(
            query,
            key_cache,
            value_cache,
            cu_seqlens_q=metadata.query_start_loc,
            cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=metadata.max_query_len,
            max_seqlen_k=metadata.max_seq_len,
            softmax_scale=spec.scale,
            causal=spec.causal,
            window_size=(left, right),
            softcap=spec.logits_soft_cap or 0.0,
            alibi_slopes=self.alibi_slopes(query.device),
            block_table=metadata.block_tables,
        )


def flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def unsupported_reason(spec: AttentionSpec) -> str | None:
    """Why the CUDA kernels cannot run ``spec`` (the core then runs its reference), or ``None``."""
    if spec.dtype not in DTYPES:
        return f"dtype {spec.dtype}"
    if spec.head_dim > MAX_HEAD_DIM:
        return f"head_dim {spec.head_dim} > {MAX_HEAD_DIM}"
    if spec.num_heads % spec.num_kv_heads:
        return f"{spec.num_heads} query heads do not group over {spec.num_kv_heads} KV heads"
    if spec.alibi_slopes and len(spec.alibi_slopes) != spec.num_heads:
        return "ALiBi needs one slope per query head"
    return None


def cuda_attention_backend(spec: AttentionSpec, capabilities: Capabilities | None = None) -> AttentionBackend | None:
    """The attention for ``spec`` on this GPU, or ``None`` for the core's reference path."""
    if capabilities is not None and not capabilities.paged_attention:
        return None  # pre-Ampere GPUs: the reference path (the capabilities say so)
    reason = unsupported_reason(spec)
    if reason is not None:
        log.info("CUDA attention kernels do not cover %s: reference path", reason)
        return None
    if flash_attn_available():
        try:
            return FlashAttnPagedAttention(spec)
        except Exception as exc:  # installed but broken (a CUDA/torch ABI mismatch, say)
            log.warning("flash-attn does not import (%s: %s); using the Triton kernels", type(exc).__name__, exc)
    return TritonPagedAttention(spec)
