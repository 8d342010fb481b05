"""The batched processors against transformers' own processors, row by row, in one mixed batch."""

from __future__ import annotations

import collections

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from lmport.engine.api import SamplingParams
from lmport.engine.sampling import processors as P
from lmport.engine.sampling.sampler import Sampler
from lmport.engine.sampling.state import SamplingRow

VOCAB = 300


def hf_reference(logits: torch.Tensor, row: SamplingRow) -> torch.Tensor:
    """transformers' processors for one row, in ``generate``'s order."""
    p = row.params
    chain = LogitsProcessorList()
    if p.repetition_penalty not in (None, 1.0):
        chain.append(RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    scores = logits[None].clone()
    ids = torch.tensor([row.prompt_token_ids + row.output_token_ids])
    scores = chain(ids, scores)
    # OpenAI's frequency/presence penalties have no transformers processor: the definition itself
    counts = collections.Counter(row.output_token_ids)
    for token, count in counts.items():
        scores[0, token] -= count * (p.frequency_penalty or 0.0) + (p.presence_penalty or 0.0)
    if p.do_sample:
        warpers = LogitsProcessorList()
        if p.temperature not in (None, 1.0):
            warpers.append(TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            warpers.append(TopKLogitsWarper(p.top_k))
        if p.top_p not in (None, 1.0):
            warpers.append(TopPLogitsWarper(p.top_p))
        if p.typical_p not in (None, 1.0):
            warpers.append(TypicalLogitsWarper(p.typical_p))
        scores = warpers(ids, scores)
    return scores[0]


def mixed_rows(seed: int = 0) -> list[SamplingRow]:
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(0, VOCAB, (n,), generator=gen).tolist()

    params = [
        SamplingParams(),  # greedy, nothing
        SamplingParams(repetition_penalty=1.3),  # greedy with a penalty
        SamplingParams(do_sample=True, temperature=0.7),
        SamplingParams(do_sample=True, top_k=5),
        SamplingParams(do_sample=True, top_p=0.8),
        SamplingParams(do_sample=True, typical_p=0.6),
        SamplingParams(do_sample=True, temperature=1.4, top_k=40, top_p=0.9, typical_p=0.95, repetition_penalty=1.2),
        SamplingParams(do_sample=True, top_p=0.3, frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(do_sample=True, temperature=0.5, top_k=1),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=1.0),  # greedy, OpenAI penalties
        SamplingParams(do_sample=True, temperature=0.9, typical_p=0.2, repetition_penalty=0.8),
    ]
    return [SamplingRow(p, tokens(7), tokens(5 + i), None) for i, p in enumerate(params)]


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=gen) * 3.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processed_distribution_matches_transformers(seed):
    rows = mixed_rows(seed)
    logits = random_logits(len(rows), seed)
    processed = Sampler().process(logits, rows)
    for i, row in enumerate(rows):
        expected = hf_reference(logits[i], row)
        assert torch.equal(torch.isinf(processed[i]), torch.isinf(expected)), f"row {i}: different tokens filtered"
        torch.testing.assert_close(processed[i].softmax(-1), expected.softmax(-1), rtol=1e-5, atol=1e-6)


def test_filtering_actually_happens():
    rows = mixed_rows()
    processed = Sampler().process(random_logits(len(rows)), rows)
    kept = torch.isfinite(processed).sum(-1).tolist()
    assert kept[0] == kept[1] == kept[2] == VOCAB  # greedy / temperature only: nothing filtered
    assert kept[3] == 5 and kept[8] == 1
    assert 1 < kept[4] < VOCAB and 1 <= kept[5] < VOCAB


@pytest.mark.parametrize("start", [1, 2, 7, VOCAB])
def test_candidate_search_gives_the_full_sort_answer(start):
    """Top-p / typical-p from a tiny first candidate set equal the full-vocabulary answer."""
    logits = random_logits(6, seed=5) * 0.3  # flat: the mass needs many candidates
    top_p = torch.tensor([0.1, 0.5, 0.9, 0.99, 0.999, 0.7])
    for row in range(6):
        expected_p = TopPLogitsWarper(float(top_p[row]))(None, logits[row : row + 1].clone())[0]
        expected_t = TypicalLogitsWarper(float(top_p[row]))(None, logits[row : row + 1].clone())[0]
        got_p = P.apply_top_p(logits, top_p, start=start)[row]
        got_t = P.apply_typical_p(logits, top_p, start=start)[row]
        assert torch.equal(torch.isinf(got_p), torch.isinf(expected_p))
        assert torch.equal(torch.isinf(got_t), torch.isinf(expected_t))


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    got = P.apply_top_k(logits, torch.tensor([2, 3]), max_k=3)
    for row, k in enumerate([2, 3]):
        expected = TopKLogitsWarper(k)(None, logits[row : row + 1].clone())[0]
        assert torch.equal(got[row], expected)


def test_repetition_penalty_counts_prompt_and_output_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    row = SamplingRow(SamplingParams(repetition_penalty=2.0), [0, 0, 1], [1, 0], None)
    expected = RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0, 0, 1, 1, 0]]), logits.clone())
    assert torch.equal(Sampler().process(logits, [row]), expected)
