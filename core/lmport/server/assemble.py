"""From what ``build_engine`` returns to a :class:`ServerState`: the one place that decides the
served model's name, dtype and chat stop tokens (``lmport launch`` and the tests use it); the
limits are the engine's.
"""

from __future__ import annotations

from typing import Any

from lmport.config import LaunchConfig
from lmport.engine.api import EngineClient
from lmport.models.base import ModelInfo
from lmport.models.image_prompts import ImagePrompts
from lmport.models.resolve import end_of_turn_ids
from lmport.server.chat_templates import template_for_model_type
from lmport.server.images import ImagePolicy
from lmport.server.state import ServedModel, ServerState


def build_state(
    config: LaunchConfig,
    engine: EngineClient,
    tokenizer: Any,
    info: ModelInfo,
    *,
    host: Any = None,
    model_id: str | None = None,
) -> ServerState:
    """A server state for an engine from :func:`lmport.engine.factory.build_engine` (its limits are the server's)."""
    device_type = "cpu"
    if host is not None and getattr(host, "selection", None) is not None:
        device_type = host.capabilities().device_type
    image_prompts = None
    if engine.limits.accepts_images:
        image_prompts = ImagePrompts.load(info.path, info.hf_config, info.architecture, config.trust_remote_code)
    fallback_template = None
    if not getattr(tokenizer, "chat_template", None):
        # image-text checkpoints often keep the template with their processor (chat_template.json)
        processor_template = getattr(getattr(image_prompts, "processor", None), "chat_template", None)
        fallback_template = processor_template or template_for_model_type(getattr(info.hf_config, "model_type", ""))
    model = ServedModel(
        model_id=model_id or info.model_id,
        dtype=engine.model_dtype or config.dtype or "float32",
        device_type=device_type,
        chat_template=fallback_template,
        chat_stop_token_ids=tuple(end_of_turn_ids(tokenizer)),
        block_size=engine.limits.block_size,
        modality="image-text" if image_prompts is not None else "text",
    )
    policy = ImagePolicy(allow_remote=config.allow_remote_images, max_bytes=config.max_image_bytes)
    return ServerState(
        engine=engine, tokenizer=tokenizer, model=model, config=config, host=host,
        image_prompts=image_prompts, image_policy=policy,
    )
