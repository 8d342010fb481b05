"""Tiny random T5 checkpoints (T5 v1.0: relu, tied head; FLAN-T5 / v1.1: gated-gelu, untied),
saved with a trained tokenizer, and transformers as the oracle."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from lmport.testing.tiny_models import make_t5_checkpoint
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture(scope="session")
def t5_checkpoint(tmp_path_factory) -> Callable[[str], tuple[Path, Any]]:
    """``t5_checkpoint("t5" | "flan-t5")``: ``(path, transformers model)``, built once."""
    built: dict[str, tuple[Path, Any]] = {}

    def build(name: str) -> tuple[Path, Any]:
        if name not in built:
            path = tmp_path_factory.mktemp(name)
            built[name] = (path, make_t5_checkpoint(path, flan=name == "flan-t5"))
        return built[name]

    return build
