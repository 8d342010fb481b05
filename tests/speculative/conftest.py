"""Fixtures for speculative decoding tests: a tiny llama target (with the trained tokenizer) and
a different tiny llama draft, built once per session; engines built through build_llm_engine."""

from __future__ import annotations

from typing import Any

import pytest

from lmport.config import LaunchConfig
from lmport.engine.factory import build_llm_engine
from lmport.plugins import PluginHost
from lmport.testing.tiny_models import make_checkpoint
from lmport.testing.tiny_tokenizer import train_tiny_tokenizer
from lmport.testing.torch_threads import one_torch_thread  # noqa: F401  (autouse: one intra-op thread)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Any]:
    target = tmp_path_factory.mktemp("spec-target")
    hf_model = make_checkpoint("llama", target)
    train_tiny_tokenizer().save_pretrained(target)
    draft = tmp_path_factory.mktemp("spec-draft")
    make_checkpoint("llama", draft, seed=1)
    return {"target": target, "draft": draft, "hf_model": hf_model}


@pytest.fixture(scope="session")
def make_engine(checkpoints):
    def make(**settings: Any):
        defaults = dict(dtype="float32", block_size=4, max_batch_total_tokens=2048, max_batch_prefill_tokens=12,
                        max_input_tokens=64, max_total_tokens=128)  # fmt: skip
        host = PluginHost(environ={}, load_entry_points=False).load()
        host.select_backend("cpu")
        engine, _, _ = build_llm_engine(LaunchConfig(model_id=str(checkpoints["target"]), **{**defaults, **settings}), host)
        return engine

    return make
