"""Native Mistral against transformers, with prompts and generations longer than the window of 7."""

from __future__ import annotations


def test_mistral_sliding_window_matches_transformers(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    path, hf_model = tiny_checkpoint("mistral")
    model = load_native(path)
    assert hf_model.config.sliding_window == 7
    assert model.model.layers[0].self_attn.attn.spec.sliding_window == 7
    assert_matches_hf(hf_model, model, random_prompts([12, 5, 20, 9], seed=1), max_new_tokens=10)


def test_mistral_window_changes_the_output(tiny_checkpoint, load_native, random_prompts, assert_matches_hf):
    """Guard against a test that passes because the window never mattered: without it, logits differ."""
    import torch

    from lmport.testing.tiny_models import _mistral

    config = _mistral()
    config.sliding_window = None
    path, hf_unwindowed = tiny_checkpoint("mistral-no-window", config=config)
    _, hf_windowed = tiny_checkpoint("mistral")
    prompt = torch.tensor([random_prompts([15])[0]])
    with torch.no_grad():
        assert not torch.allclose(hf_unwindowed(prompt).logits[0, -1], hf_windowed(prompt).logits[0, -1], atol=1e-3)
    model = load_native(path)
    assert model.model.layers[0].self_attn.attn.spec.sliding_window is None
    assert_matches_hf(hf_unwindowed, model, random_prompts([15, 4]), max_new_tokens=6, prefill_chunks=(3,))
