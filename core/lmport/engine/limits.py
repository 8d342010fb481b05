"""The engine's resolved limits: LaunchConfig's TGI knobs with the model's and KV cache's defaults filled in."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lmport.config import LaunchConfig

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_SIZE = 256
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "max_sequence_length")


@dataclass(frozen=True)
class EngineLimits:
    """What the scheduler plans with and what every request is validated against (the engine's
    rules in :mod:`lmport.engine.rules`; the server reads the same object, built once by
    :func:`resolve_limits`).

    ``max_batch_total_tokens`` is the KV cache's capacity in tokens
    (``num_blocks * block_size``); a request whose prompt plus ``max_new_tokens`` exceeds
    ``max_total_tokens`` is refused.
    """

    max_concurrent_requests: int
    max_input_tokens: int
    max_total_tokens: int
    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int
    waiting_served_ratio: float
    max_waiting_tokens: int
    block_size: int
    num_blocks: int
    enable_prefix_caching: bool = True
    # per-request limits on fields (TGI's flags of the same names)
    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_client_batch_size: int = 4
    disable_grammar_support: bool = False
    accepts_images: bool = False  # the model reads images (ImageInputs) with its prompts
    max_images_per_request: int = 4
    # deadlines, in seconds from a request's arrival (None: none): --request-timeout ends it
    # wherever it is; --max-queue-time ends one that was never scheduled
    request_timeout: float | None = None
    max_queue_time: float | None = None
    # the backend has no continuous batching (``Capabilities.continuous_batching`` off): a step
    # prefills whole prompts into free slots of the fixed batch while the others pause, or
    # decodes every running sequence (see :class:`~lmport.engine.scheduler.Scheduler`)
    fixed_slots: bool = False


def model_max_positions(hf_config: Any, default: int = 4096) -> int:
    """The longest sequence the model was built for (ALiBi models name none: ``default``)."""
    found = model_position_limit(hf_config)
    return found[1] if found else default


def model_position_limit(hf_config: Any) -> tuple[str, int] | None:
    """``(config key, value)`` of the model's declared position limit, or None if it names none.

    An image-text config (Llava-next) names it in its text config."""
    if hasattr(hf_config, "get_text_config"):
        hf_config = hf_config.get_text_config()
    for key in _POSITION_KEYS:
        value = getattr(hf_config, key, None)
        if isinstance(value, int) and value > 0:
            return key, value
    return None


def check_positions(max_total_tokens: int, hf_config: Any) -> None:
    """Refuse a ``max_total_tokens`` the user gave past the longest sequence the model runs.

    That is the declared positions, stretched by a RoPE scaling factor as vLLM derives it
    (linear and dynamic NTK: ``positions * factor``; YaRN: ``original * factor``; llama3 and
    longrope declare the stretched length already). Past it a model with learned positions
    (GPT-2, OPT, StarCoder) indexes its position table out of range inside the step. ALiBi
    and T5's relative buckets have no table: there it is only logged.
    """
    found = model_position_limit(hf_config)
    if found is None:
        return
    key, declared = found
    limit = _stretched_positions(hf_config, declared)
    if max_total_tokens <= limit:
        return
    if _has_no_position_table(hf_config):
        log.warning("max_total_tokens (%d) is past the model's %s (%d); it has no position table, so it runs, "
                    "outside what it was trained on", max_total_tokens, key, declared)
        return
    scaled = f" stretched by its rope scaling to {limit}" if limit != declared else ""
    raise ValueError(
        f"max_total_tokens ({max_total_tokens}) is larger than the model's {key} ({declared}{scaled}): "
        f"a longer sequence cannot run on it; give --max-total-tokens {limit} or less"
    )


def model_sequence_limit(hf_config: Any) -> int | None:
    """The longest sequence :func:`check_positions` lets run: the declared positions stretched
    by the RoPE scaling factor (None: the model declares none)."""
    found = model_position_limit(hf_config)
    return None if found is None else _stretched_positions(hf_config, found[1])


def _stretched_positions(hf_config: Any, declared: int) -> int:
    from lmport.layers.rotary import rope_parameters

    params = rope_parameters(hf_config)
    factor = params.get("factor")
    if not isinstance(factor, (int, float)) or factor <= 1:
        return declared
    if params["rope_type"] in ("linear", "dynamic"):
        return int(declared * factor)
    if params["rope_type"] == "yarn":
        return int((params.get("original_max_position_embeddings") or declared) * factor)
    return declared


def _has_no_position_table(hf_config: Any) -> bool:
    attn = getattr(hf_config, "attn_config", None)
    alibi = attn.get("alibi") if isinstance(attn, dict) else getattr(attn, "alibi", False)
    return bool(getattr(hf_config, "alibi", False) or alibi or getattr(hf_config, "relative_attention_num_buckets", None))


def resolve_limits(
    config: LaunchConfig,
    *,
    max_positions: int,
    block_size: int,
    num_blocks: int,
    backend_max_batch_size: int | None = None,
    accepts_images: bool = False,
    fixed_slots: bool = False,
) -> EngineLimits:
    """Fill TGI's defaults: total = min(4096, positions), input = total - 1, prefill = input + 50.

    Settings the user gave that the KV cache cannot hold are an error; defaults are clamped.
    ``backend_max_batch_size`` (the backend's compiled batch) caps ``--max-batch-size``.
    With ``fixed_slots`` prompts are never chunked: a prefill budget the user gave below
    ``max_input_tokens`` is an error.
    """
    capacity = num_blocks * block_size
    max_total = config.max_total_tokens or min(4096, max_positions, capacity)
    if config.max_total_tokens and max_total > capacity:
        raise ValueError(
            f"max_total_tokens ({max_total}) is larger than the KV cache holds ({capacity} tokens "
            f"= {num_blocks} blocks of {block_size}); lower it or give the cache more memory"
        )
    max_input = config.max_input_tokens or max(1, max_total - 1)
    if max_input >= max_total:
        raise ValueError(f"max_input_tokens ({max_input}) must be smaller than max_total_tokens ({max_total})")
    prefill = config.max_batch_prefill_tokens or max_input + 50
    if fixed_slots and prefill < max_input:
        raise ValueError(
            f"max_batch_prefill_tokens ({prefill}) is smaller than max_input_tokens ({max_input}); this backend has "
            "no continuous batching and prefills whole prompts: raise it or lower --max-input-tokens"
        )
    max_batch_size = config.max_batch_size or backend_max_batch_size or DEFAULT_MAX_BATCH_SIZE
    if backend_max_batch_size and max_batch_size > backend_max_batch_size:
        log.warning("--max-batch-size %d is capped at %d, the backend's compiled batch size",
                    max_batch_size, backend_max_batch_size)
        max_batch_size = backend_max_batch_size
    return EngineLimits(
        max_concurrent_requests=config.max_concurrent_requests,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        max_batch_prefill_tokens=prefill,
        max_batch_total_tokens=capacity,
        max_batch_size=max_batch_size,
        waiting_served_ratio=config.waiting_served_ratio,
        max_waiting_tokens=config.max_waiting_tokens,
        block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=config.enable_prefix_caching,
        max_best_of=config.max_best_of,
        max_stop_sequences=config.max_stop_sequences,
        max_top_n_tokens=config.max_top_n_tokens,
        max_client_batch_size=config.max_client_batch_size,
        disable_grammar_support=config.disable_grammar_support,
        accepts_images=accepts_images,
        max_images_per_request=config.max_images_per_request,
        request_timeout=config.request_timeout or None,
        max_queue_time=config.max_queue_time or None,
        fixed_slots=fixed_slots,
    )
