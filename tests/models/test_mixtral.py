"""Native Mixtral (top-2 MoE) against transformers."""

from __future__ import annotations

import torch


def test_mixtral_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("mixtral")
    model = load_native(path)
    experts = model.model.layers[0].mlp.experts
    assert len(experts.w13) == 4 and experts.w13[0].weight.shape == (2 * 96, 64)
    assert_matches_hf(hf_model, model, random_prompts([6, 13, 3]), max_new_tokens=8)


def test_mixtral_loads_stacked_expert_names(tiny_checkpoint, load_native, random_prompts):
    """transformers 5.x names experts stacked in memory (``mlp.experts.gate_up_proj``); 4.x per expert. Both load."""
    path, hf_model = tiny_checkpoint("mixtral")
    reference = load_native(path)
    model = load_native(path)
    for param in model.parameters():
        param.data.zero_()
    model.load_weights((name, tensor.clone()) for name, tensor in hf_model.state_dict().items())
    for (name, want), (_, got) in zip(reference.state_dict().items(), model.state_dict().items()):
        torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)


def test_moe_routes_each_token_to_its_top_experts():
    """FusedMoE equals a per-token loop over the chosen experts (an independent, slow formula)."""
    from lmport.layers.moe import FusedMoE

    torch.manual_seed(0)
    moe = FusedMoE(num_experts=5, top_k=2, hidden_size=8, intermediate_size=6)
    for layer in [*moe.w13, *moe.w2]:
        torch.nn.init.normal_(layer.weight, std=0.3)
    hidden, router = torch.randn(11, 8), torch.randn(11, 5)
    expected = torch.zeros(11, 8)
    for t in range(11):
        probs = router[t].softmax(-1)
        top = probs.topk(2)
        for weight, e in zip(top.values / top.values.sum(), top.indices):
            gate, up = (moe.w13[e].weight @ hidden[t]).chunk(2)
            expected[t] += weight * (moe.w2[e].weight @ (torch.nn.functional.silu(gate) * up))
    torch.testing.assert_close(moe(hidden, router), expected, atol=1e-5, rtol=1e-5)
