"""Native Phi-3 against transformers: fused qkv/gate_up checkpoints, LongRoPE's short and long
factors, partial rotary, and the all-layer sliding window of the 4k models.

LongRoPE picks its factors per sequence from the sequence's length at each step (cached + new
tokens, as transformers does per forward). Where a sequence *crosses* ``original_max_position_embeddings``
after some of its keys are cached (while generating, or between the chunks of a chunked
prefill), transformers' ``Phi3ForCausalLM`` drops its cache and recomputes the whole sequence
with the long factors; lmport keeps the keys it cached, rotated with the short factors
(docs/models.md). Prompts prefilled in one step that start past the switch point, and
sequences that stay below it, equal transformers exactly.
"""

from __future__ import annotations

from lmport.testing.tiny_models import _phi3

# long factors from 17 positions on; not in TINY_MODELS, whose parity tests (tests/engine, the GPU
# suite) generate across the switch point
LONG_SWITCH = "phi3-long-switch"


def long_switch_checkpoint(tiny_checkpoint):
    return tiny_checkpoint(LONG_SWITCH, config=_phi3(original_max_positions=16))


def test_phi3_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("phi3")
    model = load_native(path)
    assert model.rotary.rope_type == "longrope" and model.rotary.rotary_dim == 12
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9], seed=1), max_new_tokens=10)


def test_phi3_long_factors_match_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = long_switch_checkpoint(tiny_checkpoint)
    model = load_native(path)
    assert model.rotary.original_max_positions == 16
    # 20 and 25 tokens start on the long factors, 5 + 10 stays on the short ones: one batch,
    # each prompt prefilled in one step
    assert_matches_hf(hf_model, model, random_prompts([20, 5, 25], seed=1), max_new_tokens=10, prefill_chunks=(None,))


def test_phi3_long_factors_change_the_output(tiny_checkpoint, random_prompts):
    import torch

    _, short_only = tiny_checkpoint("phi3")
    _, switched = long_switch_checkpoint(tiny_checkpoint)
    prompt = torch.tensor([random_prompts([20], seed=1)[0]])
    with torch.no_grad():
        # same weights (same seed and shapes); only the factors in use differ past 16 positions
        assert not torch.allclose(short_only(prompt).logits[0, -1], switched(prompt).logits[0, -1], atol=1e-3)


def test_phi3_sliding_window_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("phi3-window")
    model = load_native(path)
    assert {layer.self_attn.attn.spec.sliding_window for layer in model.model.layers} == {7}
    assert_matches_hf(hf_model, model, random_prompts([15, 4, 9], seed=2), max_new_tokens=8)
