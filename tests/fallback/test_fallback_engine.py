"""The whole engine on fallback models, built by ``build_llm_engine`` like the launcher does:
continuous batching, chunked prefill and streaming text, against transformers' ``generate``."""

from __future__ import annotations

import pytest

from lmport.config import LaunchConfig
from lmport.engine.api import GenerationRequest, SamplingParams
from lmport.engine.factory import build_llm_engine
from lmport.models.hf_fallback import HFCausalLMAdapter
from lmport.models.hf_seq2seq import HFSeq2SeqExecutor
from lmport.models.llama import LlamaForCausalLM
from lmport.plugins import PluginHost
from lmport.testing.hf_oracle import hf_greedy_generate

PROMPTS = [[5, 9, 33, 4, 80, 81, 82, 90, 91, 92, 7, 8, 9, 10], [100, 7], [8, 8, 8, 120, 43, 19]]
MAX_NEW = 6


@pytest.mark.parametrize("name, runner", [("olmo2", HFCausalLMAdapter), ("bart", HFSeq2SeqExecutor)])
def test_engine_serves_fallback_models(name, runner, fallback_checkpoint):
    path, oracle = fallback_checkpoint(name)
    host = PluginHost(environ={}, load_entry_points=False).load()
    config = LaunchConfig(model_id=str(path), block_size=4, max_batch_total_tokens=512, max_batch_prefill_tokens=8)
    engine, tokenizer, _ = build_llm_engine(config, host)
    executor = engine.executor
    assert isinstance(executor if runner is HFSeq2SeqExecutor else executor.model, runner)
    requests = [
        GenerationRequest(f"r{i}", tuple(p), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
        for i, p in enumerate(PROMPTS)
    ]
    outputs = engine.generate(requests)
    for request in requests:
        steps = outputs[request.request_id]
        tokens = [t.token_id for out in steps for t in out.tokens]
        assert tokens == hf_greedy_generate(oracle, list(request.prompt_token_ids), MAX_NEW)[0]
        assert steps[-1].finished and steps[-1].finish_reason == "length"
        assert "".join(out.text for out in steps) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_build_engine_resolves_a_gguf_path_and_the_default_model_as_launch_does(tiny_gguf, monkeypatch, tmp_path):
    """``build_llm_engine`` takes what ``--model-id`` takes: a ``.gguf`` file, or nothing for the
    default model (here the tiny GGUF stands in for the Gemma package)."""
    from lmport.models import resolve

    gguf_path, oracle, reference_tokenizer = tiny_gguf
    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path / "cache"))  # the sidecar goes here, not in ~/.cache
    monkeypatch.setattr(resolve, "default_model_gguf", lambda: gguf_path)
    prompt = reference_tokenizer("The quick brown fox").input_ids
    expected = hf_greedy_generate(oracle, prompt, MAX_NEW)[0]
    for model_id, shown_as in ((str(gguf_path), str(gguf_path)), ("", resolve.DEFAULT_MODEL_NAME)):
        config = LaunchConfig(model_id=model_id, block_size=4, max_batch_total_tokens=256, dtype="float32")  # as the oracle
        engine, tokenizer, info = build_llm_engine(config, PluginHost(environ={}, load_entry_points=False).load())
        assert info.model_id == shown_as and info.gguf_file == gguf_path.name
        assert info.architecture == "Qwen2ForCausalLM" and isinstance(engine.executor.model, LlamaForCausalLM)  # native
        assert tokenizer("The quick brown fox").input_ids == prompt  # the GGUF's own vocabulary, converted
        request = GenerationRequest("r", tuple(prompt), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
        assert [t.token_id for out in engine.generate([request])["r"] for t in out.tokens] == expected


@pytest.mark.parametrize("name", ["olmo2", "bart"])
def test_building_an_engine_on_the_fallback_logs_one_line(name, fallback_checkpoint, caplog):
    """One line, a warning, saying the model runs through the fallback and is not optimized."""
    import logging

    path, _ = fallback_checkpoint(name)
    config = LaunchConfig(model_id=str(path), block_size=4, max_batch_total_tokens=256)
    with caplog.at_level(logging.DEBUG):
        build_llm_engine(config, PluginHost(environ={}, load_entry_points=False).load())
    lines = [r for r in caplog.records if "fallback" in r.getMessage().replace(str(path), "")]  # the folder is "fallback-…"
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert lines[0].levelno == logging.WARNING and "not optimized" in lines[0].getMessage()


def test_a_gguf_of_a_native_family_runs_natively_and_is_dequantized_once(tiny_llama_gguf, monkeypatch, tmp_path, caplog):
    """A Llama GGUF (q/k rows in llama.cpp's order) loads into the native Llama: dequantized on the
    first launch into a safetensors cache, which the second launch reads instead."""
    import logging

    from lmport.models import gguf_weights

    gguf_path, oracle, reference_tokenizer = tiny_llama_gguf
    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path / "cache"))
    reads = []
    read = gguf_weights.read_gguf_tensors
    monkeypatch.setattr(gguf_weights, "read_gguf_tensors", lambda *a: reads.append(a) or read(*a))
    prompt = reference_tokenizer("Paged attention keeps the KV cache").input_ids
    expected = hf_greedy_generate(oracle, prompt, MAX_NEW)[0]
    for launch in (1, 2):
        config = LaunchConfig(model_id=str(gguf_path), block_size=4, max_batch_total_tokens=256, dtype="float32")
        with caplog.at_level(logging.INFO, logger="lmport.models.gguf_weights"):
            engine, _, info = build_llm_engine(config, PluginHost(environ={}, load_entry_points=False).load())
        assert info.architecture == "LlamaForCausalLM" and isinstance(engine.executor.model, LlamaForCausalLM)
        request = GenerationRequest("r", tuple(prompt), SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))
        assert [t.token_id for out in engine.generate([request])["r"] for t in out.tokens] == expected
        assert len(reads) == 1, f"launch {launch} dequantized again"
    said = [r.getMessage() for r in caplog.records if r.name == "lmport.models.gguf_weights"]
    assert any("dequantizing" in line for line in said) and any("reusing" in line for line in said)
