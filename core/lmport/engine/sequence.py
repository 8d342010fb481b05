"""One sequence's state as the scheduler, block manager and output processor see it.

A request with ``SamplingParams.n == k`` becomes ``k`` sequences that share a request id and
differ by ``index``. Prompt and output tokens are one list (``token_ids``), so that a
preempted sequence is recomputed the same way a prompt is prefilled.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from lmport.engine.api import FinishReason, ImageInputs, SamplingParams
from lmport.plan import PLACEHOLDER  # noqa: F401  (an out-of-vocabulary id: fed to a model by mistake, it fails loudly)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """A prompt and what was generated from it, plus its place in the paged KV cache.

    Tokens ``[0, num_computed_tokens)`` have K/V in the cache (in ``block_table``); the
    tokens after that are fed on the next steps. A sequence in decode has exactly one
    uncomputed token: the one sampled last.

    With async scheduling a step is launched before the previous step's tokens reach the host:
    each token sampled on the device but not yet known here is a trailing ``PLACEHOLDER`` in
    ``token_ids``/``output_token_ids`` (``num_placeholders`` of them, at most two), so lengths,
    slots and blocks are planned as if it were known; :meth:`fill_placeholder` writes it in.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    seed: int | None = None
    images: ImageInputs | None = None  # the prompt's images (their spans lie in the prompt)
    generator: Any = None  # torch.Generator for sampling, made by the runner's device
    # its stateful logits processors (a grammar's matcher: lmport.engine.constraints), advanced
    # with each generated token as soon as the host knows it
    processors: tuple = ()
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    block_row: int | None = None  # its row in the block manager's BlockTableRows, while it holds blocks
    block_hashes: list[bytes] = field(default_factory=list)  # of the full blocks of token_ids
    num_committed_blocks: int = 0  # leading blocks of block_table that are in the prefix cache
    num_dropped_blocks: int = 0  # leading blocks given back once out of every layer's window (BlockManager)
    # encoder-decoder and cross-attention models: what the executor encodes once per request
    # (T5: the request's token ids, while ``prompt_token_ids`` is the decoder's start), the
    # positions its cross-attention KV group holds, and their blocks (a table of its own)
    encoder_input: Any = None
    cross_kv_len: int = 0
    cross_block_table: list[int] = field(default_factory=list)
    # per prompt position, the ``(start, end)`` cross positions its queries attend (a later position
    # takes the last entry's); None: all ``cross_kv_len`` (Idefics: the image before each token)
    cross_key_ranges: list[tuple[int, int]] | None = None
    hash_seed: bytes | None = None  # chained into the first block hash: K/V depend on more than the tokens
    num_preemptions: int = 0
    wants_prompt_logprobs: bool = False  # cleared once the prompt's logprobs were computed
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_placeholders: int = 0  # trailing tokens sampled on the device, not known on the host yet
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        self.wants_prompt_logprobs = self.params.prompt_logprobs
        # whether sampling reads this sequence's own past tokens on the host (penalties, the
        # watermark): async scheduling must know them before the next step; asked every step
        params = self.params
        self.penalties_read_tokens = (
            (params.repetition_penalty is not None and params.repetition_penalty != 1.0)
            or bool(params.frequency_penalty)
            or bool(params.presence_penalty)
            or bool(params.watermark)
        )
        # a grammar's processor reads them too, but only to sample (after the forward pass)
        self.reads_own_tokens = self.penalties_read_tokens or any(p.needs_host_tokens for p in self.processors)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_input_tokens(self) -> int:
        """The request's input tokens: the encoder's for an encoder-decoder model, else the prompt's."""
        return len(self.encoder_input) if isinstance(self.encoder_input, list) else len(self.prompt_token_ids)

    @property
    def num_encoder_tokens(self) -> int:
        """Tokens its encoder runs over when it is admitted (T5's input; 0 for images or none):
        the scheduler counts them in that step's prefill budget."""
        return len(self.encoder_input) if isinstance(self.encoder_input, list) else 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_known_tokens(self) -> int:
        """Tokens whose ids the host knows (all but the trailing placeholders)."""
        return len(self.token_ids) - self.num_placeholders

    @property
    def num_known_output_tokens(self) -> int:
        return len(self.output_token_ids) - self.num_placeholders

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_decoding(self) -> bool:
        """Only the last sampled token is left to feed (as opposed to a prompt or a recompute)."""
        return self.num_output_tokens > 0 and self.num_computed_tokens == len(self.token_ids) - 1

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)
        if token_id != PLACEHOLDER:
            self._advance(token_id)

    def _advance(self, token_id: int) -> None:
        for processor in self.processors:
            processor.advance(token_id)

    def append_placeholder(self) -> int:
        """Append a token the device sampled but the host does not know yet; returns its position."""
        self.append_token(PLACEHOLDER)
        self.num_placeholders += 1
        return len(self.token_ids) - 1

    def fill_placeholder(self, position: int, token_id: int) -> None:
        """Write the sampled ``token_id`` over the placeholder at ``position`` (the oldest one)."""
        if self.num_placeholders <= 0 or position != len(self.token_ids) - self.num_placeholders:
            raise RuntimeError(f"sequence {self.seq_id}: no pending placeholder at position {position}")
        self.token_ids[position] = token_id
        self.output_token_ids[position - self.num_prompt_tokens] = token_id
        self.num_placeholders -= 1
        self._advance(token_id)
