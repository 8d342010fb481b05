"""Native Llama against transformers: greedy tokens and logits over the paged cache."""

from __future__ import annotations

import pytest
import torch

from lmport.layers.rotary import RotaryEmbedding

LENGTHS = [5, 11, 2, 16]


def test_llama_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("llama")
    model = load_native(path)
    assert model.kv_cache_shape() == (2, 2, 16)
    assert_matches_hf(hf_model, model, random_prompts(LENGTHS), max_new_tokens=8)


def test_llama3_rope_scaling_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("llama-rope-scaled")
    model = load_native(path)
    assert model.rotary.rope_type == "llama3"
    # positions past original_max_position_embeddings=64 exercise the scaled low frequencies
    assert_matches_hf(hf_model, model, random_prompts([70, 9, 3]), max_new_tokens=6)


@pytest.mark.parametrize("name, rope_type", [("llama-rope-linear", "linear"), ("llama-rope-dynamic", "dynamic")])
def test_llama_rope_variants_match_transformers(
    name, rope_type, tiny_checkpoint, load_native, random_prompts, assert_matches_hf
):
    path, hf_model = tiny_checkpoint(name)
    model = load_native(path)
    assert model.rotary.rope_type == rope_type
    # dynamic NTK frequencies follow the sequence length (past max_position_embeddings=16);
    # HF derives them from the whole prompt at once, so that prefill is not chunked
    chunks = (None,) if rope_type == "dynamic" else (None, 3)
    assert_matches_hf(hf_model, model, random_prompts([20, 6, 13]), max_new_tokens=6, prefill_chunks=chunks)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
        # longrope switches from short to long factors once a sequence passes 32 tokens
        {"rope_type": "longrope", "factor": 4.0, "short_factor": [1.0 + i / 8 for i in range(8)],
         "long_factor": [2.0 + i for i in range(8)], "original_max_position_embeddings": 32},
    ],
    ids=lambda scaling: scaling["rope_type"],
)
def test_llama_yarn_and_longrope_match_transformers(
    rope_scaling, tiny_checkpoint, load_native, random_prompts, assert_matches_hf
):
    from transformers import LlamaConfig

    from lmport.testing.tiny_models import COMMON

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=128, rope_scaling=rope_scaling, **COMMON)
    path, hf_model = tiny_checkpoint(f"llama-rope-{rope_scaling['rope_type']}", config=config)
    model = load_native(path)
    assert model.rotary.attention_scaling != 1.0  # both scale cos/sin
    # longrope, like dynamic, picks its factors from the whole prompt's length in HF: no chunking
    chunks = (None,) if rope_scaling["rope_type"] == "longrope" else (None, 3)
    assert_matches_hf(hf_model, model, random_prompts([40, 6, 29]), max_new_tokens=6, prefill_chunks=chunks)


def test_llama_bfloat16_close_to_transformers(tiny_checkpoint, load_native, random_prompts, native_last_logits):
    """bf16 runs end to end; its logits stay within bf16 rounding of HF's own bf16 forward."""
    import copy

    path, hf_model = tiny_checkpoint("llama")
    model = load_native(path, dtype=torch.bfloat16)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.rotary.inv_freq.dtype == torch.float32  # frequencies are not rounded to bf16
    prompts = random_prompts([9, 4])
    hf_bf16 = copy.deepcopy(hf_model).to(torch.bfloat16)
    with torch.no_grad():
        want = torch.stack([hf_bf16(torch.tensor([p])).logits[0, -1].float() for p in prompts])
    got = native_last_logits(model, prompts)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.05, rtol=0)


def test_llama_tied_embeddings_and_strict_loading(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    from transformers import LlamaConfig

    from lmport.testing.tiny_models import COMMON

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=True,
                         attention_bias=True, mlp_bias=True, **COMMON)
    path, hf_model = tiny_checkpoint("llama-tied", config=config)
    model = load_native(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert_matches_hf(hf_model, model, random_prompts([7, 4]), max_new_tokens=5)

    state = {name: t.clone() for name, t in hf_model.state_dict().items() if name != "lm_head.weight"}
    with pytest.raises(ValueError, match="lacks 1 tensors: model.layers.0.self_attn.qkv_proj.weight\\[k\\]"):
        model.load_weights((n, t) for n, t in state.items() if n != "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(ValueError, match="unexpected checkpoint tensor 'model.layers.9.mlp.up_proj.weight'"):
        model.load_weights([*state.items(), ("model.layers.9.mlp.up_proj.weight", torch.zeros(128, 64))])
    with pytest.raises(ValueError, match="has shape"):
        model.load_weights([(n, t[:-1] if n == "model.norm.weight" else t) for n, t in state.items()])


def test_rotary_matches_transformers_cos_sin():
    """Our cos/sin equal HF's rotary module for every scaling variant it supports statically."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    positions = torch.arange(0, 300, 7)
    for scaling in (None, {"rope_type": "linear", "factor": 2.0},
                    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 64},
                    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}):
        config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=256, rope_scaling=scaling)
        cos, sin = RotaryEmbedding(config, head_dim=16).cos_sin(positions)
        hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1), positions[None])
        torch.testing.assert_close(cos, hf_cos[0], atol=0, rtol=0)
        torch.testing.assert_close(sin, hf_sin[0], atol=0, rtol=0)
