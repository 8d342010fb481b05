"""Native Falcon (7B, 40B, RW layouts; rotary and ALiBi) against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from lmport.models.base import ModelInfo
from lmport.models.falcon import FalconLayout, falcon_alibi_slopes
from lmport.models.loader import build_native_model
from lmport.testing.cached_logits import assert_stepwise_logits_match, native_last_logits
from lmport.testing.tiny_models import TINY_MODELS

LENGTHS = [5, 11, 1, 8]


def variant(name: str, **changes):
    config = TINY_MODELS[name]()
    for key, value in changes.items():
        setattr(config, key, value)
    return config


@pytest.mark.parametrize(
    "name, kv_heads",
    [("falcon-7b", 1), ("falcon-40b", 2), ("falcon-rw", 4)],
)
def test_falcon_matches_transformers(
    name, kv_heads, tiny_checkpoint, load_native, random_prompts, assert_matches_hf, cpu_host
):
    path, hf_model = tiny_checkpoint(name)
    model = load_native(path)
    assert model.kv_cache_shape() == (2, kv_heads, 16)
    assert (model.rotary is None) == (name == "falcon-rw")
    prompts = random_prompts(LENGTHS)
    assert_matches_hf(hf_model, model, prompts, max_new_tokens=8)
    assert_stepwise_logits_match(hf_model, model, prompts, cpu_host)


@pytest.mark.parametrize(
    "name, base, changes",
    [
        # Falcon2-11B style: new decoder architecture with one shared LayerNorm
        ("falcon-40b-one-ln", "falcon-40b", {"num_ln_in_parallel_attn": 1}),
        # 40B layout with 8 query heads per K/V head: the grouped fused QKV order matters
        ("falcon-40b-one-kv", "falcon-40b", {"num_kv_heads": 1, "num_attention_heads": 8}),
        # RW blocks (per-head fused QKV, sequential) with rotary instead of ALiBi
        ("falcon-rw-rotary", "falcon-rw", {"alibi": False}),
        # 7B layout with a wider, non-default MLP and biases
        ("falcon-7b-ffn-bias", "falcon-7b", {"ffn_hidden_size": 96, "bias": True}),
    ],
)
def test_falcon_variants_match_transformers(
    name, base, changes, tiny_checkpoint, load_native, random_prompts, assert_matches_hf, cpu_host
):
    path, hf_model = tiny_checkpoint(name, config=variant(base, **changes))
    model = load_native(path)
    prompts = random_prompts([7, 3, 10])
    assert_matches_hf(hf_model, model, prompts, max_new_tokens=6)
    assert_stepwise_logits_match(hf_model, model, prompts, cpu_host)


@pytest.mark.parametrize("num_heads, head_dim", [(4, 16), (6, 8), (32, 64), (71, 64)])
def test_alibi_slopes_equal_transformers(num_heads, head_dim):
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    # transformers' bias for key position 1 is the (bfloat16) slope; Falcon divides it by sqrt(head_dim)
    hf = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), num_heads, torch.float32)[:, 0, 1]
    expected = hf / math.sqrt(head_dim)
    torch.testing.assert_close(torch.tensor(falcon_alibi_slopes(num_heads, head_dim)), expected, rtol=1e-6, atol=0)


def test_refinedweb_config_spelling_loads_the_same_model(tiny_checkpoint, load_native, random_prompts, cpu_host):
    """Older RefinedWeb exports (RWForCausalLM) spell the config n_head/n_head_kv/n_layer; 40B implies the new layout."""
    from transformers import PretrainedConfig

    path, hf_model = tiny_checkpoint("falcon-40b")
    c = hf_model.config
    rw_config = PretrainedConfig(
        model_type="RefinedWeb", architectures=["RWForCausalLM"], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        n_head=c.num_attention_heads, n_head_kv=c.num_kv_heads, n_layer=c.num_hidden_layers, bias=False,
        parallel_attn=True, alibi=False, layer_norm_epsilon=c.layer_norm_epsilon,
    )
    layout = FalconLayout.from_config(rw_config)
    assert layout.new_decoder_architecture and layout.two_layernorms and layout.num_kv_heads == c.num_kv_heads
    info = ModelInfo(model_id="rw", path=path, hf_config=rw_config, architecture="RWForCausalLM")
    rw_model = build_native_model(info, cpu_host, torch.float32, torch.device("cpu"))
    prompts = random_prompts([6, 9])
    torch.testing.assert_close(
        native_last_logits(rw_model, prompts, cpu_host), native_last_logits(load_native(path), prompts, cpu_host)
    )
