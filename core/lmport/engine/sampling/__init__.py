"""Batched sampling: per-row state, logits processors, the sampler, the watermark and prompt logprobs."""

from lmport.engine.sampling.prompt_logprobs import compute_prompt_logprobs
from lmport.engine.sampling.sampler import Sampler, SamplerOutput
from lmport.engine.sampling.state import SamplingRow, make_generator

__all__ = ["Sampler", "SamplerOutput", "SamplingRow", "compute_prompt_logprobs", "make_generator"]
