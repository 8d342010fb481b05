"""The engine's public types: what the HTTP layer submits, what it receives per step, and
:class:`EngineClient`, the surface both frontends (the thread's
:class:`~lmport.engine.async_engine.AsyncEngine`, the process's
:class:`~lmport.engine.engine_process.EngineProcessClient`) offer the server.

Kept small and plain (dataclasses of builtins) so the engine can move into its own process
without changing the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Literal, Protocol, Sequence

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from lmport.engine.limits import EngineLimits

FinishReason = Literal["length", "eos_token", "stop_sequence", "abort"]
ConstraintKind = Literal["json_schema", "json_object", "regex", "lark"]
CONSTRAINT_KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "lark")


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match (constrained decoding), as plain, picklable data.

    ``kind``: ``"json_schema"`` (``value`` is the JSON schema as JSON text), ``"json_object"``
    (any JSON object; ``value`` is ignored, usually ``""``), ``"regex"`` (``value`` is the
    regular expression the whole output must match) or ``"lark"`` (``value`` is a Lark grammar,
    llguidance's dialect). The engine process resolves it through the ``lmport_logits_processors``
    hook into a per-sequence processor that masks the tokens the constraint does not allow;
    :func:`lmport.engine.constraints.check_constraint` compile-checks one before it is submitted.
    """

    kind: ConstraintKind
    value: str = ""


@dataclass(frozen=True)
class SamplingParams:
    """TGI's generation parameters (and the OpenAI ones mapped onto them).

    Ranges and limits are checked by the engine's rules (:mod:`lmport.engine.rules`) when the
    request is submitted; the server answers their :class:`RequestValidationError` with 422.
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
    constraint: Constraint | None = None  # constrained decoding (TGI grammar, OpenAI response_format, tools)

    @property
    def greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class ImageInputs:
    """A request's images after the model's processor, as plain data (numpy arrays, bytes).

    ``arrays`` holds the processor's outputs under their transformers names (Llava-next:
    ``pixel_values [images, tiles, 3, h, w]`` and ``image_sizes [images, 2]``); the prompt's
    image tokens were expanded by the same processor. ``spans[i]`` is the ``[start, end)``
    range of prompt positions whose embeddings image ``i``'s features replace, and
    ``hashes[i]`` a digest of that image's content: the prefix cache mixes it into the hash of
    every block that overlaps the span, so prompts with different images never share KV.
    """

    arrays: dict[str, Any]
    spans: tuple[tuple[int, int], ...]
    hashes: tuple[bytes, ...]

    @property
    def num_images(self) -> int:
        return len(self.spans)


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_time: float | None = None  # time.monotonic(); stamped when the engine accepts it (submit) if None
    images: ImageInputs | None = None  # for a model that takes images (``EngineLimits.accepts_images``)


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
    # what ended a failed request when it was not the model: "timeout" (past --request-timeout),
    # "queue_timeout" (never scheduled within --max-queue-time); None: the step failed
    error_kind: str | None = None
    # finish_reason "stop_sequence" on a stop string: where that string begins in the sequence's
    # whole text (the concatenated ``text`` of its outputs), so a caller can cut it off (OpenAI does)
    stop_text_offset: int | None = None


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


class OutputStream(Protocol):
    """One submitted request's outputs, in order; ends when all ``n`` sequences have finished.

    Raises the engine's failure (:class:`~lmport.engine.errors.EngineDeadError`) where it happens.
    ``close`` (idempotent) aborts the request if it is unfinished and frees its admission slot.
    """

    request_id: str
    arrival_time: float

    def __aiter__(self) -> AsyncIterator[RequestOutput]: ...

    async def __anext__(self) -> RequestOutput: ...

    def close(self) -> None: ...


class EngineClient(Protocol):
    """What the HTTP layer uses of an engine that runs in a thread or a process.

    ``submit`` is the one admission control: it validates every request by the engine's rules
    (:class:`~lmport.engine.errors.RequestValidationError`), admits all of them or none
    against ``limits.max_concurrent_requests``
    (:class:`~lmport.engine.errors.EngineOverloadedError`), refuses when the engine is not
    serving (:class:`~lmport.engine.errors.EngineDeadError`), and hands them to the engine.
    """

    started_at: float | None

    @property
    def limits(self) -> EngineLimits: ...

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase: ...

    @property
    def vocab_size(self) -> int | None: ...

    @property
    def model_dtype(self) -> str | None: ...

    @property
    def is_healthy(self) -> bool: ...

    @property
    def error(self) -> BaseException | None: ...

    @property
    def num_open(self) -> int:
        """Requests admitted and not yet closed (what ``max_concurrent_requests`` counts)."""
        ...

    def start(self) -> EngineClient: ...

    def shutdown(self, timeout: float | None = 10.0) -> None: ...

    def stats(self) -> EngineStats: ...

    def validate(self, request: GenerationRequest) -> None: ...

    def submit(self, requests: Sequence[GenerationRequest]) -> list[OutputStream]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[RequestOutput]: ...

    def abort(self, request_id: str) -> None: ...
