"""The watermark: TGI's green lists, applied only where asked, and detectable afterwards."""

from __future__ import annotations

import torch

from lmport.engine.api import SamplingParams
from lmport.engine.sampling.sampler import Sampler
from lmport.engine.sampling.state import SamplingRow, make_generator
from lmport.engine.sampling.watermark import greenlist_mask, watermark_z_score

VOCAB = 1000


def tgi_greenlist(previous_token: int, vocab: int) -> set[int]:
    """TGI's ``WatermarkLogitsProcessor._get_greenlist_ids`` (gamma 0.5, hash key 15485863), on CPU."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(15485863 * previous_token)
    return set(torch.randperm(vocab, generator=rng)[: int(vocab * 0.5)].tolist())


def test_green_lists_are_tgis():
    for previous in (0, 1, 17, 999):
        mask = greenlist_mask(previous, VOCAB)
        assert set(mask.nonzero().flatten().tolist()) == tgi_greenlist(previous, VOCAB)


def test_watermark_adds_delta_to_the_green_list_of_the_last_token():
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    rows = [
        SamplingRow(SamplingParams(watermark=True), [5, 9], [], None),  # previous token: last of the prompt
        SamplingRow(SamplingParams(), [5, 9], [], None),
        SamplingRow(SamplingParams(watermark=True), [5], [42, 7], None),  # previous token: last output
    ]
    processed = Sampler().process(logits, rows)
    for row, previous in ((0, 9), (2, 7)):
        green = torch.zeros(VOCAB)
        green[list(tgi_greenlist(previous, VOCAB))] = 2.0
        torch.testing.assert_close(processed[row], logits[row] + green)
    assert torch.equal(processed[1], logits[1])


def _generate(watermark: bool, seed: int, steps: int = 60) -> list[int]:
    # flat logits: the text is as free as it gets, so only the watermark shapes it
    logits = torch.zeros(1, VOCAB)
    row = SamplingRow(SamplingParams(do_sample=True, watermark=watermark, seed=seed), [3], [], make_generator(seed, "cpu"))
    for _ in range(steps):
        row.output_token_ids.append(int(Sampler().sample(logits.clone(), [row]).token_ids[0]))
    return [3] + row.output_token_ids


def test_watermarked_text_is_detected_and_plain_text_is_not():
    for seed in range(3):
        assert watermark_z_score(_generate(True, seed), VOCAB) > 4.0
        assert abs(watermark_z_score(_generate(False, seed), VOCAB)) < 4.0
