"""Native StarCoder/SantaCoder (GPTBigCode) against transformers, multi-query and multi-head."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("name, kv_heads", [("gpt_bigcode", 1), ("gpt_bigcode-mha", 4)])
def test_gpt_bigcode_matches_transformers(name, kv_heads, tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint(name)
    model = load_native(path)
    assert model.kv_cache_shape() == (2, kv_heads, 16)
    assert_matches_hf(hf_model, model, random_prompts([5, 12, 2, 9], seed=2), max_new_tokens=8)
