"""Registers the core's native model families through ``lmport_register_models``."""

from __future__ import annotations

import importlib

from lmport.hookspecs import hookimpl

# One module per family; each has ``register_models(register)``.
FAMILIES: tuple[str, ...] = ("opt", "llama", "mistral", "bloom", "mixtral", "gpt2", "gpt_bigcode", "mpt", "falcon", "gpt_neox", "phi", "llava_next", "t5", "idefics",
                            "gemma", "qwen", "phi3", "granite")


@hookimpl
def lmport_register_models(register):
    for name in FAMILIES:
        importlib.import_module(f"lmport.models.{name}").register_models(register)
