"""Batched logits processors: each works on a whole ``[rows, vocab]`` float32 tensor with one
parameter per row, and matches the transformers processor of the same name row by row.

Top-p and typical-p need the vocabulary ordered by some key, but only up to the point where
the kept mass is reached. Instead of sorting the whole vocabulary they take the ``k`` best
candidates with ``topk`` and sort everything only when some row's mass is not covered by
them (:func:`_ordered_candidates`); after a top-k filter the first ``k`` always suffices.
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")
# How many candidates top-p / typical-p look at first; most real distributions reach the
# requested mass well within this, and a flat one falls back to one full sort.
INITIAL_CANDIDATES = 256


def padded_token_tensor(token_lists: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    """``[rows, max_len]`` int64 of the token lists, right-padded with ``pad``."""
    width = max((len(t) for t in token_lists), default=0)
    out = torch.full((len(token_lists), max(width, 1)), pad, dtype=torch.int64)
    for row, tokens in enumerate(token_lists):
        if tokens:
            out[row, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
    return out.to(device, non_blocking=True)


def token_presence(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` bool: which tokens occur in each row's list (ids past the vocab are ignored)."""
    ids = padded_token_tensor(token_lists, vocab_size, device).clamp(max=vocab_size)
    mask = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.bool, device=device)
    mask.scatter_(1, ids, True)
    return mask[:, :vocab_size]


def token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> torch.Tensor:
    """``[rows, vocab]`` float32: how often each token occurs in each row's list."""
    ids = padded_token_tensor(token_lists, vocab_size, device).clamp(max=vocab_size)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    valid = (ids < vocab_size).to(torch.float32)
    counts.scatter_add_(1, ids, valid)
    return counts[:, :vocab_size]


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """HF ``RepetitionPenaltyLogitsProcessor``: every seen token's logit is divided by the
    penalty when positive, multiplied by it when negative (once per token, however often seen)."""
    penalty = penalty[:, None]
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalized, logits)


def apply_frequency_presence(
    logits: torch.Tensor, counts: torch.Tensor, frequency: torch.Tensor, presence: torch.Tensor
) -> torch.Tensor:
    """OpenAI's penalties: ``logit -= count * frequency + (count > 0) * presence``."""
    return logits - counts * frequency[:, None] - (counts > 0).to(logits.dtype) * presence[:, None]


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    return logits / temperature[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int) -> torch.Tensor:
    """HF ``TopKLogitsWarper``: keep every token at least as likely as the row's k-th best
    (ties included). ``max_k`` is ``top_k.max()`` known on the host."""
    vocab = logits.shape[-1]
    max_k = min(max_k, vocab)
    best = torch.topk(logits, max_k, dim=-1).values  # sorted, largest first
    kth = best.gather(1, (top_k.clamp(1, max_k) - 1)[:, None])
    return logits.masked_fill(logits < kth, NEG_INF)


def _ordered_candidates(
    key: torch.Tensor, probs: torch.Tensor, mass: torch.Tensor, largest: bool, start: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` tokens of each row in ``key`` order, for a ``k`` whose cumulative
    probability reaches ``mass`` in every row (or the whole vocabulary).

    Returns ``(sorted keys, their token ids, cumulative probs)``, each ``[rows, k]``.
    """
    vocab = key.shape[-1]
    k = min(max(start, 1), vocab)
    if k < vocab:
        keys, ids = torch.topk(key, k, dim=-1, largest=largest, sorted=True)
        cumulative = probs.gather(1, ids).cumsum(dim=-1)
        # one host sync: cheaper than sorting the whole vocabulary on every step
        if bool((cumulative[:, -1] >= mass).all()):
            return keys, ids, cumulative
    # a flat distribution: one full sort beats widening the top-k step by step
    keys, ids = torch.sort(key, dim=-1, descending=largest)
    return keys, ids, probs.gather(1, ids).cumsum(dim=-1)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor, start: int = INITIAL_CANDIDATES) -> torch.Tensor:
    """HF ``TopPLogitsWarper``: keep the most likely tokens until their mass reaches ``top_p``
    (a token is kept when the mass of the tokens ranked before it is below ``top_p``)."""
    probs = logits.softmax(dim=-1)
    _, ids, cumulative = _ordered_candidates(probs, probs, top_p, largest=True, start=start)
    mass_before = cumulative - probs.gather(1, ids)
    keep = mass_before < top_p[:, None]
    keep[:, 0] = True  # min_tokens_to_keep = 1
    remove = torch.ones_like(logits, dtype=torch.bool)
    remove.scatter_(1, ids, ~keep)
    return logits.masked_fill(remove, NEG_INF)


def apply_typical_p(logits: torch.Tensor, mass: torch.Tensor, start: int = INITIAL_CANDIDATES) -> torch.Tensor:
    """HF ``TypicalLogitsWarper`` (Meister et al.): keep the tokens whose surprisal is closest to
    the entropy until their mass reaches ``mass``."""
    log_probs = torch.log_softmax(logits, dim=-1)
    probs = log_probs.exp()
    entropy = -(log_probs * probs).nansum(dim=-1, keepdim=True)
    shifted = (-log_probs - entropy).abs()
    keys, _, cumulative = _ordered_candidates(shifted, probs, mass, largest=False, start=start)
    last = (cumulative < mass[:, None]).sum(dim=1).clamp(max=keys.shape[-1] - 1)
    threshold = keys.gather(1, last[:, None])
    return logits.masked_fill(shifted > threshold, NEG_INF)
