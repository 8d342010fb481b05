"""Native GPT-2 against transformers (Conv1D weights, learned positions, tied head)."""

from __future__ import annotations

import pytest
import torch


def test_gpt2_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("gpt2")
    model = load_native(path)
    assert model.lm_head.weight is model.transformer.wte.weight
    assert_matches_hf(hf_model, model, random_prompts([5, 12, 2, 9]), max_new_tokens=8)


def test_gpt2_inverse_layer_scaling_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    from lmport.testing.tiny_models import TINY_MODELS

    config = TINY_MODELS["gpt2"]()
    config.scale_attn_by_inverse_layer_idx = True
    config.activation_function = "gelu"
    path, hf_model = tiny_checkpoint("gpt2-inverse-layer-scale", config=config)
    # transformers 4.55's SDPA path ignores scale_attn_by_inverse_layer_idx (only eager applies it)
    hf_model.config._attn_implementation = "eager"
    assert_matches_hf(hf_model, load_native(path), random_prompts([7, 3]), max_new_tokens=6)


def test_gpt2_loads_bare_names_and_skips_mask_buffers(tiny_checkpoint, load_native):
    """Old GPT-2 exports have no ``transformer.`` prefix and carry ``attn.bias`` mask buffers."""
    path, hf_model = tiny_checkpoint("gpt2")
    reference = load_native(path)
    model = load_native(path)
    bare = [(n.removeprefix("transformer."), t.clone()) for n, t in hf_model.state_dict().items() if n != "lm_head.weight"]
    bare.append(("h.0.attn.bias", torch.ones(1, 1, 512, 512)))
    model.load_weights(bare)
    for (name, want), (_, got) in zip(reference.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
    with pytest.raises(ValueError, match="unexpected checkpoint tensor 'h.0.attn.rotary'"):
        model.load_weights([*bare, ("h.0.attn.rotary", torch.ones(1))])
