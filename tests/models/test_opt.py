"""Native OPT / Galactica against transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from lmport.testing.cached_logits import assert_stepwise_logits_match
from lmport.testing.tiny_models import TINY_MODELS

LENGTHS = [5, 11, 1, 8]
STD = 0.2  # at the default 0.08 these tiny OPTs repeat one token; wider weights give varied text


@pytest.mark.parametrize("name", ["opt", "galactica", "opt-350m"])
def test_opt_matches_transformers(name, tiny_checkpoint, load_native, random_prompts, assert_matches_hf, cpu_host):
    path, hf_model = tiny_checkpoint(name, std=STD)
    model = load_native(path)
    prompts = random_prompts(LENGTHS)
    assert_matches_hf(hf_model, model, prompts, max_new_tokens=8)
    assert_stepwise_logits_match(hf_model, model, prompts, cpu_host)


def test_opt_350m_layout_is_post_norm_with_projections(tiny_checkpoint, load_native):
    path, _ = tiny_checkpoint("opt-350m", std=STD)
    decoder = load_native(path).model.decoder
    assert decoder.project_in is not None and decoder.project_out is not None
    assert decoder.final_layer_norm is None and not decoder.layers[0].pre_norm


def test_untied_head_without_biases(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    config = TINY_MODELS["galactica"]()
    config.tie_word_embeddings = False
    config.enable_bias = False
    path, hf_model = tiny_checkpoint("galactica-untied-nobias", config=config, std=STD)
    assert "lm_head.weight" in hf_model.state_dict()
    model = load_native(path)
    assert model.lm_head.weight is not model.model.decoder.embed_tokens.weight
    assert_matches_hf(hf_model, model, random_prompts([7, 2]), max_new_tokens=6)


def test_older_export_names_without_model_prefix_load(tiny_checkpoint, load_native):
    """facebook/opt-* checkpoints name tensors "decoder.…"; they load like "model.decoder.…"."""
    path, _ = tiny_checkpoint("opt", std=STD)
    model, fresh = load_native(path), load_native(path)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_weights((name.removeprefix("model."), p.detach().clone()) for name, p in model.named_parameters())
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_unexpected_and_missing_tensors_are_errors(tiny_checkpoint, load_native):
    path, _ = tiny_checkpoint("opt", std=STD)
    model = load_native(path)
    weights = [(name, p.detach().clone()) for name, p in model.named_parameters()]
    with pytest.raises(ValueError, match="unexpected"):
        model.load_weights(weights + [("model.decoder.layers.9.fc1.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="lacks"):
        model.load_weights(weights[1:])
