"""The "green list" watermark of Kirchenbauer et al. (2023), as TGI applies it.

Before each token, the previous token seeds an RNG (``seed = HASH_KEY * previous_token``)
that permutes the vocabulary; the first ``gamma`` fraction of that permutation is the green
list, and ``delta`` is added to its logits. A detector that knows the scheme counts how many
tokens fall in the green list of their predecessor (:func:`watermark_z_score`).

Unlike TGI, which draws the permutation on the model's device, the permutation is always
drawn on the CPU: ``torch.randperm`` gives different permutations on different devices, and
a watermark that only a detector on the same kind of GPU can check is not much of one.
Green lists are cached per previous token, so a repeated context costs nothing.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

GAMMA = 0.5
DELTA = 2.0
HASH_KEY = 15485863  # a large prime, as in the paper's reference code and TGI


@lru_cache(maxsize=256)
def _green_mask_cpu(previous_token: int, vocab_size: int, gamma: float) -> torch.Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(HASH_KEY * previous_token)
    permutation = torch.randperm(vocab_size, generator=generator)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[permutation[: int(vocab_size * gamma)]] = True
    return mask


def greenlist_mask(previous_token: int, vocab_size: int, gamma: float = GAMMA) -> torch.Tensor:
    """``[vocab]`` bool CPU tensor: the green list that follows ``previous_token``."""
    return _green_mask_cpu(int(previous_token), int(vocab_size), float(gamma))


def apply_watermark(
    logits: torch.Tensor, previous_tokens: list[int], gamma: float = GAMMA, delta: float = DELTA
) -> torch.Tensor:
    """Add ``delta`` to the green-list logits of each row (one previous token per row)."""
    vocab = logits.shape[-1]
    masks = torch.stack([greenlist_mask(t, vocab, gamma) for t in previous_tokens])
    return logits + masks.to(logits.device, non_blocking=True).to(logits.dtype) * delta


def watermark_z_score(token_ids: list[int], vocab_size: int, gamma: float = GAMMA) -> float:
    """How far the green-token count of ``token_ids[1:]`` lies above chance, in standard deviations.

    ``token_ids`` should start with the last prompt token (it seeds the first green list).
    Unwatermarked text scores near 0; watermarked text of a few dozen tokens scores above 4.
    """
    scored = len(token_ids) - 1
    if scored < 1:
        return 0.0
    green = sum(bool(greenlist_mask(prev, vocab_size, gamma)[tok]) for prev, tok in zip(token_ids, token_ids[1:]))
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
