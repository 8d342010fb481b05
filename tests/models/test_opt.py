"""Native OPT / Galactica against transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from lmport.testing.hf_parity import assert_native_matches_transformers, cpu_host, load_native
from lmport.testing.tiny_models import TINY_MODELS, make_checkpoint


@pytest.mark.parametrize("name", ["opt", "galactica", "opt-350m"])
def test_greedy_and_logits_match_transformers(name, tmp_path):
    hf_model = make_checkpoint(name, tmp_path, std=0.2)
    assert_native_matches_transformers(hf_model, tmp_path)


def test_untied_head_and_bias_free_variant(tmp_path):
    config = TINY_MODELS["galactica"]()
    config.tie_word_embeddings = False
    config.enable_bias = False
    hf_model = make_checkpoint("galactica", tmp_path, config=config, std=0.2)
    assert "lm_head.weight" in hf_model.state_dict()
    assert_native_matches_transformers(hf_model, tmp_path, prompt_lengths=(7, 2))


def test_older_export_names_without_model_prefix_load(tmp_path):
    """facebook/opt-* checkpoints name tensors "decoder.…"; they must load like "model.decoder.…"."""
    make_checkpoint("opt", tmp_path)
    model = load_native(tmp_path, cpu_host())
    renamed = [(name.removeprefix("model."), p.detach().clone()) for name, p in model.named_parameters()]
    fresh = load_native(tmp_path, cpu_host())
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_weights(renamed)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name


def test_unexpected_and_missing_tensors_are_errors(tmp_path):
    make_checkpoint("opt", tmp_path)
    model = load_native(tmp_path, cpu_host())
    weights = [(name, p.detach().clone()) for name, p in model.named_parameters()]
    with pytest.raises(ValueError, match="unexpected"):
        model.load_weights(weights + [("model.decoder.layers.9.fc1.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="lacks"):
        model.load_weights(weights[1:])
