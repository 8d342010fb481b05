"""Native T5 with the CUDA backend's Triton attention (position bias, cross-attention) and the
decode graph runner over its two KV groups: greedy tokens equal transformers' ``generate``.

On a GPU the runner replays real CUDA graphs; on a CPU the kernels run in Triton's interpreter
and the runner replays the padded static batch eagerly (``use_graphs=False``).
"""

from __future__ import annotations

import torch

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.hookspecs import hookimpl
from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tiny_models import make_t5_checkpoint


class TritonAttentionPlugin:
    @hookimpl
    def lmport_attention_backend(self, spec):
        from lmport_cuda.attention import TritonPagedAttention

        return TritonPagedAttention(spec)


def test_t5_decodes_through_the_graph_runner(tmp_path, device: torch.device, monkeypatch) -> None:
    from lmport_cuda.attention import TritonPagedAttention
    from lmport_cuda.graphs import CudaGraphRunner
    from lmport_cuda.kernels import paged_attention

    if device.type == "cpu":  # split-KV would run 32x the programs in the interpreter
        monkeypatch.setattr(paged_attention, "SPLIT_KV_BELOW_PROGRAMS", 1)

    oracle = make_t5_checkpoint(tmp_path, flan=True)
    on_gpu = device.type == "cuda"
    if on_gpu:  # the cuda plugin itself
        host = PluginHost(environ={})
        assert host.select_backend("cuda").backend.name == "cuda"
    else:
        host = PluginHost(environ={}, load_entry_points=False).load()
        host.register(TritonAttentionPlugin(), "triton-attention")
        host.select_backend()
    config = LaunchConfig(model_id=str(tmp_path), block_size=16, max_batch_total_tokens=256, dtype="float32",
                          cuda_graphs=(1, 2, 4), max_total_tokens=64)  # fmt: skip
    engine, _, _ = build_llm_engine(config, host)
    runner = engine.executor
    layers = [m for m in runner.model.modules() if hasattr(m, "kv_group")]
    assert {m.kv_group for m in layers} == {0, 1} and all(isinstance(m.backend, TritonPagedAttention) for m in layers)
    if not on_gpu:  # the CPU backend captures nothing: the padded static batch, run eagerly
        runner.graph_runner = CudaGraphRunner(runner.model, max_seq_len=64, batch_sizes=[1, 2, 4], use_graphs=False)
        runner.graph_runner.capture(runner.kv_caches, [1, 2, 4])
    graphs = runner.graph_runner
    assert isinstance(graphs, CudaGraphRunner) and graphs.sizes == [1, 2, 4]
    replays = []
    original = graphs.run
    graphs.run = lambda *args: replays.append(args[3].num_seqs) or original(*args)

    prompts = [[5, 9, 33, 4, 80, 81, 82, 90, 91, 92, 7], [100, 7], [8, 8, 8, 120, 43, 19]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    outputs = engine.generate([GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        assert [t.token_id for o in outputs[f"r{i}"] for t in o.tokens] == hf_greedy_generate(oracle, prompt, 5)[0]
    assert replays and set(replays) == {3}  # every decode step went through the static batch


def test_t5_bf16_on_cuda_is_close_to_transformers_fp32(tmp_path, cuda_device: torch.device) -> None:
    """bf16 on the GPU (kernels and graphs): every generated token's logprob close to what
    transformers' float32 model gives the same token after the same prefix."""
    oracle = make_t5_checkpoint(tmp_path, flan=True)
    host = PluginHost(environ={})
    assert host.select_backend("cuda").backend.name == "cuda"
    config = LaunchConfig(model_id=str(tmp_path), dtype="bfloat16", max_batch_total_tokens=1024, max_total_tokens=64)
    engine, _, _ = build_llm_engine(config, host)
    assert engine.executor.graph_runner is not None
    prompts = [[5, 9, 33, 4, 80, 81, 82, 90, 91, 92, 7], [100, 7], [8, 8, 8, 120, 43, 19]]
    params = SamplingParams(max_new_tokens=5, ignore_eos=True)
    outputs = engine.generate([GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(prompts)])
    for i, prompt in enumerate(prompts):
        tokens = [t for o in outputs[f"r{i}"] for t in o.tokens]
        ids = [t.token_id for t in tokens]
        with torch.inference_mode():
            logits = oracle(input_ids=torch.tensor([prompt]), decoder_input_ids=torch.tensor([[0, *ids[:-1]]])).logits[0]
        want = torch.log_softmax(logits.float(), -1)[torch.arange(len(ids)), torch.tensor(ids)]
        torch.testing.assert_close(torch.tensor([t.logprob for t in tokens]), want, atol=0.1, rtol=0.05)
