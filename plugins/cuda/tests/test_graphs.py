"""Decode graphs: a padded, replayed step equals the eager step on a real (tiny) Llama.

On a GPU the runner captures real CUDA graphs. On a CPU the same runner replays the padded
static batch eagerly (``use_graphs=False``) with the Triton attention in the interpreter, which
checks everything but the capture itself: bucketing, padding rows, static buffers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.hookspecs import hookimpl
from lmport.models.base import CausalLM
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.plugins import PluginHost
from lmport.testing.model_driver import build_metadata
from lmport.testing.tiny_models import make_checkpoint

BLOCK_SIZE = 4


class TritonAttentionPlugin:
    """Gives every layer the CUDA backend's Triton attention (what the cuda plugin's hook returns)."""

    @hookimpl
    def lmport_attention_backend(self, spec):
        from lmport_cuda.attention import TritonPagedAttention

        return TritonPagedAttention(spec)


def make_host(triton_attention: bool) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    if triton_attention:
        host.register(TritonAttentionPlugin(), "triton-attention")
    host.select_backend()
    return host


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    make_checkpoint("llama", path)
    return path


def load_llama(path: Path, device: torch.device, triton_attention: bool = True, dtype=torch.float32) -> CausalLM:
    model = build_native_model(resolve_model_info(path), make_host(triton_attention), dtype=dtype, device=device)
    assert model is not None
    return model


def empty_caches(model: CausalLM, num_blocks: int, device: torch.device, dtype=torch.float32):
    layers, kv_heads, head_dim = model.kv_cache_shape()
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    return [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)) for _ in range(layers)]


def test_batch_sizes_follow_cuda_graphs_flag() -> None:
    from lmport_cuda.graphs import DEFAULT_BATCH_SIZES, graph_batch_sizes

    assert graph_batch_sizes(LaunchConfig()) == list(DEFAULT_BATCH_SIZES)
    assert graph_batch_sizes(LaunchConfig(max_batch_size=48)) == [1, 2, 4, 8, 16, 32]
    assert graph_batch_sizes(LaunchConfig(cuda_graphs=())) == []
    assert graph_batch_sizes(LaunchConfig(cuda_graphs=(8, 1, 2))) == [1, 2, 8]
    assert graph_batch_sizes(LaunchConfig(cuda_graphs=(64, 128), max_batch_size=32)) == [32]


def test_no_graphs_over_reference_attention(llama_checkpoint: Path) -> None:
    from lmport_cuda.graphs import make_graph_runner

    model = load_llama(llama_checkpoint, torch.device("cpu"), triton_attention=False)
    assert make_graph_runner(model, LaunchConfig(), None) is None


@torch.inference_mode()
def test_padded_decode_steps_equal_eager(llama_checkpoint: Path, device: torch.device) -> None:
    """Prefill four prompts, then decode 4, 3, 4, 3, 1 of them with the runner (buckets 4 and 1)
    and eagerly side by side. A 3-row step after a 4-row one has a stale fourth row to pad."""
    from lmport_cuda.graphs import CudaGraphRunner, make_graph_runner

    model = load_llama(llama_checkpoint, device)
    assert isinstance(make_graph_runner(model, LaunchConfig(), None), CudaGraphRunner)
    prompts = [[5, 9, 30, 7, 11], [3, 4, 5, 6, 7, 8, 9, 10, 12], [100, 200, 300], [42, 43]]
    schedule = [4, 3, 4, 3, 1]
    blocks_per_seq = -(-(max(map(len, prompts)) + len(schedule)) // BLOCK_SIZE)
    tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    num_blocks = 1 + len(prompts) * blocks_per_seq
    graph_caches = empty_caches(model, num_blocks, device)
    eager_caches = empty_caches(model, num_blocks, device)

    meta, positions = build_metadata([0] * 4, list(map(len, prompts)), tables, BLOCK_SIZE, device)
    ids = torch.tensor([t for p in prompts for t in p], device=device)
    hidden = model(ids, positions, eager_caches, meta)
    model(ids, positions, graph_caches, meta)
    last_rows = torch.tensor(meta.query_start_loc_host[1:], device=device) - 1
    last_token = model.compute_logits(hidden[last_rows]).argmax(-1)

    runner = CudaGraphRunner(model, max_seq_len=64, batch_sizes=[1, 4], use_graphs=device.type == "cuda")
    runner.capture(graph_caches, [1, 4])
    assert runner.sizes == [1, 4]
    lengths = list(map(len, prompts))
    for active in schedule:
        meta, positions = build_metadata(lengths[:active], [1] * active, tables[:active], BLOCK_SIZE, device)
        assert runner.can_run(meta)
        replayed = runner.run(last_token[:active], positions, graph_caches, meta)
        eager = model(last_token[:active], positions, eager_caches, meta)
        assert replayed.shape == eager.shape
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5)
        last_token[:active] = model.compute_logits(eager).argmax(-1)
        lengths[:active] = [n + 1 for n in lengths[:active]]
    for (gk, gv), (ek, ev) in zip(graph_caches, eager_caches):  # padding rows wrote nothing
        torch.testing.assert_close(gk, ek, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(gv, ev, atol=1e-5, rtol=1e-5)

    # what the runner must leave to the eager path
    prefill, _ = build_metadata([0], [2], tables[:1], BLOCK_SIZE, device)
    assert not runner.can_run(prefill)
    too_many, _ = build_metadata([1] * 5, [1] * 5, [tables[0]] * 5, BLOCK_SIZE, device)
    assert not runner.can_run(too_many)
    too_long, _ = build_metadata([64], [1], [list(range(17))], BLOCK_SIZE, device)
    assert not runner.can_run(too_long)


@torch.inference_mode()
def test_cuda_graph_replay_equals_eager_bf16(llama_checkpoint: Path, cuda_device: torch.device) -> None:
    """Real graphs in bf16, through the cuda plugin's hook, over 20 steps of changing batch sizes.

    Replay must be bit-identical to running the same padded batch eagerly (same kernels, same
    shapes), and close to the unpadded eager step (other GEMM shapes round differently). All
    three paths are fed the same tokens, so a difference cannot compound.
    """
    from lmport_cuda.graphs import CudaGraphRunner
    from lmport_cuda.plugin import lmport_graph_runner

    model = load_llama(llama_checkpoint, cuda_device, dtype=torch.bfloat16)
    graphs = lmport_graph_runner(model=model, config=LaunchConfig(max_total_tokens=256), capabilities=None)
    assert isinstance(graphs, CudaGraphRunner)
    padded = CudaGraphRunner(model, max_seq_len=256, use_graphs=False)
    prompts = [[(7 * i + j) % 300 + 3 for j in range(4 + 3 * i)] for i in range(6)]
    steps = 20
    blocks_per_seq = -(-(max(map(len, prompts)) + steps) // BLOCK_SIZE)
    tables = [list(range(1 + i * blocks_per_seq, 1 + (i + 1) * blocks_per_seq)) for i in range(len(prompts))]
    num_blocks = 1 + len(prompts) * blocks_per_seq
    caches = {mode: empty_caches(model, num_blocks, cuda_device, torch.bfloat16) for mode in ("graph", "padded", "eager")}
    graphs.capture(caches["graph"], [1, 2, 4, 8])
    padded.capture(caches["padded"], [1, 2, 4, 8])
    assert graphs.sizes == padded.sizes == [1, 2, 4, 8] and len(graphs.graphs) == 4

    meta, positions = build_metadata([0] * 6, list(map(len, prompts)), tables, BLOCK_SIZE, cuda_device)
    ids = torch.tensor([t for p in prompts for t in p], device=cuda_device)
    for kv in caches.values():
        hidden = model(ids, positions, kv, meta)
    last_rows = torch.tensor(meta.query_start_loc_host[1:], device=cuda_device) - 1
    last_token = model.compute_logits(hidden[last_rows]).argmax(-1)
    lengths = list(map(len, prompts))
    for step in range(steps):
        active = 6 - step % 6  # the first 6, 5, ... 1 sequences: buckets 8, 8, 4, 4, 2, 1
        meta, positions = build_metadata(lengths[:active], [1] * active, tables[:active], BLOCK_SIZE, cuda_device)
        assert graphs.can_run(meta)
        replayed = graphs.run(last_token[:active], positions, caches["graph"], meta)
        same_shapes = padded.run(last_token[:active], positions, caches["padded"], meta)
        eager = model(last_token[:active], positions, caches["eager"], meta)
        assert torch.equal(replayed, same_shapes), f"step {step}: replay differs from the same batch run eagerly"
        torch.testing.assert_close(replayed, eager, atol=5e-2, rtol=5e-2)
        last_token[:active] = model.compute_logits(eager).argmax(-1)
        lengths[:active] = [n + 1 for n in lengths[:active]]
    for (gk, gv), (pk, pv) in zip(caches["graph"], caches["padded"]):
        assert torch.equal(gk, pk) and torch.equal(gv, pv)
