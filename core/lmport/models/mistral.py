"""Mistral: the Llama architecture with sliding-window attention.

HF masks a key when ``query_pos - key_pos >= sliding_window`` (a query sees itself and the
``sliding_window - 1`` keys before it), which is exactly ``AttentionSpec.sliding_window``'s
meaning, so the window passes through unchanged. Mistral v0.2+ checkpoints set it to ``null``.
"""

from __future__ import annotations

from typing import Any

from lmport.models.base import ModelContext
from lmport.models.llama import LlamaForCausalLM

ARCHITECTURES = ["MistralForCausalLM"]


def build_mistral(config: Any, ctx: ModelContext) -> LlamaForCausalLM:
    return LlamaForCausalLM(config, ctx, sliding_window=getattr(config, "sliding_window", None) or None)


def register_models(register) -> None:
    register(ARCHITECTURES, build_mistral)
