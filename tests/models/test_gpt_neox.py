"""Native GPT-NeoX against transformers: partial rotary, parallel and sequential residual."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name, parallel", [("gpt_neox", True), ("gpt_neox-serial", False)])
def test_gpt_neox_matches_transformers(name, parallel, tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint(name)
    assert hf_model.config.use_parallel_residual is parallel
    model = load_native(path)
    assert model.rotary.rotary_dim == 4  # rotary_pct 0.25 of head_dim 16
    assert all(layer.use_parallel_residual is parallel for layer in model.gpt_neox.layers)
    assert_matches_hf(hf_model, model, random_prompts([5, 12, 2, 9], seed=3), max_new_tokens=8)
