"""The sampler's choices: greedy, seeded reproducibility, sample statistics, logprobs, top-n."""

from __future__ import annotations

import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from lmport.engine.api import SamplingParams
from lmport.engine.sampling import compute_prompt_logprobs
from lmport.engine.sampling.sampler import Sampler
from lmport.engine.sampling.state import SamplingRow, make_generator

VOCAB = 50


def logits_for(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0


def test_greedy_rows_take_the_argmax_and_report_raw_logprobs():
    logits = logits_for(3)
    rows = [
        SamplingRow(SamplingParams(), [1, 2], [], None),
        SamplingRow(SamplingParams(repetition_penalty=5.0), [int(logits[1].argmax())], [], None),
        SamplingRow(SamplingParams(top_n_tokens=3), [4], [], None),
    ]
    out = Sampler().sample(logits, rows)
    penalized = RepetitionPenaltyLogitsProcessor(5.0)(torch.tensor([rows[1].prompt_token_ids]), logits[1:2].clone())[0]
    assert out.token_ids.tolist() == [int(logits[0].argmax()), int(penalized.argmax()), int(logits[2].argmax())]
    assert out.token_ids[1] != logits[1].argmax()  # the penalty changed the choice
    raw = torch.log_softmax(logits, -1)
    torch.testing.assert_close(out.logprobs[0], raw[0, out.token_ids[0]])
    torch.testing.assert_close(out.logprobs[1], torch.log_softmax(penalized, -1)[out.token_ids[1]])
    assert out.token_ids.dtype == torch.int64 and out.logprobs.dtype == torch.float32


def test_top_n_tokens_are_the_best_of_the_reported_distribution():
    logits = logits_for(2, seed=3)
    rows = [
        SamplingRow(SamplingParams(top_n_tokens=4), [1], [], None),
        SamplingRow(SamplingParams(do_sample=True, top_k=3, top_n_tokens=2, seed=1), [1], [], make_generator(1, "cpu")),
    ]
    out = Sampler().sample(logits, rows)
    assert out.top_ids.shape == (2, 4) and out.top_logprobs.shape == (2, 4)
    raw = torch.log_softmax(logits[0], -1)
    assert out.top_ids[0].tolist() == raw.topk(4).indices.tolist()
    torch.testing.assert_close(out.top_logprobs[0], raw.topk(4).values)
    warped = torch.log_softmax(TopKLogitsWarper(3)(None, logits[1:2].clone())[0], -1)
    assert out.top_ids[1, :3].tolist() == warped.topk(3).indices.tolist()
    torch.testing.assert_close(out.top_logprobs[1, :3], warped.topk(3).values)
    assert out.top_logprobs[1, 3] == float("-inf")  # filtered by top-k
    assert out.token_ids[1].item() in out.top_ids[1, :3].tolist()
    torch.testing.assert_close(out.logprobs[1], warped[out.token_ids[1]])


def test_no_top_n_means_no_top_tensors():
    out = Sampler().sample(logits_for(1), [SamplingRow(SamplingParams(), [1], [], None)])
    assert out.top_ids is None and out.top_logprobs is None


def _draw_sequence(seed: int, others: int, steps: int = 12) -> list[int]:
    """Tokens drawn by a seeded row at ``steps`` steps, with ``others`` unseeded rows around it."""
    row = SamplingRow(SamplingParams(do_sample=True, temperature=1.5, seed=seed), [3], [], make_generator(seed, "cpu"))
    sampler = Sampler()
    drawn = []
    for step in range(steps):
        extra = [SamplingRow(SamplingParams(do_sample=True), [3], [], None) for _ in range(others)]
        batch = extra[: others // 2] + [row] + extra[others // 2 :]
        logits = logits_for(len(batch), seed=100 + step)
        logits[others // 2] = logits_for(1, seed=step)[0]  # the seeded row's logits are the same in every run
        out = sampler.sample(logits, batch)
        token = int(out.token_ids[others // 2])
        row.output_token_ids.append(token)
        drawn.append(token)
    return drawn


def test_same_seed_same_tokens_whatever_the_batch():
    alone = _draw_sequence(seed=7, others=0)
    assert _draw_sequence(seed=7, others=5) == alone
    assert _draw_sequence(seed=7, others=2) == alone
    assert _draw_sequence(seed=8, others=0) != alone


def test_sample_frequencies_follow_the_processed_distribution():
    """Many independent draws from one distribution: frequencies within a few standard errors."""
    base = torch.randn(VOCAB, generator=torch.Generator().manual_seed(11))
    params = SamplingParams(do_sample=True, temperature=0.8, top_p=0.9)
    n = 20000
    rows = [SamplingRow(params, [1], [], None) for _ in range(n)]
    torch.manual_seed(0)
    out = Sampler().sample(base.expand(n, VOCAB).clone(), rows)
    freq = torch.bincount(out.token_ids, minlength=VOCAB).float() / n
    expected = TopPLogitsWarper(0.9)(None, (base / 0.8)[None].clone())[0].softmax(-1)
    stderr = (expected * (1 - expected) / n).sqrt()
    assert torch.all((freq - expected).abs() <= 5 * stderr + 1e-4)
    assert torch.all(freq[expected == 0] == 0)  # nothing outside top-p is ever drawn


def test_seeded_rows_also_follow_the_distribution():
    base = torch.tensor([0.0, 1.0, 2.0, -1.0])
    counts = torch.zeros(4)
    for seed in range(2000):
        row = SamplingRow(SamplingParams(do_sample=True, seed=seed), [0], [], make_generator(seed, "cpu"))
        counts[Sampler().sample(base[None].clone(), [row]).token_ids[0]] += 1
    expected = base.softmax(-1)
    stderr = (expected * (1 - expected) / 2000).sqrt()
    assert torch.all((counts / 2000 - expected).abs() <= 5 * stderr)


def test_make_generator_without_seed_is_none():
    assert make_generator(None, "cpu") is None
    a, b = make_generator(5, "cpu"), make_generator(5, torch.device("cpu"))
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))


def test_prompt_logprobs_match_cross_entropy():
    logits = logits_for(6, seed=4)
    targets = torch.tensor([3, 1, 4, 1, 5, 9])
    logprobs, top_ids, top_logprobs = compute_prompt_logprobs(logits, targets, top_n=2)
    expected = -torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    torch.testing.assert_close(logprobs, expected)
    assert top_ids.tolist() == logits.topk(2).indices.tolist()
    torch.testing.assert_close(top_logprobs, torch.log_softmax(logits, -1).topk(2).values)
    assert compute_prompt_logprobs(logits, targets, 0)[1:] == (None, None)
