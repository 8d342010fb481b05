"""Native Granite against transformers, with all four multipliers away from one."""

from __future__ import annotations


def test_granite_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("granite")
    model = load_native(path)
    assert model.model.layers[0].residual_multiplier == 0.5 and model.logits_scaling == 0.5
    assert model.model.layers[0].self_attn.attn.spec.scale == 0.2
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9], seed=1), max_new_tokens=10)
