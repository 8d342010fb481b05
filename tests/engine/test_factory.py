"""build_engine's decisions: hooks asked in order, KV sizing from memory, dtype, quantization
refused before weights load, a backend's graph runner and whole-model executor used."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from lmport.capabilities import CapabilityError
from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.executor import ModelExecutor
from lmport.engine.factory import build_engine, build_llm_engine
from lmport.graphs import DecodeGraphRunner
from lmport.engine.model_runner import PagedModelRunner
from lmport.hookspecs import hookimpl
from lmport.memory import MemoryInfo
from lmport.models.loader import build_native_model, resolve_model_info
from lmport.models.resolve import ModelNotFoundError
from lmport.plugins import PluginHost


def cpu_host_with(plugin=None) -> PluginHost:
    host = PluginHost(environ={}, load_entry_points=False).load()
    if plugin is not None:
        host.register(plugin, "test-plugin")
    host.select_backend("cpu")
    return host


def greedy_tokens(engine, prompt, max_new=6) -> list[int]:
    req = GenerationRequest("r", tuple(prompt), SamplingParams(max_new_tokens=max_new, ignore_eos=True))
    return [t.token_id for o in engine.generate([req])["r"] for t in o.tokens]


def test_cpu_kv_cache_is_sized_from_reported_memory(tiny_model_dir):
    path, _ = tiny_model_dir("llama")

    class SmallDevice:
        @hookimpl
        def lmport_memory_info(self, device):
            return MemoryInfo(free_bytes=2**22, total_bytes=2**24)

    engine, tokenizer, info = build_llm_engine(LaunchConfig(model_id=str(path), block_size=4), cpu_host_with(SmallDevice()))
    # tiny llama: 2 layers x (K+V) x 4 tokens x 2 kv heads x 16 dims x 4 bytes = 2048 bytes per block
    assert engine.executor.kv_cache_spec().bytes_per_block() == 2048
    # 8 sequences of 512 tokens would take 2 MiB: more than a quarter of the 4 MiB free, so the quarter it is
    assert engine.limits.num_blocks == (2**22 // 4) // 2048
    assert engine.limits.max_batch_total_tokens == engine.limits.num_blocks * 4
    assert engine.limits.max_total_tokens == 512 and engine.limits.max_input_tokens == 511  # the model's positions
    assert engine.limits.max_batch_prefill_tokens == 561  # TGI: max_input_tokens + 50
    assert info.architecture == "LlamaForCausalLM" and tokenizer.eos_token_id == 2
    key_cache, _ = engine.executor.kv_caches[0]
    assert key_cache.shape == (engine.limits.num_blocks, 4, 2, 16) and key_cache.dtype == torch.float32


def test_too_little_memory_for_one_sequence_is_a_startup_error(tiny_model_dir):
    path, _ = tiny_model_dir("llama")

    class TinyDevice:
        @hookimpl
        def lmport_memory_info(self, device):
            return MemoryInfo(free_bytes=100_000, total_bytes=2**24)

    with pytest.raises(MemoryError, match="not enough memory"):
        build_llm_engine(LaunchConfig(model_id=str(path), block_size=4), cpu_host_with(TinyDevice()))


def test_max_batch_total_tokens_overrides_memory_and_limits_must_fit_it(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), block_size=8, max_batch_total_tokens=100), cpu_host_with())
    assert engine.limits.num_blocks == 13 and engine.limits.max_total_tokens == 104
    with pytest.raises(ValueError, match="larger than the KV cache"):
        build_llm_engine(
            LaunchConfig(model_id=str(path), block_size=8, max_batch_total_tokens=100, max_total_tokens=200), cpu_host_with()
        )


def test_dtype_is_float32_on_cpu_unless_asked(tiny_model_dir, random_prompts):
    path, _ = tiny_model_dir("llama")
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), max_batch_total_tokens=256), cpu_host_with())
    assert engine.executor.model.lm_head.weight.dtype == torch.float32
    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), dtype="bfloat16", max_batch_total_tokens=256), cpu_host_with())
    assert next(engine.executor.model.parameters()).dtype == torch.bfloat16
    assert engine.executor.kv_caches[0][0].dtype == torch.bfloat16
    assert len(greedy_tokens(engine, random_prompts([5])[0])) == 6
    with pytest.raises(ValueError, match="unknown dtype"):
        build_llm_engine(LaunchConfig(model_id=str(path), dtype="int3"), cpu_host_with())


def test_quantization_is_refused_before_any_weight_is_read(tiny_model_dir, tmp_path):
    path, _ = tiny_model_dir("llama")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            shutil.copy(path / name, tmp_path / name)  # no weights in this folder
    with pytest.raises(CapabilityError, match="marlin"):  # a CUDA kernel: not on the CPU backend
        build_llm_engine(LaunchConfig(model_id=str(tmp_path), quantize="marlin"), cpu_host_with())
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "exl2", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CapabilityError, match="exl2"):
        build_llm_engine(LaunchConfig(model_id=str(tmp_path)), cpu_host_with())


def test_a_missing_model_folder_names_the_model():
    with pytest.raises(ModelNotFoundError, match="no/such/model"):
        build_llm_engine(LaunchConfig(model_id="no/such/model"), cpu_host_with())


class EagerDecodeGraphs(DecodeGraphRunner):
    """A CPU stand-in for a CUDA graph runner: records what the engine asks of it and replays eagerly."""

    def __init__(self, model):
        self.model = model
        self.captured: list[int] = []
        self.replayed_batches: list[int] = []

    def capture(self, kv_caches, batch_sizes):
        self.captured = list(batch_sizes)

    def can_run(self, metadata):
        return metadata.num_seqs <= max(self.captured)

    def run(self, input_ids, positions, kv_caches, metadata):
        assert metadata.is_decode_only
        self.replayed_batches.append(metadata.num_seqs)
        return self.model(input_ids, positions, kv_caches, metadata)


def test_decode_steps_go_through_the_backends_graph_runner(tiny_model_dir, random_prompts, hf_greedy):
    path, hf_model = tiny_model_dir("llama")
    runners = []

    class GraphBackend:
        @hookimpl
        def lmport_capabilities(self, backend):
            from lmport.backends.cpu.plugin import lmport_capabilities as cpu_caps

            return dataclasses.replace(cpu_caps(backend), graph_capture=True)

        @hookimpl
        def lmport_graph_runner(self, model, config, capabilities):
            runners.append(EagerDecodeGraphs(model))
            return runners[-1]

    config = LaunchConfig(model_id=str(path), block_size=4, max_batch_total_tokens=512, cuda_graphs=(1, 2, 4, 8), max_batch_size=4)
    engine, _, _ = build_llm_engine(config, cpu_host_with(GraphBackend()))
    (runner,) = runners
    assert runner.captured == [1, 2, 4]  # buckets above max_batch_size are not captured
    prompts = random_prompts([6, 11], seed=12)
    reqs = [GenerationRequest(str(i), tuple(p), SamplingParams(max_new_tokens=6, ignore_eos=True)) for i, p in enumerate(prompts)]
    outputs = engine.generate(reqs)
    for i, p in enumerate(prompts):
        assert [t.token_id for o in outputs[str(i)] for t in o.tokens] == hf_greedy(hf_model, p, 6)[0]
    assert runner.replayed_batches == [2] * 5  # every decode step, never the prefill

    no_graphs = LaunchConfig(model_id=str(path), block_size=4, max_batch_total_tokens=512, cuda_graphs=())
    engine, _, _ = build_llm_engine(no_graphs, cpu_host_with(GraphBackend()))
    assert engine.executor.graph_runner is None and len(runners) == 1


def test_a_backends_whole_model_executor_takes_over(tiny_model_dir, random_prompts, hf_greedy):
    path, hf_model = tiny_model_dir("llama")
    executors = []

    class CompiledExecutor(ModelExecutor):
        """A vendor's executor: here the core's runner behind a counter."""

        def __init__(self, inner: PagedModelRunner):
            self.inner = inner
            self.steps = 0
            self.num_blocks = None

        def kv_cache_spec(self):
            return self.inner.kv_cache_spec()

        def initialize_cache(self, num_blocks):
            self.num_blocks = num_blocks
            self.inner.initialize_cache(num_blocks)

        def execute(self, step):
            self.steps += 1
            return self.inner.execute(step)

    class WholeModelBackend:
        @hookimpl
        def lmport_model_executor(self, model, config, capabilities):
            host = cpu_host_with()
            native = build_native_model(resolve_model_info(model.path), host, torch.float32, torch.device("cpu"))
            runner = PagedModelRunner(native, block_size=8, device="cpu", kv_cache_dtype=torch.float32)
            executors.append(CompiledExecutor(runner))
            return executors[-1]

    engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(path), max_batch_total_tokens=256), cpu_host_with(WholeModelBackend()))
    (executor,) = executors
    assert engine.executor is executor and executor.num_blocks == 32 and engine.limits.block_size == 8
    prompt = random_prompts([9], seed=13)[0]
    assert greedy_tokens(engine, prompt) == hf_greedy(hf_model, prompt, 6)[0]
    assert executor.steps == 6


def test_build_engine_returns_an_unstarted_async_engine(tiny_model_dir):
    path, _ = tiny_model_dir("llama")
    engine, tokenizer, info = build_engine(LaunchConfig(model_id=str(path), max_batch_total_tokens=256), cpu_host_with())
    assert engine.is_healthy and engine.stats().kv_blocks_total == 16 and engine.stats().running == 0
    assert engine.tokenizer is tokenizer and engine.limits.block_size == 16
    engine.shutdown()


def test_dtype_on_an_accelerator_is_the_checkpoints_own():
    from types import SimpleNamespace

    from lmport.capabilities import Capabilities
    from lmport.engine.factory import pick_dtype

    gpu = torch.device("cuda")
    caps = Capabilities(backend="gpu", device_type="cuda", dtypes=("float32", "bfloat16", "float16"))
    no_bf16 = dataclasses.replace(caps, dtypes=("float32", "float16"))
    assert pick_dtype(None, SimpleNamespace(torch_dtype="float32"), gpu, caps) == torch.float32
    assert pick_dtype(None, SimpleNamespace(torch_dtype=torch.float16), gpu, caps) == torch.float16
    assert pick_dtype(None, SimpleNamespace(), gpu, caps) == torch.bfloat16
    assert pick_dtype(None, SimpleNamespace(), gpu, no_bf16) == torch.float16
    assert pick_dtype(None, SimpleNamespace(torch_dtype="bfloat16"), gpu, no_bf16) == torch.float16
    assert pick_dtype("bf16", SimpleNamespace(torch_dtype="float32"), gpu, caps) == torch.bfloat16
    cpu = torch.device("cpu")
    plain_cpu = dataclasses.replace(caps, device_type="cpu", fast_dtypes=("float32",))
    bf16_cpu = dataclasses.replace(caps, device_type="cpu", fast_dtypes=("float32", "bfloat16"))
    assert pick_dtype(None, SimpleNamespace(torch_dtype="bfloat16"), cpu, plain_cpu) == torch.float32
    assert pick_dtype(None, SimpleNamespace(), cpu, plain_cpu) == torch.float32  # a GGUF
    assert pick_dtype(None, SimpleNamespace(torch_dtype="bfloat16"), cpu, bf16_cpu) == torch.bfloat16
    assert pick_dtype(None, SimpleNamespace(), cpu, bf16_cpu) == torch.bfloat16
    assert pick_dtype(None, SimpleNamespace(torch_dtype="float32"), cpu, bf16_cpu) == torch.float32
    assert pick_dtype(None, SimpleNamespace(torch_dtype="float16"), cpu, bf16_cpu) == torch.float32
    with pytest.raises(ValueError, match="does not support dtype bfloat16"):
        pick_dtype("bfloat16", SimpleNamespace(), gpu, no_bf16)
