"""The engine's rules for a request: the one rule set every front end applies.

A request is checked once, against :class:`~lmport.engine.limits.EngineLimits`, before it is
queued (the frontends call :func:`validate_request` when it is submitted; :meth:`LLMEngine.add_request
<lmport.engine.llm_engine.LLMEngine.add_request>` for direct callers). The HTTP layer only turns its
wire format into a :class:`~lmport.engine.api.GenerationRequest` and answers a
:class:`RequestValidationError` with 422. Messages are TGI's (router/src/validation.rs), in TGI's
order, so clients that match on them keep working.
"""

from __future__ import annotations

from lmport.engine.api import GenerationRequest, ImageInputs, SamplingParams
from lmport.engine.errors import RequestValidationError, check_token_ids
from lmport.engine.limits import EngineLimits

MAX_SEQUENCES_PER_REQUEST = 128  # OpenAI's upper bound for n
MAX_STOP_SEQUENCE_CHARS = 512  # each stop string is matched against the text's tail at every token


def check_sampling(params: SamplingParams, limits: EngineLimits) -> None:
    """The ranges of the sampling parameters (TGI's ``validate`` before tokenizing)."""
    if params.temperature is not None and params.temperature <= 0.0:
        raise RequestValidationError("`temperature` must be strictly positive")
    if params.repetition_penalty is not None and params.repetition_penalty <= 0.0:
        raise RequestValidationError("`repetition_penalty` must be strictly positive")
    if params.frequency_penalty is not None and not -2.0 <= params.frequency_penalty <= 2.0:
        raise RequestValidationError("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if params.presence_penalty is not None and not -2.0 <= params.presence_penalty <= 2.0:
        raise RequestValidationError("`presence_penalty` must be >= -2.0 and <= 2.0")
    if params.top_p is not None and not 0.0 < params.top_p < 1.0:
        raise RequestValidationError("`top_p` must be > 0.0 and < 1.0")
    if params.typical_p is not None and not 0.0 < params.typical_p < 1.0:
        raise RequestValidationError("`typical_p` must be > 0.0 and < 1.0")
    if params.top_k is not None and params.top_k <= 0:
        raise RequestValidationError("`top_k` must be strictly positive")
    if len(params.stop) > limits.max_stop_sequences:
        raise RequestValidationError(
            f"`stop` supports up to {limits.max_stop_sequences} stop sequences. Given: {len(params.stop)}"
        )
    longest = max((len(stop) for stop in params.stop), default=0)
    if longest > MAX_STOP_SEQUENCE_CHARS:
        raise RequestValidationError(
            f"`stop` sequences must be at most {MAX_STOP_SEQUENCE_CHARS} characters long. Given: {longest}"
        )
    if params.constraint is not None and limits.disable_grammar_support:
        raise RequestValidationError("grammar is not supported")
    if not 0 <= params.top_n_tokens <= limits.max_top_n_tokens:
        raise RequestValidationError(
            f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {params.top_n_tokens}"
        )


def validate_request(request: GenerationRequest, limits: EngineLimits, vocab_size: int | None) -> None:
    """Raise :class:`RequestValidationError` for a request that can never run under ``limits``.

    Pure and thread-safe: a front end that holds no engine (another process runs it) validates with this.
    """
    params = request.params
    if request.images is not None:  # before the ids: a text-only model's vocabulary lacks the image token
        check_images(request.images, limits)
    check_sampling(params, limits)
    n_prompt = len(request.prompt_token_ids)
    if n_prompt == 0:
        raise RequestValidationError("`inputs` must have at least one token")
    check_token_ids(request.prompt_token_ids, vocab_size)
    if n_prompt + params.max_new_tokens > limits.max_total_tokens:
        raise RequestValidationError(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {n_prompt} `inputs` tokens and {params.max_new_tokens} `max_new_tokens`"
        )
    if n_prompt > limits.max_input_tokens:
        raise RequestValidationError(f"`inputs` must have less than {limits.max_input_tokens} tokens. Given: {n_prompt}")
    if params.max_new_tokens < 1:
        raise RequestValidationError("`max_new_tokens` must be strictly positive")
    if not 1 <= params.n <= MAX_SEQUENCES_PER_REQUEST:
        raise RequestValidationError(f"`n` must be >= 1 and <= {MAX_SEQUENCES_PER_REQUEST}. Given: {params.n}")
    if request.images is not None:
        check_image_spans(request.images, n_prompt)


def check_images(images: ImageInputs, limits: EngineLimits) -> None:
    """Images only for a model that takes them, at most ``max_images_per_request``, one digest each."""
    if not limits.accepts_images:
        raise RequestValidationError("this model takes no images (it is a text-only model)")
    if images.num_images > limits.max_images_per_request:
        raise RequestValidationError(
            f"a request may hold at most {limits.max_images_per_request} images. Given: {images.num_images}"
        )
    if len(images.hashes) != len(images.spans):
        raise RequestValidationError("every image needs one content hash")


def check_image_spans(images: ImageInputs, n_prompt: int) -> None:
    """Image spans must be ordered, disjoint, non-empty and inside the prompt."""
    end = 0
    for start, stop in images.spans:
        if not end <= start < stop <= n_prompt:
            raise RequestValidationError(f"image span [{start}, {stop}) does not lie in order inside the prompt of {n_prompt} tokens")
        end = stop
