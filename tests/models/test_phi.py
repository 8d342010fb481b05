"""Native Phi against transformers: partial rotary, parallel attention/MLP block, biased head."""

from __future__ import annotations


def test_phi_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("phi")
    model = load_native(path)
    assert model.rotary.rotary_dim == 8  # partial_rotary_factor 0.5 of head_dim 16
    assert_matches_hf(hf_model, model, random_prompts([5, 12, 2, 9], seed=4), max_new_tokens=8)


def test_phi_qk_layernorm_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    from lmport.testing.tiny_models import TINY_MODELS

    config = TINY_MODELS["phi"]()
    config.qk_layernorm = True
    path, hf_model = tiny_checkpoint("phi-qk-layernorm", config=config)
    model = load_native(path)
    assert model.model.layers[0].self_attn.qk_layernorm
    assert_matches_hf(hf_model, model, random_prompts([7, 3]), max_new_tokens=6)
