"""Native Gemma 2 and Gemma 3 (text) against transformers: interleaved sliding-window and global
layers, Gemma 3's per-kind RoPE and QK-norm, Gemma 2's attention and final-logit soft-caps."""

from __future__ import annotations

import torch


def test_gemma2_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("gemma2")
    model = load_native(path)
    specs = [layer.self_attn.attn.spec for layer in model.model.layers]
    assert [s.sliding_window for s in specs] == [4, None, 4, None]
    assert {s.logits_soft_cap for s in specs} == {2.0} and {s.scale for s in specs} == {24**-0.5}
    assert model.final_soft_cap == 3.0
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9], seed=1), max_new_tokens=10)


def test_gemma3_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("gemma3")
    model = load_native(path)
    assert [layer.self_attn.attn.spec.sliding_window for layer in model.model.layers] == [5, 5, None, 5]
    assert model.model.layers[0].self_attn.q_norm is not None
    full, local = model.rotary["full_attention"], model.rotary["sliding_attention"]
    assert (full.rope_type, local.rope_type) == ("linear", "default") and full is not local
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9, 1], seed=2), max_new_tokens=10)


def test_gemma_features_change_the_output(tiny_checkpoint, random_prompts):
    """The tiny configs exercise what they claim: without the soft-caps, the window or the
    per-kind RoPE, transformers' own logits move (so the equality above is not vacuous)."""
    from transformers import AutoModelForCausalLM

    from lmport.testing.tiny_models import TINY_MODELS, widen_init

    prompt = torch.tensor([random_prompts([15], seed=3)[0]])
    changes = {
        "gemma2": [{"attn_logit_softcapping": None}, {"final_logit_softcapping": None}, {"sliding_window": 64}],
        "gemma3": [{"sliding_window": 64},
                   {"rope_parameters": {k: {"rope_type": "default", "rope_theta": 10000.0}
                                        for k in ("full_attention", "sliding_attention")}}],
    }  # fmt: skip
    for name, variants in changes.items():
        _, reference = tiny_checkpoint(name)
        with torch.no_grad():
            base = reference(prompt).logits[0, -1]
            for change in variants:
                config = TINY_MODELS[name]()
                for key, value in change.items():
                    setattr(config, key, value)
                variant = AutoModelForCausalLM.from_config(config).eval()
                variant.load_state_dict(reference.state_dict())
                assert not torch.allclose(variant(prompt).logits[0, -1], base, atol=1e-3), (name, change)
