"""Architectures without a native module, through transformers on the paged cache: greedy tokens
equal transformers' ``generate`` token for token, in one mixed batch with chunked prefill."""

from __future__ import annotations

import logging

import pytest
import torch

from lmport.models.base import CausalLM
from lmport.models.hf_fallback import HFCausalLMAdapter, load_fallback
from lmport.models.loader import resolve_model_info
from lmport.testing.model_driver import greedy_generate

PROMPT_LENGTHS = [3, 9, 14, 1]


def prompts(seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture
def load(cpu_host, fallback_checkpoint):
    def build(name: str) -> tuple[HFCausalLMAdapter, object]:
        path, oracle = fallback_checkpoint(name)
        model = load_fallback(resolve_model_info(path), cpu_host, torch.float32, torch.device("cpu"), False)
        return model, oracle

    return build


@pytest.mark.parametrize("name", ["gemma3", "qwen2", "gemma2", "granite"])
def test_greedy_matches_transformers(name, load, cpu_host, oracle_greedy):
    model, oracle = load(name)
    assert isinstance(model, CausalLM)
    batch = prompts()
    expected = [oracle_greedy(oracle, p, 8) for p in batch]
    for chunk in (None, 3):
        got = greedy_generate(model, batch, 8, host=cpu_host, block_size=4, prefill_chunk=chunk)
        assert got == expected, f"prefill_chunk={chunk}"


def test_gemma3_cache_shape_and_layer_specs(load):
    model, oracle = load("gemma3")
    assert model.kv_cache_shape() == (4, 2, 32)  # explicit head_dim, not hidden_size // heads
    windows = [layer.sliding_window for layer in model.layers]
    assert windows == [5, None, 5, None]
    assert all(layer.scale == pytest.approx(24**-0.5) for layer in model.layers)  # query_pre_attn_scalar


def test_gemma2_soft_caps_reach_the_backend(load):
    model, _ = load("gemma2")
    assert {layer.soft_cap for layer in model.layers} == {2.0}
    assert model.kv_cache_shape() == (2, 1, 16)


def test_logits_match_transformers_forward(load):
    """Last-prompt-token logits of a batch, against transformers' uncached forward per prompt."""
    from lmport.testing.model_driver import build_metadata
    from lmport.layers.attention import KVCacheSpec

    for name in ("gemma3", "granite"):
        model, oracle = load(name)
        batch = prompts(seed=1)
        layers, kv_heads, head_dim = model.kv_cache_shape()
        caches = [(torch.zeros(12, 4, kv_heads, head_dim), torch.zeros(12, 4, kv_heads, head_dim)) for _ in range(layers)]
        tables = [[1], [2, 3, 4], [5, 6, 7, 8], [9]]  # prompts of 3, 9, 14 and 1 tokens
        meta, positions = build_metadata([0] * 4, PROMPT_LENGTHS, tables, 4, torch.device("cpu"))
        with torch.inference_mode():
            hidden = model(torch.tensor([t for p in batch for t in p]), positions, caches, meta)
            logits = model.compute_logits(hidden[torch.tensor(meta.query_start_loc_host[1:]) - 1])
            expected = torch.stack([oracle(torch.tensor([p])).logits[0, -1] for p in batch])
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_one_log_line_says_fallback(cpu_host, fallback_checkpoint, caplog):
    path, _ = fallback_checkpoint("qwen2")
    with caplog.at_level(logging.INFO, logger="lmport.models.hf_fallback"):
        load_fallback(resolve_model_info(path), cpu_host, torch.float32, torch.device("cpu"), False)
    lines = [r.getMessage() for r in caplog.records if r.name == "lmport.models.hf_fallback"]
    assert len(lines) == 1 and "transformers fallback" in lines[0] and "not optimized" in lines[0]


def test_calling_the_loaded_model_outside_the_runner_fails_clearly(load):
    model, _ = load("qwen2")
    with pytest.raises(RuntimeError, match="paged cache"):
        model.hf_model(torch.tensor([[5, 6, 7]]))


@pytest.mark.parametrize("kind", ["folder", "gguf"])
def test_loading_reuses_the_parsed_config(kind, cpu_host, fallback_checkpoint, tiny_gguf, monkeypatch, tmp_path):
    """The config in ModelInfo goes to ``from_pretrained``: a GGUF is not parsed again for it."""
    from transformers import AutoConfig, PretrainedConfig

    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path))  # the GGUF's sidecar folder
    path = fallback_checkpoint("qwen2")[0] if kind == "folder" else tiny_gguf[0]
    info = resolve_model_info(path)
    assert (info.gguf_file is not None) == (kind == "gguf")
    reads = []

    def no_second_read(*args, **kwargs):
        reads.append(args)
        raise AssertionError("the checkpoint's config was read again")

    monkeypatch.setattr(AutoConfig, "from_pretrained", no_second_read)
    monkeypatch.setattr(PretrainedConfig, "from_pretrained", classmethod(no_second_read))
    model = load_fallback(info, cpu_host, torch.float32, torch.device("cpu"), False)
    assert reads == [] and model.hf_model.config is not info.hf_config  # a copy: info's config stays as it was
    assert model.hf_model.config.num_hidden_layers == info.hf_config.num_hidden_layers
