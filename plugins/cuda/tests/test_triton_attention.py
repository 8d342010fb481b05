"""The CUDA backend's Triton attention against the core's ReferenceAttention on random paged batches.

Each batch scatters its sequences over shuffled cache blocks. Every cache slot that holds no
real key is NaN, and block tables are padded with a block of NaNs, so a kernel that reads
anything it must not read fails loudly. On a CPU the kernels run in Triton's interpreter
(set up in conftest.py), so the CPU cases stay small.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import pytest
import torch

from lmport.capabilities import Capabilities
from lmport.layers.alibi import bloom_alibi_slopes
from lmport.layers.attention import AttentionMetadata, AttentionSpec
from lmport.layers.reference_attention import ReferenceAttention, write_kv_cache

HAS_CUDA = torch.cuda.is_available()
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 2e-2}
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class Case:
    seqs: tuple[tuple[int, int], ...]  # (cached tokens, new tokens) per sequence
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 64
    block_size: int = 16
    dtype: torch.dtype = torch.float32
    sliding_window: int | None = None
    alibi: bool = False
    soft_cap: float | None = None
    scale: float | None = None
    causal: bool = True
    num_splits: int | None = None  # None: the launcher's choice
    extra: dict = field(default_factory=dict, compare=False)

    def spec(self) -> AttentionSpec:
        return AttentionSpec(
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            scale=self.scale if self.scale is not None else self.head_dim**-0.5,
            dtype=DTYPE_NAMES[self.dtype],
            sliding_window=self.sliding_window,
            alibi_slopes=bloom_alibi_slopes(self.num_heads) if self.alibi else None,
            logits_soft_cap=self.soft_cap,
            causal=self.causal,
        )


@dataclass
class PagedBatch:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    metadata: AttentionMetadata


def make_batch(case: Case, device: torch.device, seed: int = 0) -> PagedBatch:
    """Random sequences with ``cached`` tokens already in shuffled blocks and ``new`` tokens to add."""
    gen = torch.Generator().manual_seed(seed)
    bs, kvh, d = case.block_size, case.num_kv_heads, case.head_dim
    needs = [-(-(c + n) // bs) for c, n in case.seqs]
    num_blocks = sum(needs) + 2
    order = torch.randperm(num_blocks, generator=gen).tolist()
    nan_block = order.pop()  # never holds a key: pads every block table
    tables = []
    for need in needs:
        tables.append(order[:need])
        order = order[need:]
    width = max(needs) + 1
    padded_tables = [t + [nan_block] * (width - len(t)) for t in tables]

    shape = (num_blocks, bs, kvh, d)
    key_cache = torch.full(shape, float("nan"))
    value_cache = torch.full(shape, float("nan"))
    starts, slots, seq_lens = [0], [], []
    flat_k, flat_v = key_cache.view(-1, kvh, d), value_cache.view(-1, kvh, d)
    for (cached, new), table in zip(case.seqs, tables):
        context_slots = torch.tensor([table[pos // bs] * bs + pos % bs for pos in range(cached)], dtype=torch.int64)
        flat_k[context_slots] = torch.randn(cached, kvh, d, generator=gen)  # the context already cached
        flat_v[context_slots] = torch.randn(cached, kvh, d, generator=gen)
        slots += [table[pos // bs] * bs + pos % bs for pos in range(cached, cached + new)]
        starts.append(starts[-1] + new)
        seq_lens.append(cached + new)
    num_tokens = starts[-1]
    query = torch.randn(num_tokens, case.num_heads, d, generator=gen)
    key = torch.randn(num_tokens, kvh, d, generator=gen)
    value = torch.randn(num_tokens, kvh, d, generator=gen)

    def to_device(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=case.dtype)

    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(padded_tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc_host=starts,
        seq_lens_host=seq_lens,
        max_query_len=max(n for _, n in case.seqs),
        max_seq_len=max(seq_lens),
        block_size=bs,
    )
    return PagedBatch(to_device(query), to_device(key), to_device(value), to_device(key_cache), to_device(value_cache), metadata)


def run_both(case: Case, device: torch.device, seed: int = 0) -> None:
    """Triton and the reference on identical copies; outputs close, caches identical."""
    from lmport_cuda.attention import TritonPagedAttention
    from lmport_cuda.kernels.kv_cache_write import write_kv_cache as triton_write
    from lmport_cuda.kernels.paged_attention import unified_attention

    batch = make_batch(case, device, seed)
    spec = case.spec()
    ref_cache = (batch.key_cache.clone(), batch.value_cache.clone())
    expected = ReferenceAttention(spec).forward(batch.query, batch.key, batch.value, ref_cache, batch.metadata)

    if case.num_splits is None:
        out = TritonPagedAttention(spec).forward(
            batch.query, batch.key, batch.value, (batch.key_cache, batch.value_cache), batch.metadata
        )
    else:  # the launcher with a forced split count
        meta = batch.metadata
        triton_write(batch.key, batch.value, batch.key_cache, batch.value_cache, meta.slot_mapping)
        backend = TritonPagedAttention(spec)
        out = unified_attention(
            torch.empty_like(batch.query), batch.query, batch.key_cache, batch.value_cache,
            meta.block_tables, meta.seq_lens, meta.query_start_loc,
            max_query_len=meta.max_query_len, scale=spec.scale, causal=spec.causal,
            sliding_window=spec.sliding_window, alibi_slopes=backend.alibi_slopes(device),
            soft_cap=spec.logits_soft_cap, num_splits=case.num_splits,
        )  # fmt: skip

    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    assert not torch.isnan(out).any(), "the kernel read a slot it must not read"
    tol = TOLERANCE[case.dtype]
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(batch.key_cache, ref_cache[0], atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(batch.value_cache, ref_cache[1], atol=0, rtol=0, equal_nan=True)


PREFILL = ((0, 7), (0, 19))
DECODE = ((9, 1), (30, 1), (16, 1))
MIXED = ((0, 13), (21, 1), (5, 6))
CHUNKED = ((37, 11), (16, 16), (3, 2))

CASES = {
    "prefill-mha": Case(PREFILL, num_heads=4, num_kv_heads=4),
    "decode-gqa": Case(DECODE, num_heads=8, num_kv_heads=2),
    "mixed-gqa": Case(MIXED),
    "chunked-context-mqa": Case(CHUNKED, num_heads=4, num_kv_heads=1),
    "group-of-3": Case(MIXED, num_heads=6, num_kv_heads=2),
    "falcon-71-heads-mqa": Case(((0, 9), (40, 1)), num_heads=71, num_kv_heads=1, dtype=torch.bfloat16),
    "block-size-4": Case(MIXED, block_size=4),
    "block-size-32-decode": Case(((40, 1), (3, 1)), block_size=32),
    "sliding-window-mixed": Case(CHUNKED, sliding_window=6),
    "sliding-window-decode": Case(((70, 1), (5, 1)), sliding_window=9),
    "alibi-mixed": Case(MIXED, num_heads=4, num_kv_heads=4, alibi=True),
    "alibi-window-decode": Case(DECODE, alibi=True, sliding_window=12),
    "soft-cap": Case(MIXED, soft_cap=5.0, scale=1.0),
    "soft-cap-decode": Case(DECODE, soft_cap=5.0, scale=1.0),
    # Gemma 2's mix: a soft cap inside a sliding window, a scale from query_pre_attn_scalar, small heads
    "gemma2-window-soft-cap": Case(CHUNKED, soft_cap=2.0, sliding_window=4, scale=24**-0.5, head_dim=16, block_size=4),
    "gemma2-window-soft-cap-decode": Case(((9, 1), (3, 1), (20, 1)), soft_cap=2.0, sliding_window=4, scale=24**-0.5, head_dim=16),
    "non-causal-prefill": Case(PREFILL, causal=False),
    "head-dim-80": Case(MIXED, head_dim=80),
    "head-dim-96": Case(DECODE, head_dim=96),
    "head-dim-128": Case(CHUNKED, head_dim=128),
    "head-dim-256": Case(MIXED, head_dim=256, num_heads=2, num_kv_heads=1),
    "bf16-mixed": Case(MIXED, dtype=torch.bfloat16),
    "bf16-decode-128": Case(DECODE, dtype=torch.bfloat16, head_dim=128, num_heads=8, num_kv_heads=2),
    "fp16-chunked": Case(CHUNKED, dtype=torch.float16),
    "split-kv-decode": Case(((150, 1), (33, 1)), num_splits=4),
    "split-kv-window-alibi": Case(((150, 1), (33, 1)), num_splits=4, sliding_window=40, alibi=True),
    "split-kv-mixed": Case(MIXED, num_splits=2),
}

# Realistic sizes: quick on a GPU, too slow for the interpreter.
GPU_CASES = {
    "llama3-8b-decode-bf16": Case(tuple((int(c), 1) for c in torch.randint(1, 3000, (64,), generator=torch.Generator().manual_seed(1))),
                                  num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16),
    "llama3-8b-prefill-bf16": Case(((0, 512), (0, 300), (700, 200), (64, 1), (2000, 1)),
                                   num_heads=32, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16),
    "llama3-1b-decode-batch1-long": Case(((8000, 1),), num_heads=32, num_kv_heads=8, head_dim=64, dtype=torch.bfloat16),
    "mistral-window-fp16": Case(((0, 900), (1500, 1), (3000, 64)), num_heads=32, num_kv_heads=8, head_dim=128,
                                dtype=torch.float16, sliding_window=512),
    "gemma2-softcap-256": Case(((0, 300), (400, 1)), num_heads=8, num_kv_heads=4, head_dim=256, dtype=torch.bfloat16,
                               soft_cap=50.0, sliding_window=128),
    "bloom-alibi-fp32": Case(((0, 200), (300, 1), (50, 30)), num_heads=16, num_kv_heads=16, head_dim=64, alibi=True),
    "falcon-mqa-block-64": Case(((0, 257), (1000, 1)), num_heads=71, num_kv_heads=1, head_dim=64, block_size=64,
                                dtype=torch.bfloat16),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name: str, device: torch.device) -> None:
    run_both(CASES[name], device)


@pytest.mark.parametrize("name", list(GPU_CASES))
def test_matches_reference_at_model_sizes(name: str, device: torch.device) -> None:
    if not HAS_CUDA:
        pytest.skip("model-sized batches run on a GPU only (the interpreter is too slow)")
    run_both(GPU_CASES[name], device)


def test_kv_cache_write_skips_padding_slots(device: torch.device) -> None:
    from lmport_cuda.kernels.kv_cache_write import write_kv_cache as triton_write

    gen = torch.Generator().manual_seed(3)
    key_cache = torch.randn(6, 4, 3, 80, generator=gen).to(device)
    value_cache = torch.randn(6, 4, 3, 80, generator=gen).to(device)
    key = torch.randn(5, 3, 80, generator=gen).to(device)
    value = torch.randn(5, 3, 80, generator=gen).to(device)
    slots = torch.tensor([7, -1, 0, 23, -1], dtype=torch.int64, device=device)
    expected = (key_cache.clone(), value_cache.clone())
    write_kv_cache(key, value, expected, slots)
    triton_write(key, value, key_cache, value_cache, slots)
    torch.testing.assert_close(key_cache, expected[0], atol=0, rtol=0)
    torch.testing.assert_close(value_cache, expected[1], atol=0, rtol=0)


def test_strided_query_from_a_fused_projection(device: torch.device) -> None:
    """Models slice q, k and v out of one qkv projection: rows are strided, not contiguous."""
    from lmport_cuda.attention import TritonPagedAttention

    case = Case(MIXED)
    batch = make_batch(case, device, seed=5)
    fused = torch.cat([batch.query.flatten(1), batch.key.flatten(1), batch.value.flatten(1)], dim=1)
    q_width, kv_width = case.num_heads * case.head_dim, case.num_kv_heads * case.head_dim
    query = fused[:, :q_width].view(-1, case.num_heads, case.head_dim)
    key = fused[:, q_width : q_width + kv_width].view(-1, case.num_kv_heads, case.head_dim)
    value = fused[:, q_width + kv_width :].view(-1, case.num_kv_heads, case.head_dim)
    assert not query.is_contiguous()
    ref_cache = (batch.key_cache.clone(), batch.value_cache.clone())
    expected = ReferenceAttention(case.spec()).forward(batch.query, batch.key, batch.value, ref_cache, batch.metadata)
    out = TritonPagedAttention(case.spec()).forward(query, key, value, (batch.key_cache, batch.value_cache), batch.metadata)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_same_grid_for_any_context_length(device: torch.device) -> None:
    """A decode graph captured once must stay right as contexts grow: only shapes pick the launch."""
    from lmport_cuda.kernels.paged_attention import choose_tile_config

    short = choose_tile_config(8, 8, 4, 128, 1, torch.bfloat16)
    assert short == choose_tile_config(8, 8, 4, 128, 1, torch.bfloat16)
    # one batch grown from short to long contexts in the same blocks: both steps match the reference
    for seqs in (((3, 1), (5, 1)), ((140, 1), (90, 1))):
        run_both(replace(CASES["decode-gqa"], seqs=seqs), device)


def test_launch_plans() -> None:
    """Decode: one launch, split when few (sequence, KV head) pairs; mixed: short ones apart."""
    pytest.importorskip("triton", reason="triton is not installed: the CUDA backend's kernels cannot be planned")
    from lmport_cuda.kernels.paged_attention import plan_launches

    one = plan_launches(1, 8, 4, 128, 1, torch.bfloat16)
    assert len(one) == 1 and one[0].config.num_splits > 1 and one[0].short_limit == 0
    full = plan_launches(256, 8, 4, 128, 1, torch.bfloat16)
    assert len(full) == 1 and full[0].config.num_splits == 1
    short, long = plan_launches(64, 8, 4, 128, 512, torch.bfloat16)
    assert (short.short_pass, long.short_pass) == (True, False)
    assert short.short_limit == long.short_limit == short.config.block_q(4) == 4
    assert short.config.block_m == 16 and long.config.block_m == 128 and short.config.num_splits == 1
    assert len(plan_launches(64, 8, 4, 128, 3, torch.bfloat16)) == 1  # every sequence fits one small tile
    forced = plan_launches(64, 8, 4, 128, 512, torch.bfloat16, num_splits=2)
    assert len(forced) == 1 and forced[0].config.num_splits == 2


def test_backend_factory_chooses_kernels_or_reference() -> None:
    from lmport_cuda.attention import TritonPagedAttention, cuda_attention_backend, flash_attn_available

    caps = Capabilities(backend="cuda", device_type="cuda", paged_attention=True)
    spec = Case(MIXED).spec()
    backend = cuda_attention_backend(spec, caps)
    assert isinstance(backend, TritonPagedAttention)
    assert backend.name == ("flash-attn" if flash_attn_available() else "triton-paged")
    assert cuda_attention_backend(replace(spec, head_dim=512), caps) is None
    assert cuda_attention_backend(replace(spec, num_heads=5), caps) is None
    assert cuda_attention_backend(replace(spec, dtype="float8_e4m3fn"), caps) is None
    old_gpu = replace(caps, paged_attention=False)  # pre-Ampere: the core's reference path
    assert cuda_attention_backend(spec, old_gpu) is None


# ---------------------------------------------------------------------- encoder-decoder features


def _nan_cache(device, dtype, block_size=16, heads=2, head_dim=32):
    """A cache factory whose unwritten slots are NaN: reading one poisons the output."""
    return lambda num_blocks: tuple(
        torch.full((num_blocks, block_size, heads, head_dim), float("nan"), dtype=dtype, device=device) for _ in range(2)
    )


@pytest.mark.parametrize("key_ranges", [False, True], ids=["whole", "key-ranges"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_attention_kernel_matches_dense_math(dtype, key_ranges, device: torch.device) -> None:
    """T5's cross-attention: K/V written once (the write kernel), the unified kernel not causal
    over the cross group's tables; decoder queries may outnumber the encoder's keys. With
    per-token key ranges (Idefics' image before each token; some empty: zeros)."""
    from lmport_cuda.attention import TritonPagedAttention
    from lmport.testing.attention_features import check_cross_attention

    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 kernels run on a GPU only (the interpreter computes in float32)")
    spec = AttentionSpec(2, 2, 32, scale=1.0, dtype=DTYPE_NAMES[dtype], causal=False, kind="cross", key_ranges=key_ranges)
    backend = TritonPagedAttention(spec)
    assert TritonPagedAttention.supports(spec)
    # with key ranges, 70 keys span several key tiles, so that a tile's rows may skip the first ones
    check_cross_attention(backend, _nan_cache(device, dtype), encoder_lens=[5, 70 if key_ranges else 17, 1],
                          decoder_lens=[1, 3, 20], block_size=16, device=device, dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_bias_kernel_matches_dense_math(dtype, device: torch.device) -> None:
    """T5's decoder self-attention: a per-(head, distance) bias table, the far distances clamped."""
    from lmport_cuda.attention import TritonPagedAttention
    from lmport.testing.attention_features import check_position_bias

    if dtype == torch.bfloat16 and device.type == "cpu":
        pytest.skip("bf16 kernels run on a GPU only (the interpreter computes in float32)")
    spec = AttentionSpec(2, 2, 32, scale=1.0, dtype=DTYPE_NAMES[dtype], position_bias_len=9)
    check_position_bias(TritonPagedAttention(spec), _nan_cache(device, dtype), cached=[0, 20, 3], new=[18, 1, 1],
                        block_size=16, device=device, dtype=dtype)  # fmt: skip
