"""The verify step's rejection sampler: greedy equality, a per-row reference, the target distribution."""

from __future__ import annotations

import pytest
import torch

from lmport.engine.speculative.rejection import verify


def reference(log_probs, drafts, do_sample, generator, draft_probs=None):
    """One row, step by step: the textbook algorithm, drawing in the documented order."""
    probs = log_probs.exp()
    k = len(drafts)
    if not do_sample:
        out = []
        for j in range(k + 1):
            t = int(probs[j].argmax())
            out.append(t)
            if j == k or drafts[j] != t:
                return out
    u = torch.rand(k, generator=generator) if k else torch.empty(0)
    noise = torch.empty(probs.shape[-1]).exponential_(generator=generator).clamp(min=torch.finfo(torch.float32).tiny)
    out = []
    for j in range(k):
        q = 1.0 if draft_probs is None else float(draft_probs[j, drafts[j]])
        if float(u[j]) * q < float(probs[j, drafts[j]]):
            out.append(drafts[j])
            continue
        residual = probs[j].clone()
        if draft_probs is None:
            residual[drafts[j]] = 0
        else:
            residual = (residual - draft_probs[j]).clamp(min=0)
        if residual.sum() <= 0:
            residual = probs[j]
        return out + [int((residual / noise).argmax())]
    return out + [int((probs[k] / noise).argmax())]


def random_case(rows, k_max, vocab, seed, sharp=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k_max + 1, vocab, generator=gen) * sharp
    log_probs = torch.log_softmax(logits, dim=-1)
    # drafts: half the time the target's argmax (so runs get accepted), else random
    best = log_probs.argmax(-1)[:, :k_max]
    rand = torch.randint(0, vocab, (rows, k_max), generator=gen)
    drafts = torch.where(torch.rand(rows, k_max, generator=gen) < 0.6, best, rand)
    num = [int(x) for x in torch.randint(0, k_max + 1, (rows,), generator=gen)]
    return log_probs, drafts, num


@pytest.mark.parametrize("with_q", [False, True])
def test_matches_the_reference_row_by_row(with_q):
    rows, k_max, vocab = 24, 4, 11
    log_probs, drafts, num = random_case(rows, k_max, vocab, seed=3)
    q = torch.softmax(torch.randn(rows, k_max, vocab, generator=torch.Generator().manual_seed(5)), -1) if with_q else None
    do_sample = [r % 3 != 0 for r in range(rows)]
    seeds = [100 + r for r in range(rows)]
    out = verify(log_probs, drafts, num, do_sample, [torch.Generator().manual_seed(s) for s in seeds], q, top_n=2)
    for r in range(rows):
        want = reference(log_probs[r], drafts[r, : num[r]].tolist(), do_sample[r], torch.Generator().manual_seed(seeds[r]),
                         None if q is None else q[r])  # fmt: skip
        a = int(out.num_accepted[r])
        assert out.token_ids[r, : a + 1].tolist() == want, r
        for j, t in enumerate(want):
            assert float(out.logprobs[r, j]) == pytest.approx(float(log_probs[r, j, t]))
        assert out.top_ids[r, 0, 0] == log_probs[r, 0].argmax()


def test_greedy_rows_equal_the_argmax_chain():
    log_probs, drafts, num = random_case(16, 3, 7, seed=1)
    out = verify(log_probs, drafts, num, [False] * 16, [None] * 16)
    for r in range(16):
        a = int(out.num_accepted[r])
        best = log_probs[r].argmax(-1).tolist()
        assert out.token_ids[r, : a + 1].tolist() == best[: a + 1]
        assert drafts[r, :a].tolist() == best[:a]
        assert a == num[r] or drafts[r, a] != best[a]


@pytest.mark.parametrize("with_q", [False, True])
def test_sampled_tokens_follow_the_target_distribution(with_q):
    """20,000 rows of one case: the first token ~ p_0, and after an accepted first draft the second ~ p_1.

    Proposals are drawn from q (one-hot: a fixed draft) as a proposer would. Bounds are 5
    standard deviations of a frequency, so the test fails by chance about once in 10^6 runs.
    """
    torch.manual_seed(0)
    n, vocab = 20_000, 4
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25]])
    log_probs = p.log()[None].expand(n, 3, vocab).contiguous()
    if with_q:
        q = torch.tensor([[0.1, 0.6, 0.2, 0.1], [0.4, 0.4, 0.1, 0.1]])
        drafts = torch.stack([torch.multinomial(q[j], n, replacement=True) for j in range(2)], dim=1)
        draft_probs = q[None].expand(n, 2, vocab).contiguous()
    else:
        drafts = torch.tensor([[1, 3]]).expand(n, 2).contiguous()
        draft_probs = None
    out = verify(log_probs, drafts, [2] * n, [True] * n, [None] * n, draft_probs)
    first = out.token_ids[:, 0]
    freq = torch.bincount(first, minlength=vocab).double() / n
    bound = 5 * (p[0] * (1 - p[0]) / n).sqrt()
    assert ((freq - p[0].double()).abs() <= bound).all(), (freq, p[0])
    # given the first output token was the first draft (accepted), the second follows p_1
    kept = out.num_accepted >= 1
    m = int(kept.sum())
    second = out.token_ids[kept, 1]
    freq = torch.bincount(second, minlength=vocab).double() / m
    bound = 5 * (p[1] * (1 - p[1]) / m).sqrt()
    assert ((freq - p[1].double()).abs() <= bound).all(), (freq, p[1])


def test_no_drafts_samples_from_p0():
    log_probs = torch.log_softmax(torch.randn(3, 1, 5), -1)
    gens = [torch.Generator().manual_seed(1), None, None]
    out = verify(log_probs, torch.zeros(3, 0, dtype=torch.int64), [0, 0, 0], [True, True, False], gens)
    assert out.num_accepted.tolist() == [0, 0, 0]
    assert int(out.token_ids[2, 0]) == int(log_probs[2, 0].argmax())
    g = torch.Generator().manual_seed(1)
    noise = torch.empty(5).exponential_(generator=g)
    assert int(out.token_ids[0, 0]) == int((log_probs[0, 0].exp() / noise).argmax())
