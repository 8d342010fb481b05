"""The verify step's choice of tokens: which draft tokens to keep and the token after them.

Each speculative row fed its last known token and ``k_r`` draft tokens, so the target gave
``k_r + 1`` next-token distributions ``p_0 .. p_k`` (processed: temperature, top-k, top-p ...
exactly as the plain sampler processes a row). The output is the accepted drafts and one
more token, distributed exactly as the target's own one-token-at-a-time sampling:

* **Greedy rows**: ``t_j = argmax p_j``; draft ``d_j`` is kept while it equals ``t_j``, and the
  token after the kept run is ``t_a``. The output equals non-speculative greedy decoding token
  for token (each ``t_j`` is the argmax after the tokens before it).
* **Sampling rows** (Leviathan et al. 2023, Chen et al. 2023): draft ``d_j``, proposed with
  probability ``q_j(d_j)``, is kept when ``u_j * q_j(d_j) < p_j(d_j)`` (``u_j ~ U[0, 1)``), i.e.
  with probability ``min(1, p/q)``; at the first rejection ``a`` the next token is drawn from
  the residual ``max(p_a - q_a, 0)``, and if every draft is kept, from ``p_k`` (the bonus token).
  A deterministic proposer (n-gram lookup, a greedy draft model) has ``q_j = one_hot(d_j)``
  (``draft_probs=None``): keep with probability ``p_j(d_j)``, resample from ``p_a`` without ``d_a``.

Random numbers: a row with a seeded generator draws ``k_r`` uniforms, then one exponential per
vocabulary entry for the final token (the plain sampler's exponential race), always in that
order, so a seeded request is reproducible whatever else is in the batch. Rows without one use
the global generator in one batched draw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VerifyOutput:
    """Per row: the output tokens (``num_accepted + 1`` valid, padded) and their logprobs."""

    token_ids: torch.Tensor  # int64 [rows, K+1]
    num_accepted: torch.Tensor  # int64 [rows]: kept drafts; the row emits num_accepted + 1 tokens
    logprobs: torch.Tensor  # float32 [rows, K+1]: log p_j(token_j), the processed target distribution
    top_ids: torch.Tensor | None = None  # int64 [rows, K+1, n]
    top_logprobs: torch.Tensor | None = None  # float32 [rows, K+1, n]


def verify(
    log_probs: torch.Tensor,
    draft_ids: torch.Tensor,
    num_drafts: list[int],
    do_sample: list[bool],
    generators: list[torch.Generator | None],
    draft_probs: torch.Tensor | None = None,
    top_n: int = 0,
) -> VerifyOutput:
    """Choose the tokens of ``rows`` speculative rows.

    ``log_probs``: ``[rows, K+1, V]`` float32, the processed target log-distributions (rows past
    ``num_drafts[r] + 1`` are padding and never read for output). ``draft_ids``: ``[rows, K]``
    int64 (padding past ``num_drafts[r]``). ``draft_probs``: ``[rows, K, V]`` proposal
    distributions, or None for deterministic proposals. Nothing is synced to the host.
    """
    rows, width, vocab = log_probs.shape
    k_max = width - 1
    device = log_probs.device
    probs = log_probs.exp()
    lengths = torch.tensor(num_drafts, dtype=torch.int64).to(device, non_blocking=True)
    in_range = torch.arange(k_max, device=device)[None, :] < lengths[:, None]  # [rows, K]
    greedy_tokens = log_probs.argmax(dim=-1)  # [rows, K+1]

    sampled = [r for r in range(rows) if do_sample[r]]
    if not sampled:
        accept = (draft_ids == greedy_tokens[:, :k_max]) & in_range
        num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)
        return _output(log_probs, greedy_tokens, num_accepted, top_n)

    uniforms = torch.empty(rows, max(k_max, 1), device=device)
    noise = torch.empty(rows, vocab, device=device)
    _draw(uniforms, noise, sampled, num_drafts, generators)
    uniforms = uniforms[:, :k_max]

    p_draft = probs[:, :k_max].gather(2, draft_ids[:, :, None]).squeeze(2)  # p_j(d_j)
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, draft_ids[:, :, None]).squeeze(2)
    sample_mask = torch.zeros(rows, dtype=torch.bool, device=device)
    sample_mask[torch.tensor(sampled, device=device)] = True
    accept_sampled = uniforms * q_draft < p_draft
    accept_greedy = draft_ids == greedy_tokens[:, :k_max]
    accept = torch.where(sample_mask[:, None], accept_sampled, accept_greedy) & in_range
    num_accepted = accept.to(torch.int64).cumprod(dim=1).sum(dim=1)

    # the final token of a sampling row: from the residual at the first rejection, else p_k
    at = num_accepted[:, None, None].expand(rows, 1, vocab)
    final_p = probs.gather(1, at).squeeze(1)  # p_a
    rejected = num_accepted < lengths
    if k_max == 0:
        residual = final_p
    elif draft_probs is None:
        residual = final_p.clone()
        drop = draft_ids.gather(1, num_accepted.clamp(max=max(k_max - 1, 0))[:, None])
        residual.scatter_(1, drop, 0.0)
    else:
        q_at = draft_probs.gather(1, num_accepted.clamp(max=max(k_max - 1, 0))[:, None, None].expand(rows, 1, vocab))
        residual = (final_p - q_at.squeeze(1)).clamp(min=0.0)
    # a residual of no mass (p == q, so the rejection had probability 0): fall back to p_a
    empty = residual.sum(dim=1) <= 0
    use_residual = (rejected & ~empty)[:, None]
    weights = torch.where(use_residual, residual, final_p)
    noise.clamp_(min=torch.finfo(noise.dtype).tiny)
    final = (weights / noise).argmax(dim=1)

    positions = torch.arange(width, device=device)[None, :]
    drafts = torch.cat([draft_ids, draft_ids[:, :1]], dim=1) if k_max else draft_ids.new_zeros(rows, 1)
    sampled_tokens = torch.where(positions == num_accepted[:, None], final[:, None], drafts)
    tokens = torch.where(sample_mask[:, None], sampled_tokens, greedy_tokens)
    return _output(log_probs, tokens, num_accepted, top_n)


def _draw(uniforms: torch.Tensor, noise: torch.Tensor, sampled: list[int], num_drafts: list[int], generators) -> None:
    """Fill the sampling rows' uniforms and exponential noise (seeded rows from their generators)."""
    unseeded = [r for r in sampled if generators[r] is None]
    if unseeded:
        index = torch.tensor(unseeded, device=uniforms.device)
        uniforms[index] = torch.rand(len(unseeded), uniforms.shape[1], device=uniforms.device)
        noise[index] = torch.empty(len(unseeded), noise.shape[1], device=noise.device).exponential_()
    for r in sampled:
        generator = generators[r]
        if generator is None:
            continue
        k = num_drafts[r]
        if k:
            uniforms[r, :k] = torch.rand(k, generator=generator, device=uniforms.device)
        noise[r].exponential_(generator=generator)


def _output(log_probs: torch.Tensor, tokens: torch.Tensor, num_accepted: torch.Tensor, top_n: int) -> VerifyOutput:
    chosen = log_probs.gather(2, tokens[:, :, None]).squeeze(2)
    top_ids = top_logprobs = None
    if top_n > 0:
        top_logprobs, top_ids = torch.topk(log_probs, min(top_n, log_probs.shape[-1]), dim=-1)
    return VerifyOutput(tokens, num_accepted, chosen, top_ids, top_logprobs)
