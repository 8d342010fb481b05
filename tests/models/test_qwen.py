"""Native Qwen2 (q/k/v bias, optional windowed upper layers) and Qwen3 (QK-norm) against transformers."""

from __future__ import annotations


def test_qwen2_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("qwen2")
    model = load_native(path)
    attn = model.model.layers[0].self_attn
    assert attn.qkv_proj.bias is not None and attn.o_proj.bias is None and attn.q_norm is None
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9], seed=1), max_new_tokens=10)


def test_qwen2_sliding_layers_match_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("qwen2-sliding")
    model = load_native(path)
    assert [layer.self_attn.attn.spec.sliding_window for layer in model.model.layers] == [None, 6, 6]
    assert_matches_hf(hf_model, model, random_prompts([14, 3, 9], seed=2), max_new_tokens=8)


def test_qwen3_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("qwen3")
    model = load_native(path)
    attn = model.model.layers[0].self_attn
    assert attn.head_dim == 32 and attn.q_norm is not None and attn.qkv_proj.bias is None
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9], seed=3), max_new_tokens=10)
