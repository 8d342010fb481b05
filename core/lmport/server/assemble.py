"""From what ``build_engine`` returns to a :class:`ServerState`: the one place that decides the
served model's name, limits, dtype and chat stop tokens (``lmport launch`` and the tests use it).
"""

from __future__ import annotations

from typing import Any

from lmport.config import LaunchConfig
from lmport.models.base import ModelInfo
from lmport.models.resolve import end_of_turn_ids
from lmport.server.chat_templates import template_for_model_type
from lmport.server.state import ServedModel, ServerState
from lmport.server.validation import Limits


def engine_dtype(engine: Any, config: LaunchConfig) -> str:
    """The dtype the model runs in: as the engine reports it (a process engine learns it from its
    child), else read off the loaded weights when reachable."""
    reported = getattr(engine, "model_dtype", None)
    if isinstance(reported, str):
        return reported
    model = getattr(getattr(getattr(engine, "engine", None), "executor", None), "model", None)
    try:
        return str(next(model.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return config.dtype or "float32"


def build_state(
    config: LaunchConfig,
    engine: Any,
    tokenizer: Any,
    info: ModelInfo,
    *,
    host: Any = None,
    model_id: str | None = None,
) -> ServerState:
    """A server state for an engine from :func:`lmport.engine.factory.build_engine`."""
    engine_limits = getattr(engine, "limits", None)
    max_total = getattr(engine_limits, "max_total_tokens", None) or config.max_total_tokens or 4096
    max_input = getattr(engine_limits, "max_input_tokens", None) or config.max_input_tokens or max_total - 1
    limits = Limits(
        max_concurrent_requests=config.max_concurrent_requests,
        max_best_of=config.max_best_of,
        max_stop_sequences=config.max_stop_sequences,
        max_top_n_tokens=config.max_top_n_tokens,
        max_client_batch_size=config.max_client_batch_size,
        max_input_tokens=max_input,
        max_total_tokens=max_total,
        disable_grammar_support=config.disable_grammar_support,
    )
    device_type = "cpu"
    if host is not None and getattr(host, "selection", None) is not None:
        device_type = host.capabilities().device_type
    fallback_template = None
    if not getattr(tokenizer, "chat_template", None):
        fallback_template = template_for_model_type(getattr(info.hf_config, "model_type", ""))
    model = ServedModel(
        model_id=model_id or info.model_id,
        dtype=engine_dtype(engine, config),
        device_type=device_type,
        chat_template=fallback_template,
        chat_stop_token_ids=tuple(end_of_turn_ids(tokenizer)),
        block_size=getattr(engine_limits, "block_size", None),
    )
    return ServerState(engine=engine, tokenizer=tokenizer, model=model, limits=limits, config=config, host=host)
