"""The engine's public types: what the HTTP layer submits and what it receives per step.

Kept small and plain (dataclasses of builtins) so the engine can move into its own process
without changing the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["length", "eos_token", "stop_sequence", "abort"]


@dataclass(frozen=True)
class SamplingParams:
    """TGI's generation parameters (and the OpenAI ones mapped onto them).

    Validation of ranges is the server's job (it answers 422); the engine trusts these.
    """

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    seed: int | None = None
    watermark: bool = False
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = True  # per generated token (cheap; the server decides what to show)
    top_n_tokens: int = 0
    prompt_logprobs: bool = False  # TGI's decoder_input_details
    skip_special_tokens: bool = True
    n: int = 1  # independent sequences for one prompt (OpenAI n, TGI best_of)

    @property
    def greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float | None = None  # time.monotonic(); set by the engine if None


@dataclass(frozen=True)
class TokenInfo:
    token_id: int
    logprob: float
    text: str  # this token's own decoded text (may be a partial character's replacement)
    special: bool = False
    top_tokens: tuple[tuple[int, float, str], ...] = ()  # (id, logprob, text), best first


@dataclass
class RequestOutput:
    """What one engine step produced for one sequence of one request."""

    request_id: str
    index: int  # which of the request's n sequences
    tokens: list[TokenInfo]  # new tokens this step
    text: str  # new text this step (complete UTF-8 only; held back until it is)
    finished: bool = False
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    cumulative_logprob: float = 0.0
    prompt_tokens: list[TokenInfo] | None = None  # with prompt_logprobs, on the first output only
    seed: int | None = None
    # monotonic timestamps for TGI's timing headers and metrics
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    error: str | None = None  # set when generation failed (server answers 424)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    kv_blocks_total: int
    kv_blocks_used: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    batch_size: int = 0
    extra: dict = field(default_factory=dict)
