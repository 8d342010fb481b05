"""Native BLOOM against transformers, and BLOOM's ALiBi slopes against transformers' formula."""

from __future__ import annotations

import pytest
import torch

from lmport.layers.alibi import bloom_alibi_slopes
from lmport.testing.cached_logits import assert_stepwise_logits_match
from lmport.testing.tiny_models import TINY_MODELS

LENGTHS = [5, 11, 1, 8]
STD = 0.3  # at the default 0.08 these tiny BLOOMs repeat one token; wider weights give varied text


@pytest.mark.parametrize("num_heads", [*range(1, 34), 48, 71, 96, 112])
def test_slopes_equal_transformers(num_heads):
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # transformers' bias for key position j is slope * j; with one key at position 1 it is the slope
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]
    assert torch.equal(torch.tensor(bloom_alibi_slopes(num_heads)), hf)


def test_slopes_follow_the_alibi_paper():
    assert bloom_alibi_slopes(8) == tuple(2.0 ** -(i + 1) for i in range(8))
    # 6 heads: the 4-head sequence, then the 1st and 3rd terms of the 8-head one
    assert bloom_alibi_slopes(6) == (2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3)


@pytest.mark.parametrize("name", ["bloom", "bloom-6-heads"])
def test_bloom_matches_transformers(name, tiny_checkpoint, load_native, random_prompts, assert_matches_hf, cpu_host):
    path, hf_model = tiny_checkpoint(name, std=STD)
    model = load_native(path)
    prompts = random_prompts(LENGTHS)
    assert_matches_hf(hf_model, model, prompts, max_new_tokens=8)
    assert_stepwise_logits_match(hf_model, model, prompts, cpu_host)


def test_residual_after_layernorm_variant(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    config = TINY_MODELS["bloom"]()
    config.apply_residual_connection_post_layernorm = True
    path, hf_model = tiny_checkpoint("bloom-residual-post-ln", config=config, std=STD)
    assert_matches_hf(hf_model, load_native(path), random_prompts([6, 3]), max_new_tokens=6)


def test_bigscience_export_names_without_transformer_prefix_load(tiny_checkpoint, load_native):
    """bigscience/bloom-* checkpoints name tensors "h.0.…", "word_embeddings.weight"."""
    path, _ = tiny_checkpoint("bloom", std=STD)
    model, fresh = load_native(path), load_native(path)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_weights((name.removeprefix("transformer."), p.detach().clone()) for name, p in model.named_parameters())
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
