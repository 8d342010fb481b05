"""Speculative decoding on CUDA: fp32 greedy through the whole engine equals the plain engine's and
transformers', with n-gram lookup and with draft models (the draft's one-token forwards replay its
decode graphs; verify steps run eager), and with the reference kernels (skipped without CUDA); the
graph-runner routing with the Triton attention also runs on a CPU, in Triton's interpreter."""

from __future__ import annotations

import pytest
import torch

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.hookspecs import hookimpl
from lmport.plugins import PluginHost
from lmport.testing.engine_driver import engine_greedy
from lmport.testing.hf_oracle import hf_greedy_generate
from lmport.testing.tiny_models import VOCAB, make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MAX_NEW = 12


def cuda_host(custom_kernels: bool = True) -> PluginHost:
    host = PluginHost(environ={})
    assert host.select_backend("cuda").backend.name == "cuda"
    host.set_custom_kernels(custom_kernels)
    return host


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    target = tmp_path_factory.mktemp("spec-cuda-target")
    hf_model = make_checkpoint("llama", target)
    train_tiny_tokenizer().save_pretrained(target)
    draft = tmp_path_factory.mktemp("spec-cuda-draft")
    make_checkpoint("llama", draft, seed=1)
    return target, draft, hf_model


def prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(3)
    randoms = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 17, 9, 1)]
    return randoms + [[5, 6, 7, 8] * 5]


@needs_cuda
@pytest.mark.parametrize("case", ["ngram", "same-draft", "other-draft"])
@pytest.mark.parametrize("custom_kernels", [True, False])
def test_speculative_greedy_equals_plain_and_transformers(checkpoints, case, custom_kernels):
    target, draft, hf_model = checkpoints
    settings = {"ngram": dict(speculate=3), "same-draft": dict(speculative_model=str(target), speculate=4),
                "other-draft": dict(speculative_model=str(draft), speculate=2)}[case]  # fmt: skip
    expected = [hf_greedy_generate(hf_model, p, MAX_NEW)[0] for p in prompts()]
    plain = engine_greedy(target, cuda_host(custom_kernels), prompts(), MAX_NEW, cuda_graphs=(1, 2, 4, 8))
    assert plain == expected
    got = engine_greedy(target, cuda_host(custom_kernels), prompts(), MAX_NEW, cuda_graphs=(1, 2, 4, 8), **settings)
    assert got == expected, case


class _TritonAttention:
    @hookimpl
    def lmport_attention_backend(self, spec):
        from lmport_cuda.attention import TritonPagedAttention

        return TritonPagedAttention(spec)


def test_verify_steps_skip_the_decode_graphs_and_draft_rounds_replay_them(checkpoints, device, monkeypatch):
    """The CUDA backend's Triton attention and graph runner under speculation: verify steps (k + 1
    query tokens per row) run eagerly, the draft model's one-token rounds go through its own
    graph runner, and greedy tokens equal transformers'. On a CPU the kernels run in Triton's
    interpreter and the graph runners replay their padded static batches eagerly."""
    from lmport_cuda.graphs import CudaGraphRunner
    from lmport_cuda.kernels import paged_attention

    target, _, hf_model = checkpoints
    on_gpu = device.type == "cuda"
    if on_gpu:
        host = cuda_host()
    else:
        monkeypatch.setattr(paged_attention, "SPLIT_KV_BELOW_PROGRAMS", 1)  # fewer programs in the interpreter
        host = PluginHost(environ={}, load_entry_points=False).load()
        host.register(_TritonAttention(), "triton-attention")
        host.select_backend()
    config = LaunchConfig(model_id=str(target), speculative_model=str(target), speculate=3, block_size=16, dtype="float32",
                          max_batch_total_tokens=512, max_total_tokens=64, cuda_graphs=(1, 2, 4))  # fmt: skip
    engine, _, _ = build_llm_engine(config, host)
    runners = {"target": engine.executor, "draft": engine.speculator.proposer.runner}
    calls = {name: [] for name in runners}
    for name, runner in runners.items():
        if not on_gpu:  # the CPU backend captures nothing: the padded static batch, run eagerly
            runner.graph_runner = CudaGraphRunner(runner.model, max_seq_len=64, batch_sizes=[1, 2, 4], use_graphs=False)
            runner.graph_runner.capture(runner.kv_caches, [1, 2, 4])
        original = runner.graph_runner.run
        runner.graph_runner.run = lambda *args, _o=original, _c=calls[name]: _c.append(args[3].max_query_len) or _o(*args)
    ps = prompts()[:3]
    params = SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True)
    outputs = engine.generate([GenerationRequest(f"r{i}", tuple(p), params) for i, p in enumerate(ps)])
    for i, prompt in enumerate(ps):
        assert [t.token_id for o in outputs[f"r{i}"] for t in o.tokens] == hf_greedy_generate(hf_model, prompt, MAX_NEW)[0]
    assert engine.stats().extra["spec_accepted_tokens"] == engine.stats().extra["spec_draft_tokens"] > 0
    assert calls["draft"] and set(calls["draft"]) == {1}  # the draft's one-token rounds replayed
    assert set(calls["target"]) <= {1}  # never a verify step (k + 1 query tokens) through a decode graph
