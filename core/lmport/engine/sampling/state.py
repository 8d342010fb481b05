"""What the sampler needs to know about one row of the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmport.engine.api import SamplingParams


@dataclass
class SamplingRow:
    """One sequence's sampling state, handed to :meth:`Sampler.sample` every step.

    ``prompt_token_ids`` and ``output_token_ids`` are the sequence's tokens so far (the
    repetition penalty reads both, frequency/presence penalties only the output, the watermark
    the last token). ``generator`` is the row's own RNG when the request carries a seed; it
    lives as long as the sequence, so a seeded request draws the same tokens whatever else is
    in the batch. ``processors`` are the sequence's own stateful logits processors (a grammar's
    matcher, :mod:`lmport.engine.constraints`), advanced by the engine as its tokens arrive.
    """

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    generator: torch.Generator | None = None
    processors: tuple = ()

    @property
    def last_token_id(self) -> int | None:
        if self.output_token_ids:
            return self.output_token_ids[-1]
        return self.prompt_token_ids[-1] if self.prompt_token_ids else None


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator on ``device`` seeded with ``seed``; ``None`` (use the global RNG) without a seed."""
    if seed is None:
        return None
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(int(seed))
    return generator
