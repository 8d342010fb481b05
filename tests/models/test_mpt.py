"""Native MPT against transformers, and MPT's ALiBi slopes against transformers' formula."""

from __future__ import annotations

import pytest
import torch

from lmport.layers.alibi import bloom_alibi_slopes, mpt_alibi_slopes
from lmport.testing.cached_logits import assert_stepwise_logits_match
from lmport.testing.tiny_models import TINY_MODELS

LENGTHS = [5, 11, 1, 8]
STD = 0.2  # wider than the default 0.08 so that greedy text varies


@pytest.mark.parametrize("alibi_bias_max", [8, 16])
@pytest.mark.parametrize("num_heads", [*range(1, 34), 48, 64, 71])
def test_slopes_equal_transformers(num_heads, alibi_bias_max):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    # transformers' bias for the key one position before the last is -slope
    hf = -build_mpt_alibi_tensor(num_heads, 2, alibi_bias_max)[:, 0, 0]
    assert torch.equal(torch.tensor(mpt_alibi_slopes(num_heads, alibi_bias_max)), hf)


def test_slopes_differ_from_bloom_for_some_head_counts():
    assert mpt_alibi_slopes(8) == bloom_alibi_slopes(8)
    assert mpt_alibi_slopes(12) != bloom_alibi_slopes(12)


@pytest.mark.parametrize("name", ["mpt", "mpt-12-heads"])
def test_mpt_matches_transformers(name, tiny_checkpoint, load_native, random_prompts, assert_matches_hf, cpu_host):
    path, hf_model = tiny_checkpoint(name, std=STD)
    model = load_native(path)
    prompts = random_prompts(LENGTHS)
    assert_matches_hf(hf_model, model, prompts, max_new_tokens=8)
    assert_stepwise_logits_match(hf_model, model, prompts, cpu_host)


def test_clip_qkv_and_softmax_scale(tiny_checkpoint, load_native, random_prompts, assert_matches_hf, cpu_host):
    config = TINY_MODELS["mpt"]()
    config.attn_config.clip_qkv = 0.3
    config.attn_config.softmax_scale = 0.2
    path, hf_model = tiny_checkpoint("mpt-clip-scale", config=config, std=STD)
    model = load_native(path)
    assert model.transformer.blocks[0].attn.clip_qkv == 0.3
    prompts = random_prompts([9, 4])
    assert_matches_hf(hf_model, model, prompts, max_new_tokens=6)
    assert_stepwise_logits_match(hf_model, model, prompts, cpu_host)


@pytest.mark.parametrize("setting", [{"qk_ln": True}, {"alibi": False}])
def test_settings_transformers_ignores_are_refused(setting, tiny_checkpoint, load_native):
    from lmport.models.mpt import MptForCausalLM

    config = TINY_MODELS["mpt"]()
    for key, value in setting.items():
        setattr(config.attn_config, key, value)
    with pytest.raises(NotImplementedError, match=next(iter(setting))):
        MptForCausalLM(config, ctx=None)
