"""Seeded random token-id prompts of a fixed length (vLLM's ``random`` dataset with no range)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch


@dataclass(frozen=True)
class BenchRequest:
    prompt_ids: list[int]
    output_len: int


def random_prompts(
    num_prompts: int, input_len: int, output_len: int, vocab_size: int, *, seed: int = 0, exclude: Iterable[int] = ()
) -> list[BenchRequest]:
    """``num_prompts`` prompts of ``input_len`` ids drawn uniformly from the vocabulary minus ``exclude``.

    Special tokens belong in ``exclude``: a BOS or EOS in the middle of a prompt is not text.
    """
    excluded = torch.tensor(sorted(set(exclude)), dtype=torch.int64)
    allowed = torch.ones(vocab_size, dtype=torch.bool)
    if excluded.numel():
        allowed[excluded[excluded < vocab_size]] = False
    candidates = allowed.nonzero().flatten()
    if candidates.numel() == 0:
        raise ValueError("no token ids left to draw prompts from")
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(candidates.numel(), (num_prompts, input_len), generator=gen)
    return [BenchRequest(candidates[row].tolist(), output_len) for row in picks]
